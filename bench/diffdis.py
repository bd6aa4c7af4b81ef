"""DiffDis on the held-out demo digits, in one run: zero-shot classification accuracy and the matching
benchmark's R@1 (bench/match.py's task, imported), for both DiffDis inference modes beside DSD and the
Diffusion Classifier, with images/s, all on the compiled engine (ONNX Runtime CPU, fp32).

    .venv/bin/python bench/diffdis.py [--limit N] [--dc-limit N] [--epochs E] [--update-docs]

DiffDis is trained here (`train_diffdis_run`, seed 0, its defaults) on the demo's TRAINING split captioned
with 6 of the demo's 8 caption templates: "a handwritten digit {word}" and "the number {num}" are held
out (app/digits.py DIFFDIS_HELD_OUT_TEMPLATES), so the class prompts of the classification ("a handwritten
digit {}", the engine's template) and every caption of the matching task are texts its text stream never
saw in training. (The UNet itself, frozen, was trained on all 8 templates, as for DSD and the DC.)
Nothing is tuned on the held-out split: DiffDis's settings are its defaults, fixed before this run.

Re-measured in this run: DiffDis (both modes), DSD zero-shot with the engine's preset and the Diffusion
Classifier (classification: the demo's stages; matching: its ranking of the 5 captions is read, see
below). Read from bench/results/match.json and match_presets.json (earlier runs of bench/match.py, their
date and load in the note): DSD + denoising bias with the validated λ, DSD after prompt learning
(K = 1, 5, 10) and the DC's R@1, because re-training prompt learning takes ~10 minutes on this machine.
Writes bench/results/diffdis.json; --update-docs fills docs/benchmarks.md's <!-- bench:diffdis --> block.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared 2-core box: sleep, do not spin, in OpenMP waits

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, machine_line, publish, timed  # noqa: E402
import match as match_bench  # noqa: E402  (the matching task: captions_for, r_at_1)

import diffscore  # noqa: E402
from diffscore.app.demo import DEMO_LOSS, DEMO_MODEL, DEMO_STAGES  # noqa: E402
from diffscore.app.digits import (CLASS_NAMES, DEFAULT_TEMPLATE, DIFFDIS_HELD_OUT_TEMPLATES,  # noqa: E402
                                  diffdis_demo_pairs, load_digits_split)

SEED = 0
MODES = ("denoise", "generate")


def read_match_rows() -> tuple[list[dict], str]:
    """The R@1 rows of earlier bench/match.py runs that this run does not repeat, with their images/s."""
    rows, notes = [], []
    for name in ("match", "match_presets"):
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        n, timing, pl = data["images"], data.get("timing_s", {}), data.get("prompt_learning", {})
        for method, r in data["r_at_1"].items():
            if method.startswith("(e)") or any(r["method"] == method for r in rows):
                continue  # zero-shot DSD with the engine's (discffusion) preset: re-measured here; a row read twice
            seconds = (timing.get("bias_s") if method.startswith("(b)") else timing.get("dc_s") if method.startswith("(d)")
                       else next((t["eval_s"] for k, t in pl.items() if method.endswith(k.split(" (")[0])), None))
            rows.append({"method": method, "r_at_1": r, "images_per_s": n / seconds if seconds else None,
                         "source": f"bench/results/{name}.json"})
        notes.append(f"{name}.json: {data['date']}, load average {data['machine']['load_average_1min']}")
    return rows, "; ".join(notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N held-out images (default: all)")
    parser.add_argument("--dc-limit", type=int, default=None, help="the Diffusion Classifier on the first N only")
    parser.add_argument("--epochs", type=int, default=None, help="DiffDis training epochs at most (default: its own)")
    parser.add_argument("--parity-images", type=int, default=20)
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()

    import torch

    from diffscore.export.onnx_export import export_engine
    from diffscore.reference.diffdis import DiffDisTrainOptions, diffdis_scores_reference, train_diffdis_run
    from diffscore.reference.loading import load_components

    split = load_digits_split()
    images, labels = list(split.test_images[: args.limit]), split.test_labels[: args.limit]
    n = len(images)
    prompts = [DEFAULT_TEMPLATE.format(c) for c in CLASS_NAMES]
    load_start = os.getloadavg()[0]
    tmp = tempfile.TemporaryDirectory(prefix="diffdis-bench-")
    run_dir, engine_dir = Path(tmp.name) / "run", Path(tmp.name) / "engine"
    pairs = diffdis_demo_pairs()
    options = DiffDisTrainOptions(**({"epochs": args.epochs} if args.epochs else {}))
    model, train_s = timed(lambda: train_diffdis_run(
        DEMO_MODEL, pairs.images, pairs.captions, run_dir, seed=SEED, options=options, progress=True,
        data={"source": "demo digits, training split", "held_out_templates": list(DIFFDIS_HELD_OUT_TEMPLATES)}))
    trained_captions = set(pairs.captions)
    assert not trained_captions & set(prompts), "a class prompt was a training caption"
    assert not trained_captions & {c for y in range(10) for c in match_bench.captions_for(y)}, "a match caption was trained on"
    export_engine(DEMO_MODEL, engine_dir, diffdis=run_dir, show_progress=False,
                  defaults={"template": DEFAULT_TEMPLATE, "stages": [list(s) for s in DEMO_STAGES], "loss": DEMO_LOSS})
    eng = diffscore.load(engine_dir, backend="ort-cpu")
    eng.classify(images[:2], list(CLASS_NAMES), method="diffdis")  # open the DiffDis session before timing
    timing_load = os.getloadavg()[0]

    # --- zero-shot classification --------------------------------------------------------------------
    cls_rows = []
    for mode in MODES:
        res, s = timed(lambda: eng.classify(images, list(CLASS_NAMES), method="diffdis", diffdis_mode=mode, seed=SEED))
        acc = float(np.mean([r.label == CLASS_NAMES[y] for r, y in zip(res, labels)]))
        cls_rows.append({"method": f"DiffDis, {mode}" + (f" ({model.config.timesteps} shared (t, ε))" if mode == "denoise"
                                                          else f" ({model.config.generate_steps} DDIM steps)"),
                         "images": n, "accuracy": acc, "unet_passes": 1, "images_per_s": n / s})
    preset = eng.dsd_preset()
    uses_empty_prompt = bool(preset.bias_weight or preset.pool_unconditional)  # one more pass per timestep
    scores, s = timed(lambda: eng.match(images, prompts, seed=SEED))
    cls_rows.append({"method": f"DSD zero-shot ({eng.defaults.dsd_preset} preset, the engine's), 10 class prompts",
                     "images": n, "accuracy": float(np.mean(scores.scores.argmax(1) == labels)),
                     "unet_passes": len(scores.options.timesteps) * (len(prompts) + int(uses_empty_prompt)),
                     "images_per_s": n / s})
    dc_images = images[: args.dc_limit]
    res, s = timed(lambda: eng.classify(dc_images, list(CLASS_NAMES), stages=DEMO_STAGES, loss=DEMO_LOSS, seed=SEED))
    cls_rows.append({"method": f"Diffusion Classifier, stages {DEMO_STAGES}", "images": len(dc_images),
                     "accuracy": float(np.mean([r.label == CLASS_NAMES[y] for r, y in zip(res, labels)])),
                     "unet_passes": float(np.mean([r.passes for r in res])), "images_per_s": len(dc_images) / s})

    # --- matching (bench/match.py's task) --------------------------------------------------------------
    match_rows = []
    for mode in MODES:
        (r1, _), s = timed(lambda: match_bench.r_at_1(eng, images, labels, method="diffdis", diffdis_mode=mode))
        match_rows.append({"method": f"DiffDis, {mode}", "r_at_1": r1, "images_per_s": n / s, "source": "this run"})
    (r1, _), s = timed(lambda: match_bench.r_at_1(eng, images, labels))
    match_rows.append({"method": f"DSD zero-shot ({eng.defaults.dsd_preset} preset, the engine's)", "r_at_1": r1,
                       "images_per_s": n / s, "source": "this run"})
    read_rows, read_note = read_match_rows()
    match_rows += read_rows
    end_load = os.getloadavg()[0]

    # --- engine vs torch --------------------------------------------------------------------------------
    comp = load_components(DEMO_MODEL)
    few = images[: args.parity_images]
    parity = {}
    for mode in MODES:
        got = eng.match(few, prompts, method="diffdis", diffdis_mode=mode, seed=SEED).scores
        want = diffdis_scores_reference(comp, model, few, prompts, mode=mode, seed=SEED)
        parity[mode] = {"max_rel": float(np.abs(got - want).max() / np.abs(want).max()),
                        "decisions_agree": float(np.mean(got.argmax(1) == want.argmax(1)))}
    eng.close()

    cfg = model.config
    t = cfg.training
    result = {"images": n, "template": DEFAULT_TEMPLATE, "held_out_templates": list(DIFFDIS_HELD_OUT_TEMPLATES),
              "diffdis": {"blocks": cfg.blocks, "image_step": cfg.image_step, "dim": cfg.dim, "depth": cfg.depth,
                          "timesteps": cfg.timesteps, "generate_steps": cfg.generate_steps, "training": t,
                          "train_wall_s": train_s},
              "classification": cls_rows, "matching": match_rows, "read_from": read_note, "parity": parity,
              "load_average": {"start": load_start, "timing_start": timing_load, "end": end_load},
              "torch_threads": torch.get_num_threads()}

    def ips(v):
        return "–" if v is None else f"{v:.1f}" if v >= 10 else f"{v:.2f}"

    table = ["Zero-shot classification (10 digits, prompt \"a handwritten digit {}\", never a DiffDis training caption):", "",
             "| method | images | accuracy | UNet passes / image | images/s |", "|---|---:|---:|---:|---:|"]
    table += [f"| {r['method']} | {r['images']} | {r['accuracy']:.2%} | {r['unet_passes']:g} | {ips(r['images_per_s'])} |"
              for r in cls_rows]
    table += ["", "Matching (bench/match.py's task: own caption among 4 confusable digits' captions), R@1:", "",
              "| method | R@1 | images/s | measured |", "|---|---:|---:|---|"]
    table += [f"| {r['method']} | {r['r_at_1']:.2%} | {ips(r['images_per_s'])} | {r['source']} |" for r in match_rows]
    table += ["", f"DiffDis: frozen UNet, blocks {', '.join(cfg.blocks)} at t = {cfg.image_step}; text stream dim {cfg.dim}, "
              f"depth {cfg.depth}; trained on {t['pairs']} pairs ({t['images']} training digits x 6 templates, "
              f"{t['val_pairs']} validation pairs), best epoch {t['best_epoch']}, stopped after {t['epochs']} of at most "
              f"{t['max_epochs']}, validation loss "
              f"{t['val_loss']:.4f}, {train_s:.0f} s. Engine vs torch on {len(few)} digits: max rel. error "
              + ", ".join(f"{m} {p['max_rel']:.1e} (decisions {p['decisions_agree']:.0%})" for m, p in parity.items())
              + f". Rows marked with a results file are read from earlier runs ({read_note}); their images/s are from "
              f"those runs. One run, ONNX Runtime CPU fp32; load average {load_start:.1f} at the start, {timing_load:.1f} "
              f"when timing began, {end_load:.1f} at the end (2 cores shared with other jobs: compare images/s within "
              f"this run only). Measured on {machine_line(machine())} by `bench/diffdis.py`."]
    publish("diffdis", result, table, args.update_docs)


if __name__ == "__main__":
    main()
