"""UniDiff-style fine-tuning on the demo digits (issue 18), one run: R@1 on the matching benchmark
(bench/match.py's task: every held-out digit against its own caption and 4 confusable digits'),
held-out 10-way classification accuracy (the image against all 10 class captions), and the held-out
denoising loss, for K = 1, 5, 10 shots per class with ITC alone, ITC + IS and ITC + IS + RSC, beside
zero-shot DSD and the Diffusion Classifier on the plain demo engine; images/s of `match(method="itc")`
against DSD on the same images and captions. Everything is scored on the compiled engine (ONNX Runtime
CPU); the held-out denoising loss in torch (4 seeded (t, ε) per image, its own caption).

    .venv/bin/python bench/finetune.py [--limit N] [--shots 1 5 10] [--train-steps S] [--update-docs]
    (the docs' run: --limit 100 --train-steps 80, to fit the shared 2-core machine; --render-only re-renders it)

Nothing is tuned on the held-out split: the shots come from the training split minus bench/match.py's
validation slice; early stopping uses 2 more training pairs per class. Fine-tuning settings are the
`diffscore finetune` defaults (lr 3e-3, batch 32, mid_block at t = 50, 64-d embeddings), chosen before
any run; DSD prompt-learning figures are bench/match.py's own (bench/results/match*.json), cited, not rerun.

Writes bench/results/finetune.json; --update-docs fills docs/benchmarks.md's <!-- bench:finetune --> section.

With --clip CLIP_DIR (issue 30: UniDiff as published, `finetune --clip`), one run of the CLIP ablations instead:
ITC / ITC+IS / ITC+IS+RSC at K = 1, 5, 10 and each --clip-lrs value (the default 1e-4 and a 10x stress setting,
both fixed before any run), served from the exported engine (`match(method="itc")` on the fine-tuned CLIP
towers, ONNX Runtime CPU). Per run: R@1 (bench/match.py's 5-caption task) and 10-way accuracy with the
fine-tuning captions' template; the same accuracy averaged over the 7 training templates the fine-tuning never
saw (retrieval of unseen captions: the shipped CLIP knew them); semantic collapse as the held-out image
embeddings' mean pairwise cosine (1 = one point) and effective rank (exp of the entropy of the centred
embeddings' normalised singular values); the held-out denoising loss of the UNet (torch). The shipped CLIP
before fine-tuning is the first row (scored in torch: parity puts the engine within 1e-6 of it).

    .venv/bin/python bench/finetune.py --clip models/demo-clip [--update-docs]
    (writes bench/results/finetune_clip.json and docs/methods.md's <!-- bench:finetune_clip --> section)
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
from common import RESULTS, machine, machine_line, publish, timed, update_docs  # noqa: E402
from match import dc_r_at_1, r_at_1  # noqa: E402

import diffscore  # noqa: E402
from diffscore.app.demo import DEMO_LOSS, DEMO_MODEL, DEMO_STAGES  # noqa: E402
from diffscore.app.digits import CLASS_NAMES, DEFAULT_TEMPLATE, caption  # noqa: E402

SHOTS = (1, 5, 10)
ABLATIONS = (("itc",), ("itc", "is"), ("itc", "is", "rsc"))
SEED = 0
DENOISE_T = 4  # seeded (t, ε) per held-out image for the denoising loss


def bench_data(limit: int | None, data: str = "digits"):
    """(held-out images, labels, their captions, the fine-tuning pairs) of a bench/tasks.py task: its held-out images
    (the first `limit`), and its fine-tuning pool (digits: the training split minus bench/match.py's validation
    slice), captioned with the task's template."""
    from tasks import TASKS

    task = TASKS[data]()
    images, labels = task.held_images[:limit], task.held_labels[:limit]
    return images, labels, [task.prompt(int(y), task.template) for y in labels], task.finetune_pairs


def accuracy(engine, images, labels, **options) -> float:
    """10-way held-out classification: the class caption with the best match score."""
    scores = np.asarray(engine.match(images, [caption(c, DEFAULT_TEMPLATE) for c in range(10)], seed=SEED, **options))
    return float((scores.argmax(axis=1) == labels).mean())


