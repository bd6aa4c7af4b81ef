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


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        pass
    import numpy
    import onnxruntime

    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": numpy.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def write_result(name: str, result: dict) -> Path:
    """bench/results/<name>.json with the machine and a timestamp beside the figures."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), **result}
    path.write_text(json.dumps(payload, indent=1))
    return path


def update_readme(section: str, markdown: str) -> None:
    """Replace the README text between <!-- bench:SECTION --> and <!-- /bench:SECTION -->."""
    text = README.read_text()
    start, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    README.write_text(f"{head}{start}\n{markdown.strip()}\n{end}{tail}")


def machine_line(info: dict) -> str:
    return f"{info['cpu']}, {info['cores']} cores, onnxruntime {info['onnxruntime']}, torch {info.get('torch', '-')}"
