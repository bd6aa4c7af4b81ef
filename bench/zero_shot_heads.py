"""Heads trained without human labels next to the zero-shot Diffusion Classifier, on the held-out demo digits, in one \
run.

    .venv/bin/python bench/zero_shot_heads.py [--update-docs]

Two label-free routes, beside the supervised heads of bench/heads.py (same blocks, steps and training options):
- synthetic: the demo model generates N ∈ {10, 50, 200} images per digit (DPM-Solver++, 10 steps, guidance 2,
  the sampler's defaults, fixed before any run), prompt = the demo's template; the sets are nested (the first
  N of each digit's 200 are exactly what `train-head --synthesize N` makes);
- pseudo-labels: the demo engine's Diffusion Classifier (its default strategy, the profiled race) labels the
  1,347 training digits *without* their labels; decisions below 1 standard error of confidence (the
  `--min-confidence` default) are left out (how right the left-out ones were is reported).
Nothing is tuned on the 450 held-out digits (the true training labels are only used to report how right the
pseudo-labels were). Each head is a DifFormer head and a linear probe. All heads ship in one engine; the DC (the
demo's fixed stages, and the engine's race) and the heads alternate every CHUNK held-out images on ONNX
Runtime CPU. Writes bench/results/zero_shot_heads.json and zero_shot_samples.png (a grid of the generated
digits); --update-docs regenerates its docs/benchmarks.md block.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch threads sleep, not spin, between jobs

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, machine_line, publish  # noqa: E402
from heads import BLOCKS, CHUNK, STEPS  # noqa: E402  (the supervised heads' blocks and steps)

import diffscore  # noqa: E402
from diffscore.app.demo import DEMO_MODEL, DEMO_STAGES, cache_root, demo_engine_dir  # noqa: E402
from diffscore.app.digits import CLASS_NAMES, DEFAULT_TEMPLATE, load_digits_split  # noqa: E402

PER_CLASS = (10, 50, 200)  # synthetic images per digit
THRESHOLD = 1.0  # pseudo-labels: least confidence kept (train-head's default)
KINDS = ("difformer", "linear")  # the supervised bench's best head and its cheapest
GRID = 8  # generated samples per digit in docs/benchmarks.md's picture


def sample_grid(images: list, per_class: int, path: Path, show: int = GRID, scale: int = 6) -> Path:
    """The first `show` samples of every digit: one column per digit, upscaled without smoothing."""
    from PIL import Image

    pad = lambda a: np.pad(a, 1)  # noqa: E731
    grid = np.concatenate([np.concatenate([pad(images[c * per_class + j]) for c in range(len(CLASS_NAMES))], 1)
                           for j in range(show)], 0)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a quick check of this script: few images, 2 epochs, "
                        "figures meaningless, docs untouched")
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # generation and training share the machine; the timed part is the engine's
    from diffscore.engine.manifest import HeadTraining, folder_sha256
    from diffscore.export.onnx_export import export_engine
    from diffscore.reference.features import FeatureSpec, cached_features
    from diffscore.reference.head_training import TrainOptions, train_head
    from diffscore.reference.heads import HeadConfig, save_head
    from diffscore.reference.loading import load_components
    from diffscore.reference.pseudo_labels import pseudo_label
    from diffscore.reference.sampling import SampleOptions, synthesize

    load_start = os.getloadavg()[0]
    split = load_digits_split()
    test_images, truth = list(split.test_images), split.test_labels
    labels = list(CLASS_NAMES)
    comp = load_components(DEMO_MODEL)
    sha = folder_sha256(DEMO_MODEL)
    spec = FeatureSpec(BLOCKS, STEPS)
    dc_engine_dir = demo_engine_dir()  # the shipped demo engine: demo stages, race default with its profile
    options = TrainOptions(epochs=2 if args.smoke else TrainOptions.epochs)
    per_class = (2, 3, 5) if args.smoke else PER_CLASS
    train_images, train_labels = (split.train_images[: 40 if args.smoke else None],
                                  split.train_labels[: 40 if args.smoke else None])
    if args.smoke:
        test_images, truth = test_images[:20], truth[:20]

    # The model's own samples: 200 per digit once; N = 10 and 50 are their first N per digit.
    sample_options = SampleOptions()
    start = time.perf_counter()
    synthetic, synthetic_y, synthetic_record = synthesize(comp, labels, max(per_class), DEFAULT_TEMPLATE,
                                                          sample_options, progress=True)
    generation_s = time.perf_counter() - start
    grid = sample_grid(synthetic, max(per_class), RESULTS / f"zero_shot_samples{'_smoke' if args.smoke else ''}.png",
                       show=min(GRID, max(per_class)))

    # The engine's decisions on the training digits, their labels withheld.
    start = time.perf_counter()
    pseudo = pseudo_label(dc_engine_dir, list(train_images), labels, THRESHOLD, backend="ort-cpu", progress=True)
    pseudo_s = time.perf_counter() - start
    everything = np.arange(len(train_images))
    kept = pseudo.kept
    right = pseudo.decided == train_labels
    pseudo_info = {"images": len(everything), "seconds": pseudo_s, "strategy": pseudo.record.strategy,
                   "passes_per_image": float(pseudo.passes.mean()), "threshold": THRESHOLD, "kept": len(kept),
                   "kept_per_class": np.bincount(pseudo.decided[kept], minlength=len(labels)).tolist(),
                   "correct_all": float(right.mean()), "correct_kept": float(right[kept].mean()),
                   "correct_left_out": (float(right[np.setdiff1d(everything, kept)].mean())
                                        if len(kept) < len(everything) else None),
                   "confidence_quantiles": {f"{q:g}": float(np.quantile(pseudo.confidence, q))
                                            for q in (0.1, 0.25, 0.5, 0.75, 0.9)}}

    train_feats = cached_features(comp, list(train_images), spec, cache_root() / "features", sha, progress=True)
    synth_feats = cached_features(comp, synthetic, spec, cache_root() / "features", sha, progress=True)
    first = lambda n: np.concatenate([np.arange(c * max(per_class), c * max(per_class) + n)
                                      for c in range(len(labels))])  # noqa: E731
    routes = {  # name: (features, rows, label indices, record)
        "supervised": (train_feats, everything, train_labels, HeadTraining("labels", images=len(everything))),
        **{f"synthetic-{n}": (synth_feats, first(n), synthetic_y[first(n)],
                              replace(synthetic_record, images=len(labels) * n, per_class=n))
           for n in per_class},
        "pseudo": (train_feats, kept, pseudo.decided[kept], pseudo.record),
    }
    workdir = Path(tempfile.mkdtemp(prefix="bench-zero-shot-"))
    trained, rows = [], {}
    for route, (feats, idx, y, record) in routes.items():
        for kind in KINDS:
            name = f"{route}-{kind}"
            config = HeadConfig(kind=kind, labels=labels, features=spec,
                                shapes=[list(feats[b].shape[2:]) for b in BLOCKS], source_sha256=sha, origin=record)
            t0 = time.perf_counter()
            head = train_head({b: feats[b][idx] for b in BLOCKS}, y, config, options, progress=True)
            trained.append(save_head(head, config, workdir / name))
            rows[name] = {"route": route, "kind": kind, "training_images": len(idx),
                          "training_s": time.perf_counter() - t0, "training": config.training}

    engine_dir = export_engine(DEMO_MODEL, workdir / "engine", heads=trained, show_progress=False)
    heads_engine = diffscore.load(engine_dir, backend="ort-cpu")
    dc_engine = diffscore.load(dc_engine_dir, backend="ort-cpu")
    dc_runs = {"stages": dict(stages=DEMO_STAGES), "race": dict(strategy="race")}  # fixed stages; the engine's default
    for run in dc_runs.values():  # warm-up: sessions, prompt cache
        dc_engine.classify(test_images[:2], labels, **run)
    for name in rows:
        heads_engine.classify(test_images[:2], method="head", head=name)

    load_timed = os.getloadavg()[0]
    dc = {k: [] for k in dc_runs}
    dc_s = dict.fromkeys(dc_runs, 0.0)
    got = {name: [] for name in rows}
    head_s = dict.fromkeys(rows, 0.0)
    for lo in range(0, len(test_images), CHUNK):
        chunk = test_images[lo : lo + CHUNK]
        for k, run in dc_runs.items():
            t0 = time.perf_counter()
            dc[k] += dc_engine.classify(chunk, labels, **run)
            dc_s[k] += time.perf_counter() - t0
        for name in rows:
            t0 = time.perf_counter()
            got[name] += heads_engine.classify(chunk, method="head", head=name)
            head_s[name] += time.perf_counter() - t0
    load_end = os.getloadavg()[0]

    accuracy = lambda rs: float(np.mean([labels.index(r.label) == t for r, t in zip(rs, truth)]))  # noqa: E731
    n = len(test_images)
    dc_rows = {k: {"accuracy": accuracy(rs), "passes_per_image": float(np.mean([r.passes for r in rs])),
                   "images_per_s": n / dc_s[k], "seconds": dc_s[k]} for k, rs in dc.items()}
    for name, row in rows.items():
        row.update(accuracy=accuracy(got[name]), passes_per_image=len(STEPS), images_per_s=n / head_s[name],
                   **{f"speedup_vs_dc_{k}": n / head_s[name] / dc_rows[k]["images_per_s"] for k in dc_runs},
                   manifest_training=heads_engine.manifest.heads[name].training.describe())
    label_free = {k: v for k, v in rows.items() if v["route"] != "supervised"}
    best = max(label_free, key=lambda k: label_free[k]["accuracy"])
    gate = {"head": best, "accuracy": rows[best]["accuracy"],
            "speedup_vs_dc_stages": rows[best]["speedup_vs_dc_stages"],
            "required_accuracy": 0.97, "required_speedup": 100.0}
    gate["passed"] = gate["accuracy"] >= 0.97 and gate["speedup_vs_dc_stages"] >= 100
    result = {
        "held_out_images": n, "chunk": CHUNK, "blocks": BLOCKS, "steps": STEPS, "template": DEFAULT_TEMPLATE,
        "sampler": {"sampler": sample_options.sampler, "steps": sample_options.steps,
                    "guidance": sample_options.guidance,
                    "seed": sample_options.seed, "images": len(synthetic), "seconds": generation_s,
                    "ms_per_image": 1000 * generation_s / len(synthetic), "torch_threads": 1},
        "pseudo_labels": pseudo_info, "diffusion_classifier": dc_rows, "heads": rows, "gate": gate,
        "sample_grid": str(grid.relative_to(RESULTS.parent.parent)),
        "load_average_1min": {"start": load_start, "timed_start": load_timed, "end": load_end},
    }
    publish("zero_shot_heads" + ("_smoke" if args.smoke else ""), result, readme_block(result, machine()).splitlines(),
            args.update_docs and not args.smoke)


def readme_block(r: dict, info: dict) -> str:
    dc, heads, s, p, load = (r["diffusion_classifier"], r["heads"], r["sampler"], r["pseudo_labels"],
                             r["load_average_1min"])
    kind = {"difformer": "DifFormer head", "linear": "linear probe"}
    trained_on = {"supervised": lambda h: f"{h['training_images']:,} labelled training digits",
                  "pseudo": lambda h: f"{h['training_images']:,} training digits, DC labels with confidence ≥ "
                                      f"{p['threshold']:g}",
                  }
    lines = ["| method | trained on | human labels | held-out accuracy | UNet passes / image | images/s | vs DC stages "
             "| vs DC race |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for k, title in (("stages", f"fixed stages {' → '.join(str(tuple(x)) for x in DEMO_STAGES)}"),
                     ("race", "race (engine default)")):
        d = dc[k]
        lines.append(f"| Diffusion Classifier, {title} | nothing | none | {d['accuracy']:.2%} | "
                     f"{d['passes_per_image']:.0f} | {d['images_per_s']:.2f} | "
                     f"{d['images_per_s'] / dc['stages']['images_per_s']:.2f}× | "
                     f"{d['images_per_s'] / dc['race']['images_per_s']:.2f}× |")
    for name, h in heads.items():
        route = h["route"]
        what = (f"{h['training_images']:,} generated digits ({h['training_images'] // 10} per class)"
                if route.startswith("synthetic")
                else trained_on[route](h))
        humans = f"{h['training_images']:,}" if route == "supervised" else "none"
        lines.append(f"| {kind[h['kind']]} | {what} | {humans} | {h['accuracy']:.2%} | "
                     f"{h['passes_per_image']} | {h['images_per_s']:.0f} | **{h['speedup_vs_dc_stages']:.0f}×** | "
                     f"{h['speedup_vs_dc_race']:.0f}× |")
    g = r["gate"]
    q = p["confidence_quantiles"]
    lines += ["",
              f"Done-when gate (a head with no human labels ≥ 97 % held-out at ≥ 100× the DC's images/s): best "
              f"label-free head {g['head']}, {g['accuracy']:.2%} at {g['speedup_vs_dc_stages']:.0f}× the fixed-stage "
              f"DC: **{'passed' if g['passed'] else 'not met'}**.",
              f"Generation: {s['images']:,} digits ({s['sampler']}, {s['steps']} steps, guidance {s['guidance']:g}, "
              f"torch, {s['torch_threads']} thread) in {s['seconds']:.0f} s, {s['ms_per_image']:.0f} ms per image. "
              f"Pseudo-labels: the engine's {p['strategy']} labelled {p['images']:,} training digits in "
              f"{p['seconds']:.0f} s ({p['passes_per_image']:.0f} UNet passes each); {p['kept']:,} kept at confidence "
              f"≥ {p['threshold']:g} (confidence quartiles {q['0.25']:.1f} / {q['0.5']:.1f} / {q['0.75']:.1f}); "
              f"measured afterwards against the withheld labels, {p['correct_all']:.2%} of all decisions were right, "
              f"{p['correct_kept']:.2%} of those kept"
              + (f", {p['correct_left_out']:.2%} of those left out." if p["correct_left_out"] is not None else "."),
              f"One run of `bench/zero_shot_heads.py` on {r['held_out_images']} held-out digits (ONNX Runtime CPU "
              f"fp32; DC and heads alternating every {r['chunk']} images; every head reads {' + '.join(r['blocks'])} "
              f"at t = {', '.join(map(str, r['steps']))}; 1-min load average {load['start']:.1f} at the start, "
              f"{load['timed_start']:.1f} when timing began, {load['end']:.1f} at the end; the machine is shared with "
              f"other jobs, so ratios within the run are the figure), {machine_line(info)}.",
              "", f"![generated training digits, {GRID} per class](../bench/results/zero_shot_samples.png)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