def render(result: dict, info: dict) -> list[str]:
    """The docs/benchmarks.md table and notes, from a result (so a stored run can be re-rendered: --render-only)."""
    rows, speed, cited, load, n = (result[k]
                                   for k in ("rows", "speed", "prompt_learning_cited", "load_average", "images"))
    table = ["| method | K | R@1 (5 captions) | accuracy (10 classes) | held-out denoising loss |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        r1 = "–" if r["r_at_1"] is None else f"{r['r_at_1']:.2%}"
        table.append(
            f"| {r['method']} | {r['shots'] or '–'} | {r1} | {r['accuracy']:.2%} | {r['denoising_loss']:.4f} |")
    for file, found in cited.items():
        for key, v in found.items():
            table.append(f"| {key[4:]} (cited: `bench/match.py`'s own run on all 450 held-out digits, {file}) | "
                         f"{key.split('K=')[-1].split()[0]} | {v:.2%} | – | – |")
    trained = [r for r in rows if "steps_run" in r]
    last = next((r for r in trained if r.get("dsd_r_at_1_after") is not None), None)
    return table + [
        "",
        f"`match(method=\"itc\")` {speed['itc_images_per_s']:.1f} images/s against DSD's "
        f"{speed['dsd_images_per_s']:.1f} on "
        f"the same images and 5 captions: **{speed['ratio']:.0f}×** (one UNet pass per image against 6 prompts × 10 "
        "timesteps)." + (f" DSD on the fine-tuned UNet (K={last['shots']}, ITC+IS+RSC) scores R@1 "
                         f"{last['dsd_r_at_1_after']:.2%}." if last else ""),
        f"One run of `bench/finetune.py`: {n} held-out digits, ≤ {result['train_steps']} steps per fine-tuning run "
        f"(validation every 25 steps on 2 training pairs per class; steps run: "
        f"{', '.join(str(r['steps_run']) for r in trained)}; best (kept) step: "
        f"{', '.join(str(r['best_step']) for r in trained)}), torch 1 thread; load average {load['before']:.1f} "
        f"before, {load['training']:.1f} when training began, {load['end']:.1f} at the end (2 cores shared with other "
        f"jobs); {machine_line(info)}."]


# --- UniDiff with CLIP (--clip) ----------------------------------------------------------------------
CLIP_LRS = (1e-4, 1e-3)  # `finetune --clip-lr`: its default, and 10x as a stress setting where collapse is likelier
CLIP_RESULTS = {"digits": "finetune_clip", "glyphs": "finetune_clip_glyphs"}  # --clip: results file and docs block


def collapse(z: np.ndarray) -> dict:
    """Spread of L2-normalised embeddings: mean pairwise cosine (1 = collapsed to a point) and effective rank of
    the centred embeddings (Roy & Vetterli 2007: exp of the entropy of the normalised singular values)."""
    n = len(z)
    mean_cos = float(((z @ z.T).sum() - n) / (n * (n - 1)))
    s = np.linalg.svd(z - z.mean(axis=0), compute_uv=False)
    p = s / s.sum()
    return {"mean_pairwise_cosine": mean_cos, "effective_rank": float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))}


def clip_row(task, scorer, embed, images, labels) -> dict:
    """The CLIP metrics of one model: scorer(images, texts) -> (N, T) scores; embed(images) -> (N, d) unit rows."""
    class Matcher:  # bench/match.py's r_at_1 calls engine.match(images, texts, seed=...)
        def match(self, imgs, texts, **_):
            return scorer(imgs, texts)

    def acc(template):
        scores = np.asarray(scorer(images, task.class_prompts(template)))
        return float((scores.argmax(axis=1) == labels).mean())

    unseen = {t: acc(t) for t in task.unseen_templates}
    return {"r_at_1": r_at_1(Matcher(), images, labels, task.captions_for)[0], "accuracy_seen": acc(task.template),
            "accuracy_unseen": float(np.mean(list(unseen.values()))), "accuracy_unseen_per_template": unseen,
            **collapse(np.asarray(embed(images), dtype=np.float64))}


