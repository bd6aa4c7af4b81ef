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
from match import dc_r_at_1, r_at_1, split_training  # noqa: E402

import diffscore  # noqa: E402
from diffscore.app.demo import DEMO_LOSS, DEMO_MODEL, DEMO_STAGES  # noqa: E402
from diffscore.app.digits import CLASS_NAMES, DEFAULT_TEMPLATE, caption, load_digits_split  # noqa: E402

SHOTS = (1, 5, 10)
ABLATIONS = (("itc",), ("itc", "is"), ("itc", "is", "rsc"))
SEED = 0
DENOISE_T = 4  # seeded (t, ε) per held-out image for the denoising loss


def accuracy(engine, images, labels, **options) -> float:
    """10-way held-out classification: the class caption with the best match score."""
    scores = np.asarray(engine.match(images, [caption(c, DEFAULT_TEMPLATE) for c in range(10)], seed=SEED, **options))
    return float((scores.argmax(axis=1) == labels).mean())


def render(result: dict, info: dict) -> list[str]:
    """The docs/benchmarks.md table and notes, from a result (so a stored run can be re-rendered: --render-only)."""
    rows, speed, cited, load, n = (result[k] for k in ("rows", "speed", "prompt_learning_cited", "load_average", "images"))
    table = ["| method | K | R@1 (5 captions) | accuracy (10 classes) | held-out denoising loss |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        r1 = "–" if r["r_at_1"] is None else f"{r['r_at_1']:.2%}"
        table.append(f"| {r['method']} | {r['shots'] or '–'} | {r1} | {r['accuracy']:.2%} | {r['denoising_loss']:.4f} |")
    for file, found in cited.items():
        for key, v in found.items():
            table.append(f"| {key[4:]} (cited: `bench/match.py`'s own run on all 450 held-out digits, {file}) | "
                         f"{key.split('K=')[-1].split()[0]} | {v:.2%} | – | – |")
    trained = [r for r in rows if "steps_run" in r]
    last = next((r for r in trained if r.get("dsd_r_at_1_after") is not None), None)
    return table + [
        "",
        f"`match(method=\"itc\")` {speed['itc_images_per_s']:.1f} images/s against DSD's {speed['dsd_images_per_s']:.1f} on "
        f"the same images and 5 captions: **{speed['ratio']:.0f}×** (one UNet pass per image against 6 prompts × 10 "
        "timesteps)." + (f" DSD on the fine-tuned UNet (K={last['shots']}, ITC+IS+RSC) scores R@1 "
                         f"{last['dsd_r_at_1_after']:.2%}." if last else ""),
        f"One run of `bench/finetune.py`: {n} held-out digits, ≤ {result['train_steps']} steps per fine-tuning run "
        f"(validation every 25 steps on 2 training pairs per class; steps run: "
        f"{', '.join(str(r['steps_run']) for r in trained)}; best (kept) step: "
        f"{', '.join(str(r['best_step']) for r in trained)}), torch 1 thread; load average {load['before']:.1f} before, "
        f"{load['training']:.1f} when training began, {load['end']:.1f} at the end (2 cores shared with other jobs); "
        f"{machine_line(info)}."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N held-out images (default: all)")
    parser.add_argument("--shots", type=int, nargs="+", default=list(SHOTS))
    parser.add_argument("--train-steps", type=int, default=150, help="fine-tuning steps at most (early stopping)")
    parser.add_argument("--dc-r-at-1", action="store_true", help="also the Diffusion Classifier's R@1 (140 UNet passes "
                        "per image; bench/match.py row (d) has it)")
    parser.add_argument("--update-docs", action="store_true")
    parser.add_argument("--render-only", action="store_true", help="re-render bench/results/finetune.json, no run")
    args = parser.parse_args()
    if args.render_only:
        stored = json.loads((RESULTS / "finetune.json").read_text())
        table = render(stored, stored["machine"])
        print("\n".join(table))
        if args.update_docs:
            update_docs("finetune", "\n".join(table))
        return

    import torch

    from diffscore.export.onnx_export import export_engine
    from diffscore.reference.finetune import FinetuneConfig, denoising_loss, finetune
    from diffscore.reference.loading import load_components
    from diffscore.reference.prompt_learning import Pairs

    torch.set_num_threads(1)  # measured: 2 threads on the shared 2-core box ran a step 12x slower than 1
    load_before = os.getloadavg()[0]
    split = load_digits_split()
    images, labels = list(split.test_images), split.test_labels
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    held_captions = [caption(int(y), DEFAULT_TEMPLATE) for y in labels]
    _, rest = split_training(split)  # bench/match.py's validation slice stays out
    pairs = Pairs([split.train_images[i] for i in rest], [caption(int(split.train_labels[i]), DEFAULT_TEMPLATE) for i in rest])
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
                dsd_r1 = r_at_1(engine, images, labels)[0] if (k, objectives) == (max(args.shots), ABLATIONS[-1]) else None
            timing[f"itc_r_at_1_s k={k} {name}"] = seconds
            rows.append({"method": f"fine-tuned {name}, match(method=\"itc\")", "shots": k, "r_at_1": r1, "accuracy": acc,
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
            cited[file] = {k: v for k, v in json.loads((RESULTS / file).read_text())["r_at_1"].items() if "prompt learning" in k}
    info = machine()
    result = {"images": n, "captions_per_image": 5, "template": DEFAULT_TEMPLATE, "seed": SEED,
              "train_steps": args.train_steps, "denoising_timesteps_per_image": DENOISE_T, "rows": rows, "speed": speed,
              "timing_s": timing, "prompt_learning_cited": cited, "torch_threads": 1,
              "load_average": {"before": load_before, "training": load_training, "end": os.getloadavg()[0]}}
    table = render(result, info)
    publish("finetune", result, table, args.update_docs)


if __name__ == "__main__":
    main()
