"""The demo classification job through the torch reference and through the compiled engine
(ONNX Runtime CPU), in one run: images/s for each, the ratio, UNet passes per image, agreement.

    .venv/bin/python bench/classify.py [--limit N] [--update-readme]

The two paths alternate every 32 images, so background load affects both alike.
Writes bench/results/classify.json; --update-readme regenerates README's performance table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, publish  # noqa: E402

import diffscore  # noqa: E402
from diffscore.app.demo import DEMO_LOSS, DEMO_MODEL, DEMO_STAGES, demo_engine_dir  # noqa: E402
from diffscore.app.digits import CLASS_NAMES, DEFAULT_TEMPLATE, load_digits_split  # noqa: E402


CHUNK = 32  # images per alternation between the torch and the engine path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="first N held-out images (default: all)")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()

    import torch

    from diffscore.reference.classifier import classify_reference
    from diffscore.reference.loading import load_components

    split = load_digits_split()
    images, truth = list(split.test_images[: args.limit]), split.test_labels[: args.limit]
    opts = dict(stages=DEMO_STAGES, loss=DEMO_LOSS, seed=0)
    labels = list(CLASS_NAMES)

    comp = load_components(DEMO_MODEL)
    engine = diffscore.load(demo_engine_dir(), backend="ort-cpu")
    engine.classify(images[:2], labels, template=DEFAULT_TEMPLATE, **opts)  # warm-up: session + prompt cache
    # Interleave the two paths chunk by chunk, so any other load on the machine hits both alike.
    ref, got, torch_s, engine_s = [], [], 0.0, 0.0
    for lo in range(0, len(images), CHUNK):
        chunk = images[lo : lo + CHUNK]
        start = time.perf_counter()
        ref += classify_reference(comp, chunk, labels, templates=[DEFAULT_TEMPLATE], **opts)
        torch_s += time.perf_counter() - start
        start = time.perf_counter()
        got += engine.classify(chunk, labels, template=DEFAULT_TEMPLATE, **opts)
        engine_s += time.perf_counter() - start

    acc = lambda rs: float(np.mean([CLASS_NAMES.index(r.label) == t for r, t in zip(rs, truth)]))
    rows = {
        "torch reference": {"images_per_s": len(images) / torch_s, "accuracy": acc(ref), "seconds": torch_s},
        "engine, ONNX Runtime CPU fp32": {"images_per_s": len(images) / engine_s, "accuracy": acc(got), "seconds": engine_s},
    }
    result = {
        "images": len(images), "stages": DEMO_STAGES, "loss": DEMO_LOSS, "torch_threads": torch.get_num_threads(),
        "passes_per_image": float(np.mean([r.passes for r in got])),
        "speedup": torch_s / engine_s,
        "load_average_1min_at_end": os.getloadavg()[0],  # > cores means other jobs shared the machine
        "top1_agreement": float(np.mean([a.label == b.label for a, b in zip(got, ref)])),
        "rows": rows,
    }
    table = ["| path | images/s | accuracy | passes/image |", "|---|---:|---:|---:|"]
    for name, row in rows.items():
        table.append(f"| {name} | {row['images_per_s']:.2f} | {row['accuracy']:.2%} | {result['passes_per_image']:.0f} |")
    table.append("")
    table.append(f"Engine speed-up over torch: **{result['speedup']:.2f}x** (one run, {len(images)} held-out digits, "
                 f"stages {DEMO_STAGES}, paths interleaved every {CHUNK} images, top-1 agreement "
                 f"{result['top1_agreement']:.2%}, load average {result['load_average_1min_at_end']:.1f} at the end); "
                 f"measured on {machine_line(machine())} by `bench/classify.py`.")
    publish("classify", result, table, args.update_readme)


if __name__ == "__main__":
    main()
