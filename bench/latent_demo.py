"""The latent-space demo model (models/demo-latent: a trained AutoencoderKL + UNet on the digits at 32x32,
4x8x8 latents) through the whole product, in one run: the parity suite (fp32, fp16, INT8 calibrated on
training digits; tensors and held-out decisions against torch fp32), the zero-shot Diffusion Classifier
(the engine's race default), zero-shot DSD matching (bench/match.py's task and R@1) and a DifFormer head
trained on the training split, all on the held-out digits and ONNX Runtime CPU, beside the pixel demo's
Diffusion Classifier on the same images.

    .venv/bin/python bench/latent_demo.py [--parity-images 100] [--update-docs]

Writes bench/results/latent_demo.json; --update-docs fills docs/benchmarks.md's <!-- bench:latent_demo --> block.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_engine_all_precisions, machine, machine_line, publish  # noqa: E402
from heads import HEADS  # noqa: E402
from match import r_at_1  # noqa: E402

import diffscore  # noqa: E402
from diffscore.app.demo import DEMO_MODEL, cache_root  # noqa: E402
from diffscore.app.digits import CLASS_NAMES, load_digits_split  # noqa: E402

LATENT_MODEL = DEMO_MODEL.parent / "demo-latent"


def timed_classify(engine, images, **options) -> tuple[list, float]:
    engine.classify(images[:2], list(CLASS_NAMES), **options)  # warm-up: sessions, prompt cache
    start = time.perf_counter()
    results = engine.classify(images, list(CLASS_NAMES), **options)
    return results, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parity-images", type=int, default=100, help="held-out digits for the parity decisions")
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()

    import torch

    from diffscore.export.onnx_export import export_engine
    from diffscore.export.parity import run_parity
    from diffscore.reference.features import FeatureSpec
    from diffscore.reference.head_training import train_head_on_images
    from diffscore.reference.heads import save_head

    torch.set_num_threads(1)
    split = load_digits_split()
    images, truth = list(split.test_images), split.test_labels
    accuracy = lambda rs: float(np.mean([CLASS_NAMES.index(r.label) == t for r, t in zip(rs, truth)]))
    engine_dir = demo_engine_all_precisions(LATENT_MODEL)

    lines: list[str] = []
    parity_ok = run_parity(engine_dir, images=images[: args.parity_images], labels=list(CLASS_NAMES),
                           source="held-out digits", echo=lines.append)

    rows, engines = {}, {"latent": diffscore.load(engine_dir, backend="ort-cpu"),
                         "pixel": diffscore.load(demo_engine_all_precisions(DEMO_MODEL), backend="ort-cpu")}
    for name, engine in engines.items():
        results, seconds = timed_classify(engine, images)
        rows[f"Diffusion Classifier ({name} demo)"] = {
            "accuracy": accuracy(results), "passes_per_image": float(np.mean([r.passes for r in results])),
            "images_per_s": len(images) / seconds}
    r1, _ = r_at_1(engines["latent"], images, truth)
    rows["DSD matching, zero-shot (R@1 over 5 captions)"] = {"accuracy": r1}

    kind, blocks, steps = HEADS["difformer"]
    workdir = Path(tempfile.mkdtemp(prefix="bench-latent-"))
    head, config = train_head_on_images(LATENT_MODEL, list(split.train_images), split.train_labels, list(CLASS_NAMES),
                                        kind, FeatureSpec(blocks, steps), cache_dir=cache_root() / "features",
                                        progress=True)
    head_engine = diffscore.load(export_engine(LATENT_MODEL, workdir / "engine",
                                               heads=[save_head(head, config, workdir / kind)],
                                               show_progress=False), backend="ort-cpu")
    results, seconds = timed_classify(head_engine, images, method="head")
    rows[f"DifFormer head ({' + '.join(blocks)} at t = {', '.join(map(str, steps))})"] = {
        "accuracy": accuracy(results), "passes_per_image": len(steps), "images_per_s": len(images) / seconds}

    manifest = engines["latent"].manifest
    result = {"held_out_images": len(images), "parity_images": args.parity_images, "parity_passed": parity_ok,
              "parity": lines, "rows": rows, "latent_shape": manifest.sample_shape, "image_size": manifest.image_size,
              "calibration": manifest.calibration.gate if manifest.calibration else None}
    publish("latent_demo", result, readme_block(result, machine()).splitlines(), args.update_docs)


def readme_block(r: dict, info: dict) -> str:
    table = ["| method | held-out accuracy | UNet passes / image | images/s |", "|---|---:|---:|---:|"]
    for name, row in r["rows"].items():
        passes = f"{row['passes_per_image']:.1f}" if "passes_per_image" in row else "–"
        speed = f"{row['images_per_s']:.1f}" if "images_per_s" in row else "–"
        table.append(f"| {name} | {row['accuracy']:.2%} | {passes} | {speed} |")
    summary = r["parity"][-1] if r["parity"] else ""
    return "\n".join(table + [
        "", f"Parity on the latent engine (fp32, fp16, INT8; decisions on {r['parity_images']} held-out digits): "
        f"`{summary}`; the full report is in `bench/results/latent_demo.json`.",
        f"One run of `bench/latent_demo.py` on {r['held_out_images']} held-out digits, images "
        f"{r['image_size']}×{r['image_size']}, latents {'×'.join(map(str, r['latent_shape']))}, ONNX Runtime CPU fp32, "
        f"{machine_line(info)}."])


if __name__ == "__main__":
    main()
