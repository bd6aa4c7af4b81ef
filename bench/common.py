"""Shared by the bench scripts: what machine a figure came from, and where results go."""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parents[1] / "README.md"


# The instruction sets that decide fp32/fp16/int8 kernel speed (VNNI and AMX are what make INT8 pay on CPU).
SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def machine() -> dict:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.+)", cpuinfo).group(1).strip()
        flags = set(re.search(r"flags\s*:\s*(.+)", cpuinfo).group(1).split())
    except (OSError, AttributeError):
        pass
    import numpy
    import onnxruntime

    info = {"cpu": cpu, "cores": os.cpu_count(), "simd": [f for f in SIMD_FLAGS if f in flags],
            "load_average_1min": round(os.getloadavg()[0], 2),  # above `cores`: other jobs shared the machine
            "python": platform.python_version(),
            "numpy": numpy.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def timed(fn):
    """(fn(), seconds it took)."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def write_result(name: str, result: dict) -> Path:
    """bench/results/<name>.json with the machine and a timestamp beside the figures."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), **result}
    path.write_text(json.dumps(payload, indent=1))
    return path


def update_readme(section: str, markdown: str) -> None:
    """Replace the README text between <!-- bench:SECTION --> and <!-- /bench:SECTION -->."""
    update_doc(README, section, markdown)


def update_doc(path: Path, section: str, markdown: str) -> None:
    """Replace the text of a markdown file between <!-- bench:SECTION --> and <!-- /bench:SECTION -->."""
    text = path.read_text()
    start, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    if start not in text or end not in text:
        raise SystemExit(f"{path.name} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{markdown.strip()}\n{end}{tail}")


def machine_line(info: dict) -> str:
    simd = "/".join(info.get("simd", [])) or "-"
    return (f"{info['cpu']} ({simd}), {info['cores']} cores, load average {info.get('load_average_1min', '?')}, "
            f"onnxruntime {info['onnxruntime']}, torch {info.get('torch', '-')}")


def publish(name: str, result: dict, table: list[str], readme: bool) -> Path:
    """Write bench/results/<name>.json, print the markdown table and, if asked, put it in README."""
    path = write_result(name, result)
    print("\n".join(table))
    print(f"wrote {path}")
    if readme:
        update_readme(name, "\n".join(table))
    return path


def demo_engine_all_precisions(model_dir: Path | None = None) -> Path:
    """The demo engine (or that of another demo-task model: models/demo-latent) with fp32, fp16 and the INT8
    UNet that `diffscore calibrate --demo` makes with its defaults (calibrated and gated on training digits
    only), calibrating first if the engine has none."""
    from diffscore.app.demo import DEMO_MODEL, demo_engine_dir
    from diffscore.engine.manifest import Manifest

    engine_dir = demo_engine_dir(model_dir or DEMO_MODEL, precisions=("fp32", "fp16"))
    if "unet.int8" not in Manifest.load(engine_dir).graphs:
        from diffscore.app.digits import CLASS_NAMES, training_images
        from diffscore.calibration.pipeline import calibrate

        calibrate(engine_dir, images=training_images(), labels=list(CLASS_NAMES), source="demo training digits", progress=True)
    return engine_dir
