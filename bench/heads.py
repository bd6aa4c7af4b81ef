"""One-pass heads next to the zero-shot Diffusion Classifier on the held-out demo digits, in one run.

    .venv/bin/python bench/heads.py [--dc-limit N] [--update-docs]

Trains the linear probe, the attention head and the DifFormer head on the demo's training split
(features extracted once and cached), the DifFeed linear probe and DifFormer head (reference/feedback.py:
two UNet passes per step, the feedback modules trained with the head; pass 1 extracted once, pass 2
run with gradients every step), and few-shot heads on K = 1, 5, 10 labelled images per class;
exports them with the demo model into one engine; then on ONNX Runtime CPU measures each head's
accuracy and images/s beside the Diffusion Classifier's default stages (with its UNet passes per
image) and a logistic regression on pixels. The DC and the full-data heads alternate every CHUNK
images, so background load hits them alike. Also measures the head inside the UNet graph against the
head as its own graph. Writes bench/results/heads.json; --update-docs regenerates its docs/benchmarks.md table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch threads sleep, not spin, between jobs

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, publish  # noqa: E402

import diffscore  # noqa: E402
from diffscore.app.demo import DEMO_LOSS, DEMO_MODEL, DEMO_STAGES, cache_root  # noqa: E402
from diffscore.app.digits import CLASS_NAMES, DEFAULT_TEMPLATE, load_digits_split  # noqa: E402

# Chosen on the validation slice of the training digits (10%, seeded), never on the held-out ones;
# validation accuracy / loss (136 images, 60 epochs): DifFormer down_blocks.1 + mid_block at t = 50, 200
# 100% / 0.002; mid_block alone at 50, 200 98.5% / 0.028; mid_block + up_blocks.0 98.5% / 0.066 (the
# 8×8 block overfits by epoch 15); attention head mid_block at 50 98.5% / 0.028, up_blocks.0 95.6%.
BLOCKS, STEPS = ["down_blocks.1", "mid_block"], [50, 200]
HEADS = {  # name: (kind, blocks, steps)
    "linear": ("linear", BLOCKS, STEPS),
    "attention": ("attention", ["mid_block"], [50]),
    "difformer": ("difformer", BLOCKS, STEPS),
}
# DifFeed: the same blocks and steps, the default mirror wiring (up_blocks.0 -> down_blocks.1, up_blocks.1 ->
# down_blocks.0). Each epoch runs pass 2 through the UNet with gradients: a smaller epoch budget.
FEEDBACK = {"difeed-linear": ("linear", BLOCKS, STEPS), "difeed-difformer": ("difformer", BLOCKS, STEPS)}
FEEDBACK_EPOCHS = 30
FEW_SHOT = (1, 5, 10)
FEW_SHOT_EPOCHS = 100  # no validation split to stop on with K images per class: a fixed budget
CHUNK = 50  # held-out images per alternation between the DC and the heads
ALL = {**HEADS, **FEEDBACK}


def select(feats: dict, union, blocks, steps) -> dict:
    """The (N, steps, C, h, w) features of `blocks` at `steps` out of the union extraction."""
    idx = [union.steps.index(t) for t in steps]
    return {b: feats[b][:, idx] for b in blocks}


def few_shot_indices(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), k, replace=False)
                                   for c in np.unique(labels)]))


def logistic(train_x, train_y, test_x, test_y) -> float:
    from sklearn.linear_model import LogisticRegression

    flat = lambda x: x.reshape(len(x), -1) / 255.0
    return float((LogisticRegression(max_iter=2000).fit(flat(train_x), train_y).predict(flat(test_x)) == test_y).mean())


def placement(engine, name: str, images, repeats: int = 3) -> dict:
    """images/s of the shipped head graph (the UNet layers the head reads + the head, one graph) vs the
    alternative: the head as its own graph, fed by the feature outputs of the full, shared UNet graph."""
    import torch

    from diffscore.engine.backends.onnxruntime import OnnxRuntimeRunner
    from diffscore.engine.manifest import Manifest, TensorSpec
    from diffscore.engine.manifest import BATCH
    from diffscore.export.onnx_export import export_engine, export_graph
    from diffscore.kernels import add_noise, shared_noise
    from diffscore.reference.heads import load_head

    spec = engine.manifest.heads[name]
    head, config = load_head(engine.engine_dir, weights=spec.weights, config=spec.config)
    blocks, steps, S = spec.blocks, np.asarray(spec.steps), len(spec.steps)
    with tempfile.TemporaryDirectory() as tmp:
        shared = export_engine(DEMO_MODEL, Path(tmp) / "shared", feature_blocks=blocks, show_progress=False)
        unet = OnnxRuntimeRunner(shared / "unet.onnx", Manifest.load(shared).graphs["unet"], "ort-cpu", threads=1)
        inputs = [TensorSpec(f"features.{b}", "float32", [BATCH, S, *shape]) for b, shape in zip(blocks, config.shapes)]
        alone = export_graph(head, tuple(torch.randn(2, S, *shape) for shape in config.shapes), inputs,
                             [TensorSpec("logits", "float32", [BATCH, len(spec.labels)])], Path(tmp), "head")
        head_runner = OnnxRuntimeRunner(Path(tmp) / alone.file, alone, "ort-cpu", threads=1)
        emb = engine.encode_text([spec.prompt])
        per_call = engine.default_batch_size() // S
        pool = ThreadPoolExecutor(os.cpu_count() or 1)  # as the engine runs small UNets on CPU

        def separate(imgs):
            x0 = engine.encode_images(imgs)
            noise = shared_noise(spec.seed, S, tuple(x0.shape[1:]))

            def run(lo):
                x = x0[lo : lo + per_call]
                xt = np.concatenate([add_noise(xi, noise, engine.alphas_cumprod, steps) for xi in x])  # (n·S, C, H, W)
                out = unet.infer({"sample": xt, "timestep": np.tile(steps, len(x)).astype(np.float32),
                                  "encoder_hidden_states": np.repeat(emb, len(xt), axis=0)})
                return head_runner.infer({
                    f"features.{b}": out[f"features.{b}"].reshape(len(x), S, *out[f"features.{b}"].shape[1:])
                    for b in blocks})["logits"]

            return np.concatenate(list(pool.map(run, range(0, len(x0), per_call))))

        diff = float(np.abs(separate(images[:20]) - engine.head_logits(images[:20], name)).max())
        one_s, separate_s = [], []
        for _ in range(repeats):  # alternate, so load hits both alike
            start = time.perf_counter()
            engine.head_logits(images, name)
            one_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            separate(images)
            separate_s.append(time.perf_counter() - start)
        pool.shutdown()
    return {"head": name, "images": len(images), "repeats": repeats, "max_abs_logit_difference": diff,
            "one_graph_images_per_s": len(images) / statistics.median(one_s),
            "separate_graph_images_per_s": len(images) / statistics.median(separate_s),
            "one_graph_mb": engine.manifest.graphs[spec.graph].size / 1e6, "separate_head_graph_mb": alone.size / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dc-limit", type=int, default=None,
                        help="time the DC on the first N held-out images (default: all)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="cap every head's epochs (a quick check of this script)")
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()
    cap = lambda epochs: min(epochs, args.epochs or epochs)

    import torch

    torch.set_num_threads(1)  # training shares the machine; the timed part is the engine's
    from diffscore.engine.manifest import folder_sha256
    from diffscore.export.onnx_export import export_engine
    from diffscore.reference.features import FeatureSpec, cached_features
    from diffscore.reference.feedback import default_pairs, feedback_spec, train_feedback_head
    from diffscore.reference.head_training import TrainOptions, train_head
    from diffscore.reference.heads import HeadConfig, save_head
    from diffscore.reference.loading import load_components

    load_start = os.getloadavg()[0]
    split = load_digits_split()
    test_images, truth = list(split.test_images), split.test_labels
    comp = load_components(DEMO_MODEL)
    sha = folder_sha256(DEMO_MODEL)
    union = FeatureSpec(list(dict.fromkeys(b for _, bs, _ in HEADS.values() for b in bs)),
                        sorted({t for _, _, ts in HEADS.values() for t in ts}))
    start = time.perf_counter()
    feats = cached_features(comp, list(split.train_images), union, cache_root() / "features", sha, progress=True)
    extract_s = time.perf_counter() - start

    workdir = Path(tempfile.mkdtemp(prefix="bench-heads-"))
    trained, rows = [], {}

    def fit(name, kind, blocks, steps, idx, options, feedback=False):
        config = HeadConfig(kind=kind, labels=list(CLASS_NAMES), features=FeatureSpec(blocks, steps),
                            shapes=[list(feats[b].shape[2:]) for b in blocks], source_sha256=sha)
        t0 = time.perf_counter()
        if feedback:
            config.feedback = feedback_spec(comp, default_pairs(comp.unet, blocks))
            head = train_feedback_head(comp, [split.train_images[i] for i in idx], split.train_labels[idx], config,
                                       options, cache_root() / "features", sha, progress=True)
        else:
            head = train_head({b: f[idx] for b, f in select(feats, union, blocks, steps).items()},
                              split.train_labels[idx], config, options, progress=True)
        trained.append(save_head(head, config, workdir / name))
        return time.perf_counter() - t0, config.training

    everything = np.arange(len(split.train_labels))
    for name, (kind, blocks, steps) in ALL.items():
        epochs = FEEDBACK_EPOCHS if name in FEEDBACK else TrainOptions.epochs
        seconds, summary = fit(name, kind, blocks, steps, everything, TrainOptions(epochs=cap(epochs)),
                               name in FEEDBACK)
        rows[name] = {"kind": kind, "blocks": blocks, "steps": steps, "training_s": seconds, "training": summary,
                      "feedback": name in FEEDBACK}
    few = {}
    for k in FEW_SHOT:
        idx = few_shot_indices(split.train_labels, k)
        few[k] = {"logistic regression": logistic(split.train_images[idx], split.train_labels[idx], split.test_images,
                                                  truth)}
        for name, (kind, blocks, steps) in ALL.items():
            fit(f"{name}-k{k}", kind, blocks, steps, idx, TrainOptions(epochs=cap(FEW_SHOT_EPOCHS), val_fraction=0.0),
                name in FEEDBACK)

    engine_dir = export_engine(DEMO_MODEL, workdir / "engine", heads=trained, show_progress=False,
                               defaults={"template": DEFAULT_TEMPLATE, "stages": [list(s) for s in DEMO_STAGES],
                                         "loss": DEMO_LOSS})
    engine = diffscore.load(engine_dir, backend="ort-cpu")
    labels = list(CLASS_NAMES)
    engine.classify(test_images[:2], labels)  # warm-up: sessions, prompt cache
    for name in engine.manifest.heads:
        engine.classify(test_images[:2], method="head", head=name)

    # The timed run: DC and full-data heads alternate chunk by chunk.
    load_timed = os.getloadavg()[0]  # still carries this script's training of the last minute
    dc_limit = len(test_images) if args.dc_limit is None else args.dc_limit
    dc, dc_s = [], 0.0
    got = {name: [] for name in ALL}
    head_s = dict.fromkeys(ALL, 0.0)
    for lo in range(0, len(test_images), CHUNK):
        chunk = test_images[lo : lo + CHUNK]
        if lo < dc_limit:
            t0 = time.perf_counter()
            dc += engine.classify(chunk[: dc_limit - lo], labels)
            dc_s += time.perf_counter() - t0
        for name in ALL:
            t0 = time.perf_counter()
            got[name] += engine.classify(chunk, method="head", head=name)
            head_s[name] += time.perf_counter() - t0
    load_end = os.getloadavg()[0]

    accuracy = lambda rs, n=None: float(np.mean([CLASS_NAMES.index(r.label) == t for r, t in zip(rs, truth[:n])]))
    dc_ips = len(dc) / dc_s
    dc_row = {"accuracy": accuracy(dc, len(dc)), "images": len(dc),
              "passes_per_image": float(np.mean([r.passes for r in dc])),
              "images_per_s": dc_ips, "seconds": dc_s, "stages": DEMO_STAGES}
    for name in ALL:
        passes = len(rows[name]["steps"]) * engine.manifest.heads[name].passes_per_step
        rows[name].update(accuracy=accuracy(got[name]), passes_per_image=passes,
                          images_per_s=len(test_images) / head_s[name], seconds=head_s[name],
                          speedup_vs_dc=len(test_images) / head_s[name] / dc_ips)
        for k in FEW_SHOT:
            few[k][name] = accuracy(engine.classify(test_images, method="head", head=f"{name}-k{k}"))
    baseline = logistic(split.train_images, split.train_labels, split.test_images, truth)
    place = placement(engine, "difformer", test_images)

    result = {
        "held_out_images": len(test_images), "training_images": len(split.train_labels), "chunk": CHUNK,
        "feature_extraction_s": extract_s, "diffusion_classifier": dc_row, "heads": rows,
        "logistic_regression_accuracy": baseline, "few_shot": {str(k): v for k, v in few.items()},
        "few_shot_epochs": cap(FEW_SHOT_EPOCHS), "feedback_epochs": cap(FEEDBACK_EPOCHS),
        "speed_gate": {"head": "difformer", "ratio": rows["difformer"]["speedup_vs_dc"], "required": 20.0,
                       "passed": rows["difformer"]["speedup_vs_dc"] >= 20},
        "placement": {**place, "chosen": "one graph: the UNet layers the head reads + the head",
                      "why": "faster: it skips the UNet layers after the last block read and the attention scores; "
                             "the price is a copy of those layers' weights per head (fp32, ONNX Runtime)"},
        "load_average_1min": {"start": load_start, "timed_start": load_timed, "end": load_end},
    }
    publish("heads", result, readme_block(result, machine()).splitlines(), args.update_docs)


def readme_block(r: dict, info: dict) -> str:
    dc, heads = r["diffusion_classifier"], r["heads"]
    label = {"linear": "linear probe", "attention": "attention head", "difformer": "DifFormer head",
             "difeed-linear": "DifFeed linear probe", "difeed-difformer": "DifFeed DifFormer head"}
    where = lambda h: f"{' + '.join(h['blocks'])} at t = {', '.join(map(str, h['steps']))}"
    lines = [
        "| method | trained on | held-out accuracy | UNet passes / image | images/s | vs DC |",
        "|---|---|---:|---:|---:|---:|",
        f"| Diffusion Classifier, zero-shot, stages {' → '.join(map(str, tuple(map(tuple, dc['stages']))))} | no "
        f"images | {dc['accuracy']:.2%} ({dc['images']}) | {dc['passes_per_image']:.0f} | {dc['images_per_s']:.2f} | "
        f"1× |",
    ]
    for name, h in heads.items():
        lines.append(f"| {label[name]} ({where(h)}) | {r['training_images']:,} labelled | {h['accuracy']:.2%} | "
                     f"{h['passes_per_image']} | {h['images_per_s']:.1f} | **{h['speedup_vs_dc']:.0f}×** |")
    lines.append(f"| logistic regression on pixels | {r['training_images']:,} labelled | "
                 f"{r['logistic_regression_accuracy']:.2%} | 0 | – | – |")
    lines += ["", "Few-shot (K labelled training images per class, no validation split, "
              f"{r['few_shot_epochs']} epochs), held-out accuracy:", "",
              "| K | " + " | ".join(label[n] for n in heads) + " | logistic regression |",
              "|---:|" + "---:|" * (len(heads) + 1)]
    for k, row in r["few_shot"].items():
        lines.append(f"| {k} | " + " | ".join(f"{row[n]:.2%}" for n in heads)
                     + f" | {row['logistic regression']:.2%} |")
    p, gate, load = r["placement"], r["speed_gate"], r["load_average_1min"]
    per_epoch = lambda n: heads[n]["training_s"] / heads[n]["training"]["epochs"]
    fed = [n for n, h in heads.items() if h.get("feedback")]
    if fed:
        lines += ["",
                  "DifFeed heads (two UNet passes per step: the mirror wiring up_blocks.0 → down_blocks.1, up_blocks.1 "
                  "→ "
                  f"down_blocks.0; at most {r['feedback_epochs']} epochs, early stopping): training "
                  + "; ".join(f"{label[n]} {heads[n]['training_s']:.0f} s for {heads[n]['training']['epochs']} epochs "
                              f"({per_epoch(n):.1f} s/epoch; without feedback, on cached features: "
                              f"{per_epoch(n.split('-', 1)[1]):.1f} s/epoch)" for n in fed) + "."]
    lines += ["", f"Speed gate (DifFormer head ≥ 20× the DC's images/s on the engine): **{gate['ratio']:.0f}×, "
              f"{'passed' if gate['passed'] else 'FAILED'}**. Head placement, DifFormer head on all held-out digits: "
              f"one graph (the UNet layers it reads + the head, {p['one_graph_mb']:.1f} MB) "
              f"{p['one_graph_images_per_s']:.0f} images/s vs the head as its own graph "
              f"({p['separate_head_graph_mb']:.2f} MB) fed by the shared UNet graph's feature outputs "
              f"{p['separate_graph_images_per_s']:.0f} images/s (median of {p['repeats']}, logits agree to "
              f"{p['max_abs_logit_difference']:.1g}): heads ship as one graph.",
              f"One run of `bench/heads.py` on {r['held_out_images']} held-out digits (ONNX Runtime CPU fp32, DC and "
              f"heads alternating every {r['chunk']} images; 1-min load average {load['start']:.1f} before training, "
              f"{load['timed_start']:.1f} when timing began, {load['end']:.1f} at the end), {machine_line(info)}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
