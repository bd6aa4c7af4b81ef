"""Where each method stands on a task that is not saturated: held-out accuracy on the 62-class glyph model
(models/fonts62, held-out typefaces), one table, one run.

    .venv/bin/python bench/fonts62_methods.py [--dsd N] [--update-docs]

The held-out glyphs are bench/cascade.py's seeded draw (its exhaustive rows are reused from its cache: run it
first). Diffusion Classifier rows (exhaustive, fixed stages, race, cascade) are replayed on those rows with the
engine's drivers. Heads, all on the model's own features (down_blocks.1 + mid_block at t = 50, 200: 2 UNet
passes an image), exported with the model into one engine and run on ONNX Runtime CPU: the linear probe (and with
--difformer a DifFormer head) trained on the training typefaces' labelled glyphs; a label-free linear probe trained
on images the model generates itself (SampleOptions' defaults, 10 per class, prompt = the class name: no human
label).
DSD (`match` against the 62 class names) on the first --dsd glyphs: each preset at its own defaults, and the
default preset after its few-shot prompt learning (5 training glyphs a class, bench/match.py's settings). DiffDis
(frozen UNet, its default options; text stream trained on 2,000 training glyphs captioned with their typeface's
style, never the plain class names it is scored on) on every held-out glyph, alone and as the cascade's
shortlister (k = 3, 5; replayed). OpenVINO parity: the
head and the cascade on the OpenVINO backend against ONNX Runtime's decisions. Nothing is tuned on the held-out
glyphs. Writes bench/results/fonts62_methods.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from cascade import (FIXED, FONTS_MODEL, HEAD_BLOCKS, HEAD_STEPS, RACE, engine_with_head, fixed_name,  # noqa: E402
                     grid_errors, replay_cascade, replay_race, replay_stages)
from common import machine, machine_line, publish  # noqa: E402

import diffscore  # noqa: E402
from diffscore.app.demo import cache_root  # noqa: E402
from diffscore.kernels import race_plan  # noqa: E402
from diffscore.kernels.cascade import CascadeConfig  # noqa: E402
from diffscore.reference.prompt_learning import Pairs, PromptLearningConfig  # noqa: E402

SYNTHETIC_PER_CLASS = 10
# bench/match.py's prompt-learning settings (chosen there on the digits' validation slice), 5 glyphs a class
PROMPT_LEARNING = PromptLearningConfig(shots=5, steps=300, lr=3e-3, seed=0, preset="discffusion")
DIFFDIS_IMAGES = 2000  # a seeded draw of training glyphs for DiffDis's text stream (its own default options)
RECALL_K = (1, 2, 3, 5, 8, 10, 20)


def dsd_engine(root: Path, preset: str, adapters: PromptLearningConfig | None, pool) -> Path:
    """The glyph model exported with a DSD preset (and a prompt-learning LoRA trained on `pool`), cached."""
    from diffscore.export.onnx_export import export_engine
    from diffscore.reference.prompt_learning import train_prompts

    name = f"dsd-{preset}" + (f"-pl{adapters.shots}x{adapters.steps}" if adapters else "")
    engine_dir = root / f"{name}-engine"
    if (engine_dir / "manifest.json").is_file():
        return engine_dir
    run_dir = None
    if adapters:
        run_dir = root / name
        if not (run_dir / "adapter.safetensors").is_file():
            train_prompts(FONTS_MODEL, pool, run_dir, adapters, progress=True, overwrite=True)
    return export_engine(FONTS_MODEL, engine_dir, dsd_preset=preset, adapters=run_dir, overwrite=True,
                         defaults={"template": "{}", "loss": "l2"}, show_progress=False)


def diffdis_glyph_engine(root: Path) -> Path:
    """The glyph model exported with a frozen-UNet DiffDis trained (defaults, seed 0) on a seeded draw of training
    glyphs captioned with their typeface's style (bench/tasks.py: never the plain class names scored here)."""
    from tasks import glyphs

    from diffscore.export.onnx_export import export_engine
    from diffscore.reference.diffdis import train_diffdis_run

    engine_dir, run_dir = root / f"diffdis-{DIFFDIS_IMAGES}-engine", root / f"diffdis-{DIFFDIS_IMAGES}"
    if (engine_dir / "manifest.json").is_file():
        return engine_dir
    task = glyphs()
    keep = np.sort(np.random.default_rng(0).permutation(len(task.diffdis_images))[:DIFFDIS_IMAGES])
    train_diffdis_run(FONTS_MODEL, [task.diffdis_images[i] for i in keep], [task.diffdis_captions[i] for i in keep],
                      run_dir, seed=0, progress=True, overwrite=True, data=task.diffdis_note)
    return export_engine(FONTS_MODEL, engine_dir, diffdis=run_dir, overwrite=True, show_progress=False,
                         defaults={"template": "{}", "loss": "l2"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fonts", type=int, default=228, help="held-out glyphs (bench/cascade.py's draw and rows)")
    ap.add_argument("--difformer", action="store_true", help="also train and score a DifFormer head")
    ap.add_argument("--dsd", type=int, default=30, help="held-out glyphs DSD scores (62 texts x its steps passes each)")
    ap.add_argument("--int8", action="store_true",
                    help="also calibrate an INT8 UNet (200 training glyphs) and check it")
    ap.add_argument("--update-docs", action="store_true")
    args = ap.parse_args()
    from fonts_data import CLASS_NAMES, arrays, build

    from diffscore.engine.manifest import folder_sha256
    from diffscore.export.onnx_export import export_engine
    from diffscore.reference.features import FeatureSpec
    from diffscore.reference.head_training import TrainOptions, train_head_on_images
    from diffscore.reference.heads import save_head
    from diffscore.reference.loading import load_components
    from diffscore.reference.sampling import SampleOptions, synthesize

    labels = list(CLASS_NAMES)
    data = arrays(build())
    train, test = data["train"], data["held_out"]
    probe_engine = engine_with_head(FONTS_MODEL, "fonts62", list(train["images"]), train["labels"], labels,
                                    {"template": "{}", "loss": "l2"})  # bench/cascade.py's engine: its rows, its probe
    pick = np.sort(np.random.default_rng(0).permutation(len(test["labels"]))[: args.fonts])
    images, truth = list(test["images"][pick]), test["labels"][pick]
    rows = []

    def add(method, how, decided, passes, n=None, note=""):
        decided = np.asarray(decided)
        rows.append({"method": method, "how": how, "images": int(n or len(decided)),
                     "accuracy": float(np.mean(decided == truth[: len(decided)])), "passes_per_image": float(passes),
                     "note": note})
        print(rows[-1], flush=True)

    # Diffusion Classifier, replayed on the exhaustive rows
    errors = grid_errors(probe_engine, FONTS_MODEL, images, labels, "fonts")
    engine = diffscore.load(probe_engine, backend="ort-cpu")
    scores = engine.head_logits(images).astype(np.float64)
    exhaustive = errors.mean(axis=2).argmin(axis=1)
    shortlisters = {"linear probe": scores}  # -> how often each one's top k holds the exhaustive decision
    add("Diffusion Classifier, exhaustive (62 classes x 100 timesteps)", "replay", exhaustive, 6200)
    for stages in FIXED[:2]:
        w, p = replay_stages(errors, stages)
        add(f"Diffusion Classifier, {fixed_name(stages)}", "replay", w, p.mean())
    w, p = replay_race(errors, race_plan(1000, 100)[1])
    add(f"Diffusion Classifier, race z={RACE.z:g}", "replay", w, p.mean())
    for config in (CascadeConfig(k=3, mass=None), CascadeConfig(k=5, mass=0.99)):
        w, p = replay_cascade(errors, scores, config, None, len(HEAD_STEPS))
        add(f"cascade k={config.k}" + (f" mass={config.mass:g}" if config.mass else "") + " (linear probe shortlists)",
            "replay", w, p.mean())

    # Heads: supervised (linear probe, DifFormer) and label-free (synthetic), one engine, trained on this model
    # folder (its content hash, which a head records, covers the model card too)
    spec = FeatureSpec(HEAD_BLOCKS, HEAD_STEPS)
    comp = load_components(FONTS_MODEL)
    root = cache_root() / "cascade" / f"fonts62-methods-{folder_sha256(FONTS_MODEL)[:12]}"
    if not (root / "probe").is_dir():
        head, config = train_head_on_images(FONTS_MODEL, list(train["images"]), train["labels"], labels, "linear",
                                            spec, TrainOptions(), root / "features", progress=True, comp=comp)
        save_head(head, config, root / "probe")
    heads, what = [root / "probe"], ["linear probe (labelled training glyphs)"]
    difformer = root / "difformer"
    t0 = time.perf_counter()
    if args.difformer:  # minutes of training on a shared 2-core machine: opt-in
        if not difformer.is_dir():
            head, config = train_head_on_images(FONTS_MODEL, list(train["images"]), train["labels"], labels,
                                                "difformer", spec, TrainOptions(), root / "features", progress=True,
                                                comp=comp)
            save_head(head, config, difformer)
        heads.append(difformer)
        what.append("DifFormer head (labelled training glyphs)")
    difformer_s = time.perf_counter() - t0
    synthetic_dir = root / f"synthetic-{SYNTHETIC_PER_CLASS}"
    t0 = time.perf_counter()
    if not synthetic_dir.is_dir():
        synth, synth_y, _ = synthesize(comp, labels, SYNTHETIC_PER_CLASS, "{}", SampleOptions(), progress=True)
        head, config = train_head_on_images(FONTS_MODEL, synth, synth_y, labels, "linear", spec, TrainOptions(),
                                            root / "features", progress=True, comp=comp)
        save_head(head, config, synthetic_dir)
    synthetic_s = time.perf_counter() - t0
    heads.append(synthetic_dir)
    what.append(f"label-free linear probe (trained on {SYNTHETIC_PER_CLASS} generated images a class)")
    engine_dir = root / ("methods-engine-difformer" if args.difformer else "methods-engine")
    if not (engine_dir / "manifest.json").is_file():
        export_engine(FONTS_MODEL, engine_dir, heads=heads, defaults={"template": "{}", "loss": "l2"}, overwrite=True,
                      show_progress=False)
    methods = diffscore.load(engine_dir, backend="ort-cpu")
    for name, text in zip([h.name for h in heads], what):  # a head is named after its folder
        results = methods.classify(images, method="head", head=name)
        add(f"head: {text}", "engine", [labels.index(r.label) for r in results], results[0].passes)
    if args.difformer:  # the better head as the cascade's shortlister: the same two settings as the probe's above
        difformer_scores = methods.head_logits(images, "difformer").astype(np.float64)
        shortlisters["DifFormer head"] = difformer_scores
        for config in (CascadeConfig(k=3, mass=None), CascadeConfig(k=5, mass=0.99)):
            w, p = replay_cascade(errors, difformer_scores, config, None, len(HEAD_STEPS))
            add(f"cascade k={config.k}" + (f" mass={config.mass:g}" if config.mass else "") +
                " (DifFormer head shortlists)", "replay", w, p.mean())

    # DSD, image against the 62 class names: each preset at its own defaults (an export bakes the preset's layers
    # in), and the default preset after its few-shot prompt learning; DiffDis (frozen UNet) in one pass
    t0 = time.perf_counter()
    pool = Pairs(list(train["images"]), [labels[y] for y in train["labels"]])
    for preset, adapters in (("discffusion", None), ("diffscore", None), ("discffusion", PROMPT_LEARNING)):
        eng = diffscore.load(dsd_engine(root, preset, adapters, pool), backend="ort-cpu")
        match = eng.match(images[:1], labels)  # its options
        steps, bias = len(match.options.timesteps), match.options.bias_weight
        scores_path = root / f"dsd-{preset}{'-pl' if adapters else ''}-{steps}steps-{args.dsd}.npy"
        if not scores_path.is_file():  # 62 (+1) texts x steps passes a glyph
            np.save(scores_path, np.asarray(eng.match(images[: args.dsd], labels, progress=True)))
        what = (f"after prompt learning (K = {adapters.shots} glyphs a class, {adapters.steps} steps, lr "
                f"{adapters.lr:g})" if adapters else "zero-shot")
        add(f"DSD {what} (preset {preset}, {steps} steps, bias weight {bias:g})", "engine",
            np.load(scores_path).argmax(axis=1), steps * (len(labels) + bool(bias or preset == "discffusion")),
            note=f"first {args.dsd} glyphs")
    dsd_s = time.perf_counter() - t0
    diffdis_engine = diffdis_glyph_engine(root)
    with diffscore.load(diffdis_engine, backend="ort-cpu") as eng:
        results = eng.classify(images, labels, method="diffdis", seed=0)
        add(f"DiffDis, frozen UNet ({eng.manifest.diffdis.mode} mode; text stream trained on {DIFFDIS_IMAGES} "
            "training glyphs' style captions)", "engine", [labels.index(r.label) for r in results], results[0].passes)
        diffdis_scores = np.asarray(eng.match(images, labels, method="diffdis", seed=0), dtype=np.float64)
    shortlisters["DiffDis"] = diffdis_scores
    for k in (3, 5):
        w, p = replay_cascade(errors, diffdis_scores, CascadeConfig(k=k, mass=None), None, 1)
        add(f"cascade k={k} (DiffDis shortlists)", "replay", w, p.mean())

    # OpenVINO (fp32) and INT8 parity: decisions against ONNX Runtime fp32's
    n = 30
    jobs = {"head probe": (images, dict(method="head", head="probe")),
            f"cascade k=3 (first {n})": (images[:n], dict(labels=labels, strategy="cascade", head="probe", mass=1.0,
                                                           k=3))}
    reference = {name: [r.label for r in methods.classify(ims, **kw)] for name, (ims, kw) in jobs.items()}
    parity = {}
    for backend, precision in (("openvino", "fp32"), ("ort-cpu", "int8")):
        key = f"{'OpenVINO' if backend == 'openvino' else 'ONNX Runtime'} {precision}"
        if precision == "int8" and not args.int8:
            continue
        try:
            if precision == "int8" and not (engine_dir / "unet.int8.onnx").is_file():
                from diffscore.calibration.pipeline import calibrate

                calib = [train["images"][i] for i in np.random.default_rng(0).permutation(len(train["labels"]))[:200]]
                calibrate(engine_dir, images=calib, labels=labels, source="200 training glyphs", validation=0,
                          progress=True)
            other = diffscore.load(engine_dir, backend=backend, precision=precision)
            for name, (ims, kw) in jobs.items():
                got = [r.label for r in other.classify(ims, **kw)]
                same = int(sum(x == y for x, y in zip(got, reference[name])))
                parity[f"{key}, {name}"] = {"images": len(got), "same": same}
        except Exception as e:  # noqa: BLE001 - reported, not fatal: OpenVINO and INT8 are optional
            parity[key] = {"error": f"{type(e).__name__}: {e}"}
    # the cascade agrees with the exhaustive decision at most where the shortlist holds it
    rank = {name: (np.argsort(-v, axis=1, kind="stable") == exhaustive[:, None]).argmax(axis=1)
            for name, v in shortlisters.items()}
    recall = {name: {k: float(np.mean(r < k)) for k in RECALL_K} for name, r in rank.items()}
    result = {"rows": rows, "held_out_glyphs": len(images), "parity_vs_ort_fp32": parity,
              "exhaustive_decision_in_top_k": recall,
              "training_s": {"difformer": difformer_s, "synthetic": synthetic_s}, "dsd_s": dsd_s}
    table = render(result, machine())
    publish("fonts62_methods", result, table, readme=False)
    if args.update_docs:
        update_docs(table)


def render(result: dict, info: dict) -> list[str]:
    table = ["| method | run | held-out glyphs | accuracy | UNet passes/image |", "|---|---|---:|---:|---:|"]
    table += [f"| {r['method']} | {r['how']} | {r['images']} | {100 * r['accuracy']:.1f} % | "
              f"{r['passes_per_image']:.1f} |" for r in result["rows"]]
    parity = result["parity_vs_ort_fp32"]
    table += ["", "Same decisions as ONNX Runtime fp32: " + "; ".join(
        f"{k}: {v['error']}" if "error" in v else f"{k} {v['same']}/{v['images']}" for k, v in parity.items()) + "."]
    recall = result.get("exhaustive_decision_in_top_k", {})
    if recall:
        table += ["", "How often the exhaustive Diffusion Classifier's decision is among a shortlister's top k (the "
                  "cascade's agreement cannot exceed it):", "",
                  "| shortlister | " + " | ".join(f"k={k}" for k in next(iter(recall.values()))) + " |",
                  "|---|" + "---:|" * len(next(iter(recall.values())))]
        table += [f"| {name} | " + " | ".join(f"{100 * v:.1f} %" for v in r.values()) + " |"
                  for name, r in recall.items()]
        table += [""]
    table += [f"Machine: {machine_line(info)}."]
    return table


def update_docs(table: list[str]) -> None:
    path = Path(__file__).resolve().parents[1] / "docs" / "cascade.md"
    text = path.read_text()
    start, end = "<!-- bench:fonts62_methods -->", "<!-- /bench:fonts62_methods -->"
    head, rest = text.split(start)
    _, tail = rest.split(end)
    path.write_text(head + start + "\n" + "\n".join(table) + "\n" + end + tail)


if __name__ == "__main__":
    main()
