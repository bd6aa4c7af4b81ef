"""Shared by the bench scripts: what machine a figure came from, and where results go."""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DOCS = Path(__file__).resolve().parents[1] / "docs"  # the bench tables live in docs/benchmarks.md


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
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
               **result}
    path.write_text(json.dumps(payload, indent=1))
    return path


def update_doc(path: Path, section: str, markdown: str) -> None:
    """Replace the text of a markdown file between <!-- bench:SECTION --> and <!-- /bench:SECTION -->."""
    text = path.read_text()
    start, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    if start not in text or end not in text:
        raise SystemExit(f"{path.name} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{markdown.strip()}\n{end}{tail}")


def update_docs(section: str, markdown: str) -> Path:
    """update_doc on the one docs/*.md page that holds the SECTION's markers (docs/benchmarks.md for the tables the
    README used to carry)."""
    marker = f"<!-- bench:{section} -->"
    pages = [p for p in sorted(DOCS.glob("*.md")) if marker in p.read_text()]
    if len(pages) != 1:
        where = ", ".join(str(p.relative_to(DOCS.parent)) for p in pages) or "no page"
        raise SystemExit(f"expected one docs/*.md page with {marker}, found {where}")
    update_doc(pages[0], section, markdown)
    return pages[0]


update_readme = update_docs  # the name other branches' scripts may still import (the tables left README.md)


def machine_line(info: dict) -> str:
    simd = "/".join(info.get("simd", [])) or "-"
    return (f"{info['cpu']} ({simd}), {info['cores']} cores, load average {info.get('load_average_1min', '?')}, "
            f"onnxruntime {info['onnxruntime']}, torch {info.get('torch', '-')}")


def publish(name: str, result: dict, table: list[str], readme: bool) -> Path:
    """Write bench/results/<name>.json, print the markdown table and, if `readme` (the name from when the tables
    lived in README.md), put it in its docs page."""
    path = write_result(name, result)
    print("\n".join(table))
    print(f"wrote {path}")
    if readme:
        print(f"updated {update_docs(name, chr(10).join(table))}")
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

        calibrate(engine_dir, images=training_images(), labels=list(CLASS_NAMES), source="demo training digits",
                  progress=True)
    return engine_dir
