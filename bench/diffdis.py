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

    .venv/bin/python bench/diffdis.py --unified [--unified-epochs E] [--per-class N] [--update-docs]

--unified: frozen vs unified DiffDis (issue 30) instead, one run: three runs trained on the same pairs (seed 0)
- frozen, the shipped default (fusion "memory" on down_blocks.1, mid_block, up_blocks.1),
- frozen, fusion "stages" on every block (the unified run's text stream on the untouched UNet: the architecture
  alone),
- unified (`train-diffdis --unified`: the UNet fine-tuned with the denoising loss + the text-diffusion loss, both
  weights 1),
each exported and measured on the engine (zero-shot accuracy and matching R@1, both modes, engine vs torch), and
the generation of the model's own UNet against the unified run's: the held-out denoising loss (test digits,
caption "a handwritten digit {word}", 10 timesteps on the grid 50, 150, ..., 950 with seeded ε shared by all
images) and the accuracy of a fixed digit classifier (scikit-learn logistic regression fitted once on the
training split's pixels) on images sampled from each UNet (diffusers' DDIM, 50 steps, classifier-free guidance
2, the same seeds for both, N per class). Writes bench/results/diffdis_unified.json and the
<!-- bench:diffdis_unified --> block.
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
            seconds = (timing.get("bias_s") if method.startswith("(b)")
                       else timing.get("dc_s") if method.startswith("(d)")
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
    parser.add_argument("--unified", action="store_true", help="frozen vs unified DiffDis (see above) instead")
    parser.add_argument("--unified-epochs", type=int, default=6, help="--unified: epochs at most of the UNet trainings "
                        "(the frozen ones: --epochs, default their own)")
    parser.add_argument("--per-class", type=int, default=30, help="--unified: sampled images per digit")
    parser.add_argument("--frozen-only", action="store_true", help="--unified: the two frozen runs only (e.g. at the "
                        "unified run's epoch cap: --epochs 5), written as diffdis_unified_frozen; no generation part")
    parser.add_argument("--results-name", default=None,
                        choices=("diffdis_unified", "diffdis_unified_20", "diffdis_unified_glyphs",
                                 "diffdis_unified_glyphs_30"),
                        help="--unified: results file and docs block (default: diffdis_unified, the 5-epoch run on "
                             "the digits; diffdis_unified_20: the run with --unified-epochs 20; "
                             "diffdis_unified_glyphs: --data glyphs; diffdis_unified_glyphs_30: its run with "
                             "--unified-epochs 30)")
    parser.add_argument("--captions-per-image", type=int, default=6, help="--unified: train on this many of each "
                        "training digit's 6 captions (drawn with seed 0; fewer: a cheaper run)")
    parser.add_argument("--data", choices=("digits", "glyphs"), default="digits",
                        help="--unified: the demo digits, or the 62-class glyph model's held-out typefaces "
                             "(models/fonts62; bench/tasks.py)")
    parser.add_argument("--train-images", type=int, default=None,
                        help="--unified: train on a seeded draw of this many training images (default: all)")
    args = parser.parse_args()
    if args.results_name is None:
        args.results_name = "diffdis_unified_glyphs" if args.data == "glyphs" else "diffdis_unified"
    if args.unified:
        return compare_unified(args)

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
    assert not trained_captions & {c for y in range(10) for c in match_bench.captions_for(y)}, \
        "a match caption was trained on"
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
        cls_rows.append({"method": f"DiffDis, {mode}"
                         + (f" ({model.config.timesteps} shared (t, ε))" if mode == "denoise"
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

    table = ["Zero-shot classification (10 digits, prompt \"a handwritten digit {}\", never a DiffDis training "
             "caption):", "",
             "| method | images | accuracy | UNet passes / image | images/s |", "|---|---:|---:|---:|---:|"]
    table += [f"| {r['method']} | {r['images']} | {r['accuracy']:.2%} | {r['unet_passes']:g} | "
              f"{ips(r['images_per_s'])} |"
              for r in cls_rows]
    table += ["", "Matching (bench/match.py's task: own caption among 4 confusable digits' captions), R@1:", "",
              "| method | R@1 | images/s | measured |", "|---|---:|---:|---|"]
    table += [f"| {r['method']} | {r['r_at_1']:.2%} | {ips(r['images_per_s'])} | {r['source']} |" for r in match_rows]
    table += ["",
              f"DiffDis: frozen UNet, blocks {', '.join(cfg.blocks)} at t = {cfg.image_step}; text stream dim "
              f"{cfg.dim}, depth {cfg.depth}; trained on {t['pairs']} pairs ({t['images']} training digits x 6 "
              f"templates, {t['val_pairs']} validation pairs), best epoch {t['best_epoch']}, stopped after "
              f"{t['epochs']} of at most {t['max_epochs']}, validation loss {t['val_loss']:.4f}, {train_s:.0f} s. "
              f"Engine vs torch on {len(few)} digits: max rel. error "
              + ", ".join(f"{m} {p['max_rel']:.1e} (decisions {p['decisions_agree']:.0%})" for m, p in parity.items())
              + f". Rows marked with a results file are read from earlier runs ({read_note}); their images/s are from "
              f"those runs. One run, ONNX Runtime CPU fp32; load average {load_start:.1f} at the start, "
              f"{timing_load:.1f} when timing began, {end_load:.1f} at the end (2 cores shared with other jobs: "
              f"compare images/s within this run only). Measured on {machine_line(machine())} by `bench/diffdis.py`."]
    publish("diffdis", result, table, args.update_docs)


# --- frozen vs unified (issue 30) -----------------------------------------------------------------------
GEN_STEPS = list(range(50, 1000, 100))  # timesteps of the held-out denoising loss
CONTROL = "control: the same fine-tune with text weight 0 (denoising loss only)"


def denoising_loss(comp, images, prompts: list[str]) -> float:
    """Mean MSE(ε̂, ε) over images x GEN_STEPS, ε seeded and shared by every image (the engine's convention)."""
    import torch

    from diffscore.engine.images import preprocess_batch
    from diffscore.kernels import shared_noise
    from diffscore.reference.loading import add_noise, encode_images, encode_prompts, epsilon_hat

    x0 = encode_images(comp, torch.from_numpy(preprocess_batch(images, comp.image_size, comp.image_channels)))
    eps = torch.from_numpy(shared_noise(SEED, len(GEN_STEPS), tuple(x0.shape[1:])))  # (K, C, H, W)
    emb = encode_prompts(comp, prompts)  # (N, L, D)
    losses = []
    with torch.no_grad():
        for k, t in enumerate(GEN_STEPS):
            x_t = add_noise(x0, eps[k], comp.alphas_cumprod, t)
            tt = torch.full((len(x0),), t)
            out = comp.unet(x_t, tt, encoder_hidden_states=emb).sample
            losses.append(float((epsilon_hat(comp, out, x_t, tt) - eps[k]).pow(2).mean()))
    return float(np.mean(losses))


def sampled_accuracy(comp, classifier, task, per_class: int) -> float:
    """Accuracy of the fixed classifier on per_class DDIM samples of each class prompt (seeds 0, 1, ...)."""
    from diffscore.reference.sampling import SampleOptions, sample, to_uint8

    labels = np.repeat(np.arange(task.class_count), per_class)
    prompts = [task.prompt(int(y), task.template) for y in labels]
    images = to_uint8(sample(comp, prompts, SampleOptions(sampler="ddim", steps=50, guidance=2.0, seed=SEED),
                             progress=True))
    return float(np.mean(classifier.predict(np.stack(images).reshape(len(images), -1) / 255.0) == labels))


def compare_unified(args) -> None:
    import dataclasses

    import torch
    from sklearn.linear_model import LogisticRegression

    from diffscore.export.onnx_export import export_engine
    from diffscore.reference.diffdis import (DiffDisTrainOptions, diffdis_scores_reference, image_branch,
                                             train_diffdis_run)
    from diffscore.reference.features import tappable_blocks
    from diffscore.reference.loading import load_components
    from diffscore.reference.prompt_learning import Pairs
    from tasks import TASKS

    torch.set_num_threads(1)  # a shared 2-core box: two threads thrash (measured ~8x slower training steps)
    task = TASKS[args.data]()
    images, labels = task.held_images[: args.limit], task.held_labels[: args.limit]
    n, noun = len(images), task.noun
    class_names = task.class_prompts("{}")  # the engine's labels; its template makes the prompts
    prompts = task.class_prompts()
    comp = load_components(task.model)
    load_start = os.getloadavg()[0]
    tmp = tempfile.TemporaryDirectory(prefix="diffdis-unified-")
    per = task.diffdis_captions_per_image  # each training image's captions in a row
    images_kept = np.random.default_rng(SEED).permutation(len(task.diffdis_images) // per)[: args.train_images]
    keep = np.concatenate([per * i + np.random.default_rng(SEED + i).permutation(per)[: args.captions_per_image]
                           for i in np.sort(images_kept)])
    pairs = Pairs([task.diffdis_images[i] for i in keep], [task.diffdis_captions[i] for i in keep])
    trained = set(pairs.captions)
    assert not trained & set(prompts), "a class prompt was a DiffDis training caption"
    assert not trained & {c for y in range(task.class_count) for c in task.captions_for(y)}, "a match caption trained"
    note = {**task.diffdis_note, "captions_per_image": min(per, args.captions_per_image),
            "training_images": len(images_kept)}
    variants = [("frozen (shipped default: memory fusion, 3 blocks)", {}, {}),
                ("frozen, stages fusion on every block", {"blocks": tappable_blocks(comp.unet), "fusion": "stages"},
                 {}),
                ("unified (UNet fine-tuned, stages fusion on every block)", {"unified": True}, {}),
                (CONTROL, {"unified": True}, {"text_weight": 0.0})][: 2 if args.frozen_only else None]
    rows, models = [], {}
    for name, kw, opts in variants:
        run_dir, engine_dir = Path(tmp.name) / f"run{len(models)}", Path(tmp.name) / f"engine{len(models)}"
        print(f"== {name}", flush=True)
        epochs = args.unified_epochs if kw.get("unified") else args.epochs or DiffDisTrainOptions.epochs
        model, train_s = timed(lambda: train_diffdis_run(
            task.model, pairs.images, pairs.captions, run_dir, seed=SEED, progress=True, data=note,
            options=DiffDisTrainOptions(epochs=epochs, **opts), **kw))
        models[name] = model
        print(json.dumps({"variant": name, "train_s": train_s, "training": model.config.training}), flush=True)
        if name == CONTROL:
            continue  # its text stream is untrained (text weight 0): only its UNet's generation is measured
        export_engine(task.model, engine_dir, diffdis=run_dir, show_progress=False, defaults=task.export_defaults)
        row = {"variant": name, "train_s": train_s, "training": model.config.training, "blocks": model.config.blocks,
               "fusion": model.config.fusion, "unified": model.config.unified}
        with diffscore.load(engine_dir, backend="ort-cpu") as eng:
            eng.classify(images[:2], class_names, method="diffdis")  # open the session before timing
            for mode in MODES:
                res, s = timed(lambda: eng.classify(images, class_names, method="diffdis", diffdis_mode=mode,
                                                    seed=SEED))
                got = np.array([class_names.index(r.label) for r in res])
                want = diffdis_scores_reference(comp, model, images, prompts, mode=mode, seed=SEED).argmax(1)
                scores = eng.match(images[:20], prompts, method="diffdis", diffdis_mode=mode, seed=SEED).scores
                ref = diffdis_scores_reference(comp, model, images[:20], prompts, mode=mode, seed=SEED)
                (r1, _), s_match = timed(lambda: match_bench.r_at_1(eng, images, labels, task.captions_for,
                                                                    method="diffdis", diffdis_mode=mode))
                row[mode] = {"accuracy": float(np.mean(got == labels)), "images_per_s": n / s, "r_at_1": r1,
                             "match_images_per_s": n / s_match, "decisions_agree": float(np.mean(got == want)),
                             "max_rel": float(np.abs(scores - ref).max() / np.abs(ref).max())}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("variant", *MODES)}), flush=True)

    if args.frozen_only:
        return publish_frozen(args, rows, n, load_start)

    # --- generation: the model's own UNet (every frozen run's) vs the unified run's ----------------------------
    flat = task.train_images.reshape(len(task.train_images), -1) / 255.0
    classifier = LogisticRegression(max_iter=5000).fit(flat, task.train_labels)
    held = np.stack(task.held_images)
    real_acc = float(np.mean(classifier.predict(held.reshape(len(held), -1) / 255.0) == task.held_labels))
    captions = [task.prompt(int(y), task.template) for y in labels]
    generation = []
    for name, c in (("the model's own UNet (frozen DiffDis)", comp),
                    ("the unified run's UNet",
                     dataclasses.replace(comp, unet=image_branch(comp, models[variants[2][0]]))),
                    ("the control's UNet (text weight 0)",
                     dataclasses.replace(comp, unet=image_branch(comp, models[CONTROL])))):
        generation.append({"unet": name, "held_out_denoising_loss": denoising_loss(c, images, captions),
                           "sampled_accuracy": sampled_accuracy(c, classifier, task, args.per_class)})
        print(json.dumps(generation[-1]), flush=True)
    end_load = os.getloadavg()[0]

    result = {"data": task.name, "model": str(task.model.relative_to(task.model.parents[1])), "images": n,
              "template": task.template, "training_data": note, "variants": rows, "generation": generation,
              "classifier_real_test_accuracy": real_acc,
              "generation_setup": {"denoising_timesteps": GEN_STEPS, "sampler": "ddim", "steps": 50, "guidance": 2.0,
                                   "per_class": args.per_class, "classifier": "LogisticRegression on training pixels"},
              "load_average": {"start": load_start, "end": end_load}, "torch_threads": torch.get_num_threads()}
    table = ["| DiffDis | denoise: accuracy | denoise: R@1 | generate: accuracy | generate: R@1 | images/s "
             "(classify, denoise) | training |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        t = r["training"]
        extra = (f", val. generation {t['val_generation']:.4f}, text {t['val_text']:.4f}" if r["unified"] else "")
        table.append(f"| {r['variant']} | {r['denoise']['accuracy']:.2%} | {r['denoise']['r_at_1']:.2%} | "
                     f"{r['generate']['accuracy']:.2%} | {r['generate']['r_at_1']:.2%} | "
                     f"{r['denoise']['images_per_s']:.1f} | best epoch {t['best_epoch']} of {t['epochs']}, "
                     f"{r['train_s']:.0f} s{extra} |")
    ctl = (f"best epoch {models[CONTROL].config.training['best_epoch']} of {models[CONTROL].config.training['epochs']}")
    table += ["", f"| UNet | held-out denoising loss | fixed classifier's accuracy on sampled {noun}s |",
              "|---|---:|---:|"]
    table += [f"| {g['unet']} | {g['held_out_denoising_loss']:.4f} | {g['sampled_accuracy']:.2%} |" for g in generation]
    parity = "; ".join(f"{r['variant'].split(' (')[0]}: " + ", ".join(
        f"{m} {r[m]['max_rel']:.1e} ({r[m]['decisions_agree']:.0%} decisions)" for m in MODES) for r in rows)
    source = (f"{args.captions_per_image} of each training digit's {per} captions" if per > 1 else
              f"{len(images_kept)} training glyphs (a seeded draw) with their typeface's style caption")
    table += ["", f"{n} held-out {noun}s of `{result['model']}` (accuracy: {task.class_count} class prompts "
              f"\"{task.template}\"; R@1: the image's own caption against its 4 confusable classes'), none of them a "
              f"DiffDis training caption; all three trained on the same {rows[0]['training']['pairs']} pairs "
              f"({source}), seed 0, early stopping on the validation loss, the frozen ones at most "
              f"{args.epochs or DiffDisTrainOptions.epochs} epochs, the unified one (UNet lr 1e-4, text stream 1e-3) "
              f"at most {args.unified_epochs}. Control (same fine-tune, text weight 0): {ctl}. Generation: held-out "
              f"denoising loss over t = 50, 150, ..., 950 (seeded ε shared by all images); {args.per_class} DDIM "
              f"samples (50 steps, guidance 2) per class, read by a logistic regression fitted on the training pixels "
              f"({real_acc:.2%} on the real held-out {noun}s). Engine (ONNX Runtime CPU fp32) vs torch, max rel. "
              f"error of the scores on 20 {noun}s and decisions on all {n}: {parity}. One run; load average "
              f"{load_start:.1f} at the start, {end_load:.1f} at the end (images/s comparable within this run only). "
              f"Measured on {machine_line(machine())} by `bench/diffdis.py --unified"
              + (f" --data {task.name}`." if task.name != "digits" else "`.")]
    publish(args.results_name, result, table, args.update_docs)


def publish_frozen(args, rows: list[dict], n: int, load_start: float) -> None:
    """--frozen-only: the frozen runs' rows, at the epoch cap given."""
    import torch

    from diffscore.reference.diffdis import DiffDisTrainOptions

    table = ["| DiffDis (frozen) | denoise: accuracy | denoise: R@1 | generate: accuracy | generate: R@1 | training |",
             "|---|---:|---:|---:|---:|---|"]
    table += [f"| {r['variant']} | {r['denoise']['accuracy']:.2%} | {r['denoise']['r_at_1']:.2%} | "
              f"{r['generate']['accuracy']:.2%} | {r['generate']['r_at_1']:.2%} | best epoch "
              f"{r['training']['best_epoch']} of {r['training']['epochs']}, {r['train_s']:.0f} s |" for r in rows]
    end_load = os.getloadavg()[0]
    table += ["",
              f"The same {n} held-out digits and pairs ({args.captions_per_image} of each training digit's 6 captions, "
              f"seed 0), the frozen runs capped at {args.epochs or DiffDisTrainOptions.epochs} epochs. One run; load "
              f"average {load_start:.1f} at the start, {end_load:.1f} at the end. Measured on "
              f"{machine_line(machine())} by `bench/diffdis.py --unified --frozen-only`."]
    publish("diffdis_unified_frozen", {"images": n, "variants": rows, "torch_threads": torch.get_num_threads(),
                                       "load_average": {"start": load_start, "end": end_load}}, table, args.update_docs)


if __name__ == "__main__":
    main()
