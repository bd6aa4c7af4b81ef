"""bench/gpu_check.py --dry-run: every section of the GPU check runs on the CPU (fake cudart, tiny UNet)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_section(demo_engine, tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--dry-run", "--engine", str(demo_engine), "--images", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["failed"] == 0
    assert {k: s["status"] for k, s in result["sections"].items()} == dict.fromkeys("abcde", "ran")
    checks = {(r["section"], r["check"]): r for r in result["rows"]}
    assert checks[("a", "batch 8: outputs copied back exactly (identity network)")]["passed"]
    assert checks[("a", "device=1 (absent) refused with one line")]["passed"]
    assert checks[("c", "demo job decisions: torch cpu (runners=) vs ort-cpu, 3 held-out digits")]["measured"] == 1
    assert [r["batch"] for r in result["sections"]["d"]["rows"]] == [1, 2, 1, 2]  # fp32, without and with capture
    assert checks[("e", "TensorRT plans of the demo engine")]["measured"] == "not run"  # no TensorRT in CI
    assert "| a |" in "\n".join(result["table"])