def render_clip(result: dict, info: dict) -> list[str]:
    table = ["| model | CLIP lr | K | R@1 (5 captions) | accuracy, seen captions | accuracy, unseen captions | "
             "mean pairwise cosine | effective rank | held-out denoising loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lr = f"{r['clip_lr']:g}" if r.get("clip_lr") else "–"
        table.append(f"| {r['method']} | {lr} | {r['shots'] or '–'} | {r['r_at_1']:.2%} | {r['accuracy_seen']:.2%} | "
                     f"{r['accuracy_unseen']:.2%} | {r['mean_pairwise_cosine']:.3f} | {r['effective_rank']:.2f} | "
                     f"{r['denoising_loss']:.4f} |")
    trained = [r for r in result["rows"] if "steps_run" in r]
    load = result["load_average"]
    if "parity" in result:
        p = result["parity"]
        table += ["", f"Parity of the served CLIP path ({p['run']}, {p['images']} held-out images × the run's "
                  "captions, ONNX engine against transformers' CLIPModel in torch):"]
        table += [f"- `{c['verdict']}`" for c in p["checks"]]
    data = result.get("data", "digits")
    what = ("digits" if data == "digits" else
            "glyphs (models/fonts62, held-out typefaces; shots: the training glyphs' class names; R@1: the own class "
            "name against its 4 confusable classes' (bench/tasks.py))")
    flag = f" --data {data}" if data != "digits" else ""
    return table + ["", f"One run of `bench/finetune.py --clip {result['clip']}{flag}`: {result['images']} held-out "
                    f"{what}, "
                    f"≤ {result['train_steps']} steps per run (validation every 25 steps on 2 training pairs per "
                    "class; "
                    f"steps run: {', '.join(str(r['steps_run']) for r in trained)}; best (kept) step: "
                    f"{', '.join(str(r['best_step']) for r in trained)}), torch 1 thread; load average "
                    f"{load['before']:.1f} before, {load['end']:.1f} at the end; {machine_line(info)}."]


def clip_parity(engine_dir: Path, images) -> list[dict]:
    """`diffscore parity`'s CLIP check on every held-out image: the served scores against transformers' CLIP (fp32
    max relative error) and the top-1 caption decisions (agreement), per backend."""
    from diffscore.engine.manifest import Manifest
    from diffscore.export.clip_itc import clip_itc_parity

    return [{"verdict": str(v), "passed": v.passed, "measured": v.measured, "decisions": v.decisions}
            for v in clip_itc_parity(engine_dir, Manifest.load(engine_dir), images)]


def parity_only(args) -> None:
    """One run (K = max shots, ITC+IS+RSC, the first CLIP lr), its engine's parity on every held-out digit, merged into
    the stored bench/results/finetune_clip.json (for a result made before the parity check was part of the run)."""
    from diffscore.export.onnx_export import export_engine
    from diffscore.reference.finetune import FinetuneConfig, finetune

    from tasks import TASKS

    model, name = TASKS[args.data]().model, CLIP_RESULTS[args.data]
    images, _, _, pairs = bench_data(None, args.data)
    work = Path(tempfile.mkdtemp(prefix="bench-finetune-clip-parity-"))
    cfg = FinetuneConfig(shots=max(args.shots), steps=args.train_steps, seed=SEED, clip=str(args.clip),
                         clip_lr=args.clip_lrs[0])
    finetune(model, pairs, work / "run", cfg, progress=True)
    engine_dir = export_engine(model, work / "engine", adapters=work / "run", show_progress=False)
    stored = json.loads((RESULTS / f"{name}.json").read_text())
    stored["parity"] = {"run": f"K={cfg.shots} ITC+IS+RSC, CLIP lr {cfg.clip_lr:g}",
                        "checks": clip_parity(engine_dir, images), "images": len(images), "machine": machine()}
    (RESULTS / f"{name}.json").write_text(json.dumps(stored, indent=1))  # the main run's machine and date kept
    table = render_clip(stored, stored["machine"])
    print("\n".join(table))
    if args.update_docs:
        update_docs(name, "\n".join(table))


def clip_main(args) -> None:
    import torch

    from diffscore.engine.scorers.itc import image_embeddings
    from diffscore.export.onnx_export import export_engine
    from diffscore.reference.clip_finetune import clip_image_embeddings, clip_similarity
    from diffscore.reference.finetune import FinetuneConfig, denoising_loss, finetune
    from diffscore.reference.loading import load_components
    from tasks import TASKS

    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    task = TASKS[args.data]()
    images, labels, held_captions, pairs = bench_data(args.limit, args.data)
    work = Path(tempfile.mkdtemp(prefix="bench-finetune-clip-"))
    base_loss = denoising_loss(load_components(task.model), images, held_captions, DENOISE_T, SEED)
    rows = [{"method": "shipped CLIP, not fine-tuned", "shots": 0, "denoising_loss": base_loss,
             **clip_row(task, lambda i, t: clip_similarity(args.clip, i, t),
                        lambda i: clip_image_embeddings(args.clip, i), images, labels)}]
    print(json.dumps(rows[-1]), flush=True)
    for lr in args.clip_lrs:
        for k in args.shots:
            for objectives in ABLATIONS:
                name = "+".join(o.upper() for o in objectives)
                tag = f"lr{lr:g}-k{k}-{'-'.join(objectives)}"
                comp = load_components(task.model)
                cfg = FinetuneConfig(objectives=objectives, shots=k, steps=args.train_steps, seed=SEED,
                                     clip=str(args.clip), clip_lr=lr)
                run = finetune(task.model, pairs, work / f"run-{tag}", cfg, progress=True, comp=comp)
                loss = denoising_loss(comp, images, held_captions, DENOISE_T, SEED)  # the LoRA active, unmerged
                engine_dir = export_engine(task.model, work / f"engine-{tag}", adapters=work / f"run-{tag}",
                                           show_progress=False)
                with diffscore.load(engine_dir, backend="ort-cpu") as engine:
                    row = clip_row(task, lambda i, t: engine.match(i, t, method="itc").scores,
                                   lambda i: image_embeddings(engine, i), images, labels)
                rows.append({"method": f"UniDiff {name} with CLIP", "clip_lr": lr, "shots": k, "denoising_loss": loss,
                             **row, "steps_run": run["steps_run"], "best_step": run["best_step"],
                             "train_s": run["wall_time_s"]})
                print(json.dumps(rows[-1]), flush=True)
    parity = {"run": f"K={k} {name}, CLIP lr {lr:g}", "checks": clip_parity(engine_dir, images), "images": len(images)}
    result = {"data": task.name, "clip": str(args.clip), "images": len(images), "template": task.template,
              "parity": parity, "unseen_templates": task.unseen_templates, "seed": SEED,
              "train_steps": args.train_steps, "denoising_timesteps_per_image": DENOISE_T, "rows": rows,
              "torch_threads": 1, "load_average": {"before": load_before, "end": os.getloadavg()[0]}}
    publish(CLIP_RESULTS[task.name], result, render_clip(result, machine()), args.update_docs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N held-out images (default: all)")
    parser.add_argument("--shots", type=int, nargs="+", default=list(SHOTS))
    parser.add_argument("--train-steps", type=int, default=150, help="fine-tuning steps at most (early stopping)")
    parser.add_argument("--dc-r-at-1", action="store_true", help="also the Diffusion Classifier's R@1 (140 UNet passes "
                        "per image; bench/match.py row (d) has it)")
    parser.add_argument("--update-docs", action="store_true")
    parser.add_argument("--render-only", action="store_true", help="re-render bench/results/finetune.json, no run")
    parser.add_argument("--clip", type=Path, default=None, help="UniDiff with this CLIP folder (finetune --clip) "
                        "instead: writes finetune_clip.json")
    parser.add_argument("--clip-lrs", type=float, nargs="+", default=list(CLIP_LRS), help="--clip: CLIP learning rates")
    parser.add_argument("--data", choices=("digits", "glyphs"), default="digits", help="--clip: the demo digits, or "
                        "the 62-class glyph model's held-out typefaces (models/fonts62 with --clip "
                        "models/fonts62-clip; writes finetune_clip_glyphs.json)")
    parser.add_argument("--parity-only", action="store_true", help="--clip: one run's parity on every held-out image, "
                        "merged into the stored finetune_clip.json (finetune_clip_glyphs.json with --data glyphs)")
    args = parser.parse_args()
    if args.render_only:
        name = CLIP_RESULTS[args.data] if args.clip else "finetune"
        stored = json.loads((RESULTS / f"{name}.json").read_text())
        table = (render_clip if args.clip else render)(stored, stored["machine"])
        print("\n".join(table))
        if args.update_docs:
            update_docs(name, "\n".join(table))
        return
    if args.clip:
        return parity_only(args) if args.parity_only else clip_main(args)

    import torch

    from diffscore.export.onnx_export import export_engine
    from diffscore.reference.finetune import FinetuneConfig, denoising_loss, finetune
    from diffscore.reference.loading import load_components

    torch.set_num_threads(1)  # measured: 2 threads on the shared 2-core box ran a step 12x slower than 1
    load_before = os.getloadavg()[0]
    images, labels, held_captions, pairs = bench_data(args.limit)
    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    rows, timing = [], {}

    # zero-shot on the plain demo model (the discffusion DSD preset, the default)
    base_engine = export_engine(DEMO_MODEL, work / "base", show_progress=False)
    base_loss = denoising_loss(load_components(DEMO_MODEL), images, held_captions, DENOISE_T, SEED)
    with diffscore.load(base_engine, backend="ort-cpu") as engine:
        (r1, _), seconds = timed(lambda: r_at_1(engine, images, labels))
        timing["dsd_r_at_1_s"] = seconds
        rows.append({"method": "DSD, zero-shot (discffusion preset)", "shots": 0, "r_at_1": r1,
                     "accuracy": accuracy(engine, images, labels), "denoising_loss": base_loss})
        dc_acc = float(np.mean([r.label == CLASS_NAMES[y] for r, y in zip(
            engine.classify(images, list(CLASS_NAMES), template=DEFAULT_TEMPLATE, stages=DEMO_STAGES, loss=DEMO_LOSS,
                            seed=SEED), labels)]))
        rows.append({"method": "Diffusion Classifier, zero-shot, stages (10, 3) → (40, 1)", "shots": 0,
                     "r_at_1": dc_r_at_1(engine, images, labels) if args.dc_r_at_1 else None, "accuracy": dc_acc,
                     "denoising_loss": base_loss})
    load_training = os.getloadavg()[0]

    for k in args.shots:
        for objectives in ABLATIONS:
            name = "+".join(o.upper() for o in objectives)
            comp = load_components(DEMO_MODEL)
            run_dir = work / f"run-k{k}-{'-'.join(objectives)}"
            cfg = FinetuneConfig(objectives=objectives, shots=k, steps=args.train_steps, seed=SEED)
            run = finetune(DEMO_MODEL, pairs, run_dir, cfg, progress=True, comp=comp)
            loss = denoising_loss(comp, images, held_captions, DENOISE_T, SEED)  # the LoRA active, unmerged
            engine_dir = export_engine(DEMO_MODEL, work / f"engine-k{k}-{'-'.join(objectives)}", adapters=run_dir,
                                       show_progress=False)
            with diffscore.load(engine_dir, backend="ort-cpu") as engine:
                (r1, _), seconds = timed(lambda: r_at_1(engine, images, labels, method="itc"))
                acc = accuracy(engine, images, labels, method="itc")
                dsd_r1 = (r_at_1(engine, images, labels)[0] if (k, objectives) == (max(args.shots), ABLATIONS[-1])
                          else None)
            timing[f"itc_r_at_1_s k={k} {name}"] = seconds
            rows.append({"method": f"fine-tuned {name}, match(method=\"itc\")", "shots": k, "r_at_1": r1,
                         "accuracy": acc,
                         "denoising_loss": loss, "steps_run": run["steps_run"], "best_step": run["best_step"],
                         "train_s": run["wall_time_s"], "dsd_r_at_1_after": dsd_r1})
            print(json.dumps(rows[-1]), flush=True)

    n = len(images)
    itc_times = [v for key, v in timing.items() if key.startswith("itc")]
    speed = {"itc_images_per_s": n / float(np.median(itc_times)), "dsd_images_per_s": n / timing["dsd_r_at_1_s"]}
    speed["ratio"] = speed["itc_images_per_s"] / speed["dsd_images_per_s"]
    cited = {}
    for file in ("match.json", "match_presets.json"):
        if (RESULTS / file).is_file():
            cited[file] = {k: v for k, v in json.loads((RESULTS / file).read_text())["r_at_1"].items()
                           if "prompt learning" in k}
    info = machine()
    result = {"images": n, "captions_per_image": 5, "template": DEFAULT_TEMPLATE, "seed": SEED,
              "train_steps": args.train_steps, "denoising_timesteps_per_image": DENOISE_T, "rows": rows, "speed": speed,
              "timing_s": timing, "prompt_learning_cited": cited, "torch_threads": 1,
              "load_average": {"before": load_before, "training": load_training, "end": os.getloadavg()[0]}}
    table = render(result, info)
    publish("finetune", result, table, args.update_docs)


if __name__ == "__main__":
    main()
