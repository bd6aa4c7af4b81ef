"""The demo classification job through the torch reference and through the compiled engine on every
CPU backend and precision (ONNX Runtime fp32/int8, OpenVINO fp32/bf16/int8), in one run: images/s for
each, the ratios, UNet passes per image, agreement.

    .venv/bin/python bench/classify.py [--limit N] [--update-docs]

The torch rows are the reference as strong as torch runs it on CPU: torch.inference_mode, its batch of
256 UNet pairs, the intra-op thread count (1 or one per core) timed faster on two images first (on a
shared, oversubscribed machine one thread wins by far: OpenMP threads wait on each other), eager and
with `torch.compile(unet, dynamic=True)` (compiled before timing); the faster one is the baseline. The paths take \
turns every 32 images, so
background load affects all alike.
Writes bench/results/classify.json; --update-docs regenerates its docs/benchmarks.md performance table.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_engine_all_precisions, machine, machine_line, publish  # noqa: E402

import diffscore  # noqa: E402
from diffscore.app.demo import DEMO_LOSS, DEMO_MODEL, DEMO_STAGES  # noqa: E402
from diffscore.app.digits import CLASS_NAMES, DEFAULT_TEMPLATE, load_digits_split  # noqa: E402
from diffscore.engine.images import IMAGE_WINDOW  # noqa: E402


CHUNK = 32  # images per turn of each path
TORCH = "torch reference (inference_mode"
ORT_FP32 = "engine, ONNX Runtime fp32"


def fastest_torch_threads(run, images) -> int:
    """1 or one intra-op thread per core, whichever classifies `images` faster here (after a warm-up)."""
    import torch

    options, rates = sorted({1, os.cpu_count() or 1}), {}
    for threads in [options[0]] + options:  # the first run warms up
        torch.set_num_threads(threads)
        start = time.perf_counter()
        with torch.inference_mode():
            run(images)
        rates[threads] = time.perf_counter() - start
    best = min(rates, key=rates.get)
    torch.set_num_threads(best)
    return best


def cpu_variants() -> list[tuple[str, str, str]]:
    """(row name, backend, precision) of every CPU engine path here: OpenVINO rows when it is installed,
    bf16 where the CPU has bf16 instructions."""
    from diffscore.engine.backends.openvino import cpu_has_bf16, openvino_version

    found = [("ONNX Runtime fp32", "ort-cpu", "fp32"), ("ONNX Runtime int8", "ort-cpu", "int8")]
    if openvino_version():
        found += [("OpenVINO fp32", "openvino", "fp32"), ("OpenVINO int8", "openvino", "int8")]
        found += [("OpenVINO bf16", "openvino", "bf16")] if cpu_has_bf16() else []
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="first N held-out images (default: all)")
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()

    import torch

    from diffscore.reference.classifier import classify_reference
    from diffscore.reference.loading import load_components

    split = load_digits_split()
    images, truth = list(split.test_images[: args.limit]), split.test_labels[: args.limit]
    opts = dict(stages=DEMO_STAGES, loss=DEMO_LOSS, seed=0)
    labels = list(CLASS_NAMES)

    comp = load_components(DEMO_MODEL)
    torch_threads = fastest_torch_threads(lambda chunk: classify_reference(
        comp, chunk, labels, templates=[DEFAULT_TEMPLATE], **opts), images[:2])
    engine_dir = demo_engine_all_precisions()
    engines = {f"engine, {name}": diffscore.load(engine_dir, backend=backend, precision=precision)
               for name, backend, precision in cpu_variants()}
    threads = f"{torch_threads} thread{'s' * (torch_threads > 1)}"
    compiled = copy.copy(comp)
    compiled.unet = torch.compile(comp.unet, dynamic=True)  # inductor; compiled on the warm-up below (minutes)
    paths = {f"{TORCH}, {threads})": lambda chunk: classify_reference(comp, chunk, labels, templates=[DEFAULT_TEMPLATE],
                                                                      **opts),
             f"{TORCH}, {threads}, torch.compile)": lambda chunk: classify_reference(
                 compiled, chunk, labels, templates=[DEFAULT_TEMPLATE], **opts)}
    with torch.inference_mode():
        start = time.perf_counter()
        paths[f"{TORCH}, {threads}, torch.compile)"](images[:IMAGE_WINDOW])
        compile_s = time.perf_counter() - start
    torch_rows = list(paths)
    for name, engine in engines.items():
        # Warm-up on one full image window: sessions, prompt cache and every UNet batch shape the job uses
        # (OpenVINO compiles one model per batch-size bucket on first use; it is cached on disk for later loads).
        engine.classify(images[:IMAGE_WINDOW], labels, template=DEFAULT_TEMPLATE, **opts)
        paths[name] = lambda chunk, engine=engine: engine.classify(chunk, labels, template=DEFAULT_TEMPLATE, **opts)
    # Interleave the paths chunk by chunk, so any other load on the machine hits all alike.
    got, seconds, loads = {name: [] for name in paths}, dict.fromkeys(paths, 0.0), []
    for lo in range(0, len(images), CHUNK):
        chunk = images[lo : lo + CHUNK]
        for name, run in paths.items():
            start = time.perf_counter()
            with torch.inference_mode():
                got[name] += run(chunk)
            seconds[name] += time.perf_counter() - start
        loads.append(os.getloadavg()[0])
        print(f"{lo + len(chunk)}/{len(images)}: "
              + ", ".join(f"{n} {len(got[n]) / s:.2f}/s" for n, s in seconds.items()), flush=True)

    torch_row = min(torch_rows, key=seconds.get)  # the strongest torch row is the baseline
    acc = lambda rs: float(np.mean([CLASS_NAMES.index(r.label) == t for r, t in zip(rs, truth)]))
    agree = lambda a, b: float(np.mean([x.label == y.label for x, y in zip(got[a], got[b])]))
    rows = {name: {"images_per_s": len(images) / s, "speedup_over_torch": seconds[torch_row] / s,
                   "ratio_to_ort_fp32": seconds[ORT_FP32] / s, "accuracy": acc(got[name]),
                   "agreement_with_torch": agree(name, torch_row), "agreement_with_ort_fp32": agree(name, ORT_FP32),
                   "seconds": s} for name, s in seconds.items()}
    best = max(engines, key=lambda n: rows[n]["images_per_s"])
    reduced = [n for n in engines if n.endswith(("int8", "bf16")) and rows[n]["agreement_with_ort_fp32"] >= 0.99]
    best_reduced = max(reduced, key=lambda n: rows[n]["images_per_s"], default=None)
    result = {
        "images": len(images), "stages": DEMO_STAGES, "loss": DEMO_LOSS, "torch_threads": torch.get_num_threads(),
        "torch_row": torch_row, "torch_compile_first_call_s": compile_s,
        "passes_per_image": float(np.mean([r.passes for r in got[ORT_FP32]])),
        "workers": {n: e.workers for n, e in engines.items()},
        "best_engine": best, "speedup": rows[best]["speedup_over_torch"],
        "best_int8_or_bf16": best_reduced,
        "best_int8_or_bf16_over_ort_fp32": best_reduced and rows[best_reduced]["ratio_to_ort_fp32"],
        "load_average_1min_per_chunk": loads,  # > cores means other jobs shared the machine
        "rows": rows,
    }
    table = ["| path | images/s | x torch | x ORT fp32 | accuracy | agreement with torch | agreement with ORT fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        table.append(f"| {name} | {row['images_per_s']:.2f} | {row['speedup_over_torch']:.2f}x | "
                     f"{row['ratio_to_ort_fp32']:.2f}x | {row['accuracy']:.2%} | {row['agreement_with_torch']:.2%} | "
                     f"{row['agreement_with_ort_fp32']:.2%} |")
    table.append("")
    reduced_text = (f"best INT8/bf16 at ≥ 99% agreement: {best_reduced}, "
                    f"**{result['best_int8_or_bf16_over_ort_fp32']:.2f}x** "
                    "ONNX Runtime fp32" if best_reduced
                    else "no INT8/bf16 row reached 99% agreement with ONNX Runtime fp32")
    table.append(f"Best engine path: {best}, **{result['speedup']:.2f}x** the faster torch row ({torch_row}; "
                 f"torch.compile's first call took {compile_s:.0f} s); {reduced_text}. One run, {len(images)} held-out "
                 f"digits, stages {DEMO_STAGES}, {result['passes_per_image']:.0f} UNet passes per image, paths "
                 f"interleaved every {CHUNK} images; load average {min(loads):.1f}-{max(loads):.1f} during the run (2 "
                 f"cores shared with other jobs: ratios, not absolute rates, are the figure); measured on "
                 f"{machine_line(machine())} by `bench/classify.py`.")
    publish("classify", result, table, args.update_docs)


if __name__ == "__main__":
    main()
