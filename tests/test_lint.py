"""The code passes its linter (ruff, configured in pyproject.toml: syntax errors, pyflakes, lines ≤ 120 characters)
and the version is written once (diffscore.__version__; pyproject.toml reads it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def ruff() -> list[str]:
    here = Path(sys.executable).with_name("ruff")
    if here.exists():
        return [str(here)]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.fail("ruff is not installed: pip install -e '.[dev]' (the dev extra has it)")


def test_ruff_passes():
    proc = subprocess.run([*ruff(), "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_one_version_source():
    import diffscore

    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "diffscore.__version__"}
    from setuptools.config.pyprojecttoml import read_configuration

    assert read_configuration(REPO / "pyproject.toml", expand=True)["project"]["version"] == diffscore.__version__
