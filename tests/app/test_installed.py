"""The install docs/install.md gives, run for real: the package installed with `pip install .` (not editable) into
a fresh virtual environment, the checkout then out of reach, and `diffscore demo` run from elsewhere. The demo models \
must come
from the installed package, not from the checkout.

To skip reinstalling torch, the new environment sees the test environment's packages through a .pth line (its
editable diffscore is not activated that way: .pth files are read only in site directories), and the package itself
goes in with `pip install --no-deps --no-build-isolation .`: the only part a user's `pip install .` adds is the
dependency download."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# what a checkout holds besides the package's own files (build outputs, caches, the test environment)
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".cache",
                                    "results")


def site_packages(env: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment with diffscore installed from a copy of the checkout, the copy deleted."""
    root = tmp_path_factory.mktemp("installed")
    env, source = root / "venv", root / "checkout"
    venv.EnvBuilder().create(env)  # without its own pip and setuptools: the test environment's serve it
    (site_packages(env) / "test-environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    install = subprocess.run([sys.executable, "-m", "pip", "--python", env / "bin" / "python", "install", "-q",
                              "--no-deps", "--no-build-isolation", "--no-index", source],
                             capture_output=True, text=True, cwd=root)
    assert install.returncode == 0, install.stderr[-2000:]
    shutil.rmtree(source)
    return env


def run_in(env: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "DIFFSCORE_CACHE": str(cwd / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=environment,
                          timeout=900)


def test_installed_package_carries_its_demo_models(installed, tmp_path):
    code = ("import diffscore, diffscore.app.demo as d; print(diffscore.__file__); print(d.DEMO_MODEL); "
            "print((d.DEMO_MODEL / 'model_index.json').is_file(), "
            "(d.DEMO_MODEL.parent / 'demo-latent' / 'vae').is_dir(), "
            "(d.DEMO_MODEL.parent / 'demo-clip' / 'model.safetensors').is_file())")
    done = run_in(installed, installed / "bin" / "python", "-c", code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    package_file, model, flags = done.stdout.splitlines()
    assert Path(package_file).is_relative_to(site_packages(installed)), package_file  # not the checkout's
    assert Path(model) == site_packages(installed) / "diffscore" / "models" / "demo"
    assert flags == "True True True"  # the demo, the latent demo and the demo's CLIP (finetune --clip)


@pytest.mark.slow
def test_diffscore_demo_runs_from_the_installed_package(installed, tmp_path):
    done = run_in(installed, installed / "bin" / "diffscore", "demo", "--limit", "20", "--backend", "ort-cpu",
                  cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "held-out digits: 20 images" in done.stdout, done.stdout
    assert "Diffusion Classifier, zero-shot" in done.stdout
    engines = list((tmp_path / "cache" / "engines").glob("demo-*/manifest.json"))
    assert len(engines) == 1  # exported from the installed model into the cache it was told
