"""`diffscore` command line. Every user mistake is one line on stderr and a non-zero exit.

Runtime commands (classify, match, info, demo on an exported engine) need no torch; export, parity,
calibrate and training need the `torch` extra and say so when it is missing.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from diffscore.errors import EngineError
from diffscore.kernels.dsd import DEFAULT_DSD_PRESET

app = typer.Typer(
    help="diffscore: diffusion models as compiled zero-shot classifiers and image-text matchers.",
    add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
)
out = Console()
err = Console(stderr=True)

Backend = typer.Option("auto", "--backend", "-b", help="auto | ort-cpu | ort-cuda | ort-trt | tensorrt")
Precision = typer.Option("fp32", "--precision", "-p", help="UNet precision: fp32 | fp16 | int8")
Format = typer.Option("table", "--format", "-f", help="table | json | csv")
Seed = typer.Option(0, help="seed of the shared noise: same seed, same scores")


def require_torch(command: str) -> None:
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("diffusers") is None:
        raise EngineError(f"`diffscore {command}` needs the torch extra: pip install 'diffscore[torch]'")


def parse_stages(text: str | None) -> list[tuple[int, int]] | None:
    """'50:5,500:1' -> [(50, 5), (500, 1)]."""
    if not text:
        return None
    try:
        return [tuple(int(v) for v in part.split(":")) for part in text.split(",")]  # type: ignore[misc]
    except ValueError:
        raise EngineError(f"--stages {text!r} is not like '50:5,500:1' (n_samples:keep, comma separated)") from None


def split(text: str | None) -> list[str] | None:
    """'a, b,c' -> ['a', 'b', 'c']; None or '' -> None."""
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def parse_steps(text: str) -> list[int]:
    """'50,200' -> [50, 200]."""
    try:
        return [int(x) for x in split(text) or []]
    except ValueError:
        raise EngineError(f"--steps {text!r} is not like '50,200' (noise steps, comma separated integers)") from None


def read_labels(labels: str | None, labels_file: Path | None, required: bool = True) -> list[str] | None:
    """--labels or --labels-file (exactly one); None when neither is given and they are optional."""
    if not required and labels is None and labels_file is None:
        return None
    if (labels is None) == (labels_file is None):
        raise EngineError("give exactly one of --labels a,b,c or --labels-file FILE")
    if labels_file is not None:
        if not labels_file.is_file():
            raise EngineError(f"labels file {labels_file} does not exist")
        return [line.strip() for line in labels_file.read_text().splitlines() if line.strip()]
    return split(labels) or []


def emit(rows: list[dict], fmt: str, title: str = "") -> None:
    if fmt == "json":
        out.print_json(json.dumps(rows))
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        sys.stdout.write(buf.getvalue())
    elif fmt == "table":
        table = Table(title=title or None)
        for key in rows[0]:
            table.add_column(key, justify="right" if isinstance(rows[0][key], (int, float)) else "left")
        for row in rows:
            table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
        out.print(table)
    else:
        raise EngineError(f"unknown --format {fmt!r}; choose table, json or csv")


@app.command()
def classify(
    engine: Path = typer.Argument(..., help="engine directory made by `diffscore export`"),
    images: List[Path] = typer.Argument(..., help="image files"),
    labels: Optional[str] = typer.Option(None, help="class names, comma separated (method head: the head's own)"),
    labels_file: Optional[Path] = typer.Option(None, help="class names, one per line"),
    method: str = typer.Option("dc", help="dc: zero-shot Diffusion Classifier | head: a trained head, one UNet pass per step"),
    head: Optional[str] = typer.Option(None, help="which head (method head), when the engine has several"),
    template: Optional[str] = typer.Option(None, help="prompt template, e.g. 'a photo of a {}' (default: the engine's)"),
    stages: Optional[str] = typer.Option(None, help="pruning stages n_samples:keep, e.g. 50:5,500:1"),
    loss: Optional[str] = typer.Option(None, help="l2 | l1 | huber (default: the engine's)"),
    seed: int = Seed, batch_size: Optional[int] = typer.Option(None, help="UNet batch (default: automatic)"),
    backend: str = Backend, precision: str = Precision, fmt: str = Format,
):
    """Classify images: the zero-shot Diffusion Classifier (default) or a trained head (--method head)."""
    import diffscore

    label_list = read_labels(labels, labels_file, required=method != "head")  # a head has its own labels
    eng = diffscore.load(engine, backend=backend, precision=precision)
    results = eng.classify([str(p) for p in images], label_list, method=method, head=head, template=template,
                           stages=parse_stages(stages), loss=loss, seed=seed, batch_size=batch_size, progress=True)
    score = "probability" if method == "head" else "error"
    rows = [{"image": str(p), "label": r.label, score: r.ranking[0][1],
             "runner_up": r.ranking[1][0] if len(r.ranking) > 1 else "", "passes": r.passes}
            for p, r in zip(images, results)]
    if fmt == "json":
        rows = [{**row, "ranking": r.ranking} for row, r in zip(rows, results)]
    title = f"head {eng.head_name(head)} (higher probability = better)" if method == "head" else \
        "Diffusion Classifier (lower error = better)"
    emit(rows, fmt, title)


@app.command()
def match(
    engine: Path = typer.Argument(..., help="engine directory"),
    images: List[Path] = typer.Option(..., "--images", "-i", help="image files (repeat the option)"),
    texts: List[str] = typer.Option(..., "--texts", "-t", help="captions (repeat the option)"),
    steps: Optional[int] = typer.Option(None, help="timesteps per pair (default: the engine's)"),
    bias_weight: Optional[float] = typer.Option(None, help="λ of the denoising bias (default: the engine's DSD preset's: discffusion 1, diffscore 0)"),
    seed: int = Seed, batch_size: Optional[int] = typer.Option(None, help="UNet batch (default: automatic)"),
    backend: str = Backend, precision: str = Precision, fmt: str = Format,
):
    """DSD image-text matching: an images x texts matrix of scores (higher = better match)."""
    import diffscore

    eng = diffscore.load(engine, backend=backend, precision=precision)
    scores = eng.match([str(p) for p in images], list(texts), steps=steps, bias_weight=bias_weight, seed=seed,
                       batch_size=batch_size, progress=True)
    rows = [{"image": str(p), **{t: float(s) for t, s in zip(texts, row)}, "best": texts[int(row.argmax())]}
            for p, row in zip(images, scores)]
    emit(rows, fmt, "DSD scores (higher = better match)")


@app.command()
def info(engine: Path = typer.Argument(..., help="engine directory"),
         verify: bool = typer.Option(False, "--verify", help="also check every file's sha256 (slow for big graphs)")):
    """What an engine directory holds: graphs, precisions, plans, captured layers, defaults."""
    from diffscore.engine.manifest import Manifest

    m = Manifest.load(engine)
    out.print(f"[bold]{engine}[/] (format {m.format_version}, diffscore {m.diffscore_version})")
    out.print(f"source {m.source_path} sha256 {m.source_sha256[:12]}; "
              f"{'pixel space' if m.pixel_space else f'latent space (scaling {m.latent_scaling})'}; "
              f"image {m.image_size}px x{m.image_channels}; sample {m.sample_shape}; T={len(m.alphas_cumprod)}; "
              f"predicts {m.prediction_type}; DSD preset {m.defaults.get('dsd_preset', 'diffscore')}", markup=False)
    rows = [{"graph": k, "file": g.file, "precision": g.precision, "MB": g.size / 1e6} for k, g in m.graphs.items()]
    rows += [{"graph": k, "file": p.file, "precision": p.precision, "MB": p.size / 1e6} for k, p in m.plans.items()]
    emit(rows, "table")
    out.print(f"attention layers: {', '.join(m.attention_layers) or '-'}")
    out.print(f"feature blocks: {', '.join(m.feature_blocks) or '-'}; merged adapters: {', '.join(m.adapters) or '-'}")
    for name, a in m.adapters.items():
        if a.get("score_weights"):
            out.print(f"{name} score weights: " + ", ".join(f"{k} {v:.3f}" for k, v in a["score_weights"].items()))
    for name, h in m.heads.items():
        out.print(f"head {name}: {h['kind']} on {', '.join(h['blocks'])} at steps {h['steps']}, "
                  f"{len(h['labels'])} labels ({', '.join(h['labels'][:5])}{', …' if len(h['labels']) > 5 else ''})")
    out.print(f"defaults: {json.dumps(m.defaults)}")
    if verify:
        bad = m.verify(engine)
        if bad:
            raise EngineError(f"sha256 mismatch in {', '.join(bad)}: the engine directory is damaged; re-export it")
        out.print("[green]all sha256 match[/]")


@app.command()
def export(
    model: Path = typer.Argument(..., help="local diffusers model folder"),
    out_dir: Path = typer.Argument(..., help="engine directory to create"),
    precision: List[str] = typer.Option(["fp32"], "--precision", "-p", help="fp32 and/or fp16 (repeat)"),
    attention_layers: Optional[str] = typer.Option(None, help="cross-attention modules to score, comma separated (default: last of each block)"),
    feature_blocks: Optional[str] = typer.Option(None, help="UNet blocks whose outputs the graph returns, e.g. mid_block,up_blocks.1"),
    head: List[Path] = typer.Option([], "--head", help="a head folder from `diffscore train-head` to ship (repeat)"),
    overwrite: bool = typer.Option(False, help="replace an existing engine directory"),
    adapters: Optional[Path] = typer.Option(None, help="a `diffscore train-prompts` run directory: its LoRA is merged into the UNet"),
    dsd_preset: Optional[str] = typer.Option(None, help="DSD scoring preset: diffscore | discffusion (the seed's: its layers, "
                                                        "timesteps, λ=1, conditional+unconditional attention); default: the adapters', else discffusion"),
):
    """Export a diffusers model to an engine directory (ONNX graphs + manifest), atomically."""
    require_torch("export")
    from diffscore.export.onnx_export import export_engine

    precisions = tuple(dict.fromkeys(["fp32", *precision]))
    path = export_engine(model, out_dir, precisions=precisions, attention_layers=split(attention_layers),
                         feature_blocks=split(feature_blocks) or [], heads=head, overwrite=overwrite, adapters=adapters,
                         dsd_preset=dsd_preset)
    out.print(f"[green]wrote[/] {path}")


@app.command("train-head")
def train_head_command(
    model: Path = typer.Argument(..., help="local diffusers model folder"),
    data: Optional[Path] = typer.Option(None, "--data", help="image folder with one subfolder per class (folder name = label)"),
    demo: bool = typer.Option(False, "--demo", help="the demo digits' training split (1,347 images) instead of --data"),
    head: str = typer.Option("difformer", "--head", help="linear | attention | difformer"),
    blocks: str = typer.Option("down_blocks.1,mid_block", help="UNet blocks to read (diffusers module names), comma separated"),
    steps: str = typer.Option("50,200", help="noise steps, comma separated: one UNet pass each per image"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="head folder to write (default: head-<kind>); its name names the head in an engine"),
    prompt: str = typer.Option("", help="conditioning of the feature passes (default: the empty prompt)"),
    seed: int = typer.Option(0, help="seed of the fixed noise, the initialisation, the validation split and shuffling"),
    epochs: int = typer.Option(100, help="at most; training stops early on a 10% validation split"),
    overwrite: bool = typer.Option(False, help="replace an existing head folder"),
):
    """Train a one-pass head on UNet block features (extracted once, cached); then `export --head`."""
    require_torch("train-head")
    from diffscore.app.demo import cache_root
    from diffscore.reference.heads import FeatureSpec, TrainOptions, save_head, train_head_on_images

    out_dir = out_dir or Path(f"head-{head}")
    if out_dir.exists() and not overwrite:
        raise EngineError(f"{out_dir} already exists; pass --overwrite to replace it")
    if demo == (data is not None):
        raise EngineError("give exactly one of --data FOLDER or --demo")
    if demo:
        from diffscore.app.digits import CLASS_NAMES, load_digits_split

        digits = load_digits_split()
        images, labels, classes = list(digits.train_images), digits.train_labels, list(CLASS_NAMES)
    else:
        from diffscore.engine.images import image_folder

        images, labels, classes = image_folder(data)
    spec = FeatureSpec(blocks=split(blocks) or [], steps=parse_steps(steps), seed=seed, prompt=prompt)
    trained, config = train_head_on_images(model, images, labels, classes, head, spec,
                                           TrainOptions(epochs=epochs, seed=seed), cache_root() / "features", progress=True)
    save_head(trained, config, out_dir)
    t = config.training
    val = f"validation accuracy {t['val_accuracy']:.2%} on {t['val_images']} images" if t["val_images"] else "no validation split"
    out.print(f"[green]wrote[/] {out_dir}: {head} head on {', '.join(spec.blocks)} at steps {spec.steps}, "
              f"{len(classes)} classes, {t['images']} training images, {val}, best epoch {t['best_epoch']} of {t['epochs']}")
    out.print(f"next: diffscore export {model} ENGINE_DIR --head {out_dir}")


@app.command("build-trt")
def build_trt(
    engine: Path = typer.Argument(..., help="engine directory"),
    precision: str = typer.Option("fp16", help="which UNet graph to build: fp32 | fp16 | int8"),
    min_batch: int = typer.Option(1), opt_batch: int = typer.Option(8), max_batch: int = typer.Option(32),
):
    """Build TensorRT plans (strongly typed; precision comes from the ONNX) for this GPU."""
    from diffscore.export.tensorrt_build import build_plans

    for plan in build_plans(engine, precision=precision, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch):
        out.print(f"[green]plan[/] {plan.file} ({plan.size / 1e6:.1f} MB)")


@app.command()
def parity(
    engine: Path = typer.Argument(..., help="engine directory"),
    images: Optional[List[str]] = typer.Argument(
        None, help="your images (files, folders or glob patterns) for the decision checks, with --labels; "
                   "default: the held-out digits on a demo-shaped engine, else random images (tensor checks only)"),
    labels: Optional[str] = typer.Option(None, help="class names for the decision checks on your images, comma separated"),
    labels_file: Optional[Path] = typer.Option(None, help="class names, one per line"),
    model: Optional[Path] = typer.Option(None, help="source model folder (default: the one recorded in the manifest)"),
    limit: int = typer.Option(100, help="use at most N images for the decision checks"),
):
    """Torch vs every available backend and precision: tensor errors, and top-1 decision agreement of
    fp32/fp16/int8 with torch fp32 on your images (or the demo digits)."""
    require_torch("parity")
    from diffscore.app.demo import demo_parity_inputs
    from diffscore.export.parity import run_parity

    if images:
        from diffscore.engine.images import expand_images

        paths = expand_images(images)[:limit]
        inputs = dict(images=[str(p) for p in paths], labels=read_labels(labels, labels_file),
                      source="of your images")
    elif labels or labels_file:
        raise EngineError("--labels needs images to judge: diffscore parity ENGINE IMAGES... --labels a,b,c")
    else:
        inputs = demo_parity_inputs(engine, limit)
    if not run_parity(engine, model, **inputs):
        raise typer.Exit(1)


@app.command()
def demo(
    limit: Optional[int] = typer.Option(None, help="classify only the first N held-out images"),
    backend: str = Backend, precision: str = Precision,
    stages: Optional[str] = typer.Option(None, help="override the demo's stages, e.g. 10:3,40:1"),
):
    """The main job: zero-shot classification of held-out handwritten digits on the demo model."""
    import diffscore
    from diffscore.app.demo import demo_engine_dir, logistic_baseline, run_demo

    engine_dir = demo_engine_dir(precisions=("fp32", precision) if precision == "fp16" else ("fp32",))
    eng = diffscore.load(engine_dir, backend=backend, precision=precision)
    res = run_demo(eng, limit=limit, stages=parse_stages(stages))
    from diffscore.app.digits import load_digits_split

    baseline = logistic_baseline(load_digits_split())
    rows = [
        {"method": f"Diffusion Classifier, zero-shot ({eng.backend}, {precision})", "accuracy": res["accuracy"],
         "UNet passes/image": res["passes_per_image"], "images/s": res["images_per_s"]},
        {"method": "logistic regression on pixels (trained)", "accuracy": baseline, "UNet passes/image": 0.0,
         "images/s": float("nan")},
    ]
    emit(rows, "table", f"held-out digits: {res['images']} images, wall {res['seconds']:.1f} s")


@app.command()
def calibrate(
    engine: Path = typer.Argument(..., help="engine directory made by `diffscore export`"),
    images: Optional[Path] = typer.Option(None, help="folder of images like the ones you will score"),
    demo: bool = typer.Option(False, "--demo", help="calibrate on the demo's training digits (never the held-out ones)"),
    labels: Optional[str] = typer.Option(None, help="class names / texts the engine will score, comma separated"),
    labels_file: Optional[Path] = typer.Option(None, help="class names, one per line"),
    samples: int = typer.Option(256, help="UNet inputs in the calibration set"),
    method: str = typer.Option("minmax", help="activation ranges: minmax | entropy | percentile"),
    seed: int = typer.Option(0, help="seed of the image split, the sampling and the shared noise"),
    report: bool = typer.Option(False, "--report", help="per-layer sensitivity: score error and flipped decisions"),
    auto: bool = typer.Option(False, "--auto", help="keep the most sensitive layers in float until the decision gate holds"),
    validation: int = typer.Option(100, help="images held out of calibration for the decision gate (0: no gate)"),
    keep_float: Optional[str] = typer.Option(None, help="layers to keep in float, name substrings comma separated "
                                             "(default: time_embedding,conv_in,conv_out,conv_shortcut; 'none')"),
    smoothquant: Optional[float] = typer.Option(None, "--smoothquant", metavar="ALPHA", help="SmoothQuant-style scaling "
                                                "of LayerNorm -> linear layers before quantizing, α in (0, 1), e.g. 0.5"),
):
    """INT8 UNet: calibrate on real scoring inputs, quantize (Q/DQ), gate on decisions, record in the engine."""
    from diffscore.calibration.pipeline import calibrate as run_calibration

    label_list = read_labels(labels, labels_file, required=False)  # --demo brings its own
    if demo == (images is not None):
        raise EngineError("give exactly one of --images DIR or --demo")
    source = None
    if demo:
        from diffscore.app.digits import CLASS_NAMES, training_images

        if label_list is not None and label_list != list(CLASS_NAMES):
            raise EngineError(f"the demo digits are labelled {', '.join(CLASS_NAMES)}; --labels {','.join(label_list)!r} "
                              "does not match them (leave --labels out with --demo)")
        images, label_list, source = training_images(), list(CLASS_NAMES), "demo training digits"
    patterns = None if keep_float is None else [p for p in split(keep_float) or [] if p != "none"]
    res = run_calibration(engine, images=images, labels=label_list, source=source, samples=samples, method=method, seed=seed,
                          report=report, auto=auto, validation=validation, keep_float=patterns,
                          smoothquant_alpha=smoothquant, progress=True)
    if res.sensitivity:
        table = Table(title="INT8 sensitivity: each layer quantized alone, most sensitive first")
        table.add_column("layer", overflow="fold")
        for name in ("score error / margin", "flipped", "kept float"):
            table.add_column(name, justify="right")
        for r in res.sensitivity:
            table.add_row(r.layer, f"{r.score_error:.4f}", f"{r.flips:.0%}", "yes" if r.layer in res.float_layers else "")
        if res.total is not None:
            table.add_row("[bold]the INT8 UNet written[/]", f"{res.total.score_error:.4f}", f"{res.total.flips:.0%}", "")
        out.print(table)
    for kept, gate in res.auto_steps[1:]:
        out.print(f"auto: {kept} layers float -> {gate}")
    if res.gate is not None:
        out.print(str(res.gate))
    out.print(f"float layers ({len(res.float_layers)}): {', '.join(res.float_layers) or '-'}")
    if res.record.get("smoothquant"):
        sq = res.record["smoothquant"]
        out.print(f"SmoothQuant α={sq['alpha']:g}: {len(sq['norms'])} LayerNorms rescaled with the linear layers they feed")
    out.print(f"[green]wrote[/] {res.graph.file} ({len(res.quantized)} int8 layers, {res.record['method']}, "
              f"{res.record['samples']} samples) and {res.record['file']} in {engine}")


@app.command("train-prompts")
def train_prompts(
    model: Path = typer.Argument(..., help="local diffusers model folder"),
    data: str = typer.Option(..., "--data", help='JSONL of {"image": path, "caption": str} lines, or `demo` (the demo digits\' training split)'),
    shots: int = typer.Option(..., "--shots", "-k", help="training pairs per class (a class = a distinct caption)"),
    out_dir: Path = typer.Option(..., "--out", help="run directory: adapter.safetensors + training_log.json"),
    steps: int = typer.Option(200, help="optimiser steps, one random timestep each"),
    lr: float = typer.Option(1e-4, help="AdamW learning rate (DESIGN's 1e-4; on the demo 3e-3 learns in ~300 steps)"),
    batch_size: int = typer.Option(16, help="images per step"),
    seed: int = typer.Option(0, help="seed of the shots, timesteps, noise and LoRA init"),
    score_weights: bool = typer.Option(False, "--score-weights", help="also learn how much each scored attention layer counts (the engine pools the layers with these weights)"),
    overwrite: bool = typer.Option(False, help="replace an existing run directory's adapter"),
    preset: str = typer.Option(DEFAULT_DSD_PRESET, help="DSD preset trained for: discffusion (the default: attention + bias, a new "
                                                   "t and ε per pair, gradients clipped at 1.0) | diffscore (attention score)"),
):
    """Few-shot prompt learning for DSD matching: a rank-4 LoRA on the attention projections (export with --adapters)."""
    require_torch("train-prompts")
    from diffscore.app.digits import demo_pairs
    from diffscore.reference.prompt_learning import PromptLearningConfig, read_pairs
    from diffscore.reference.prompt_learning import train_prompts as run_training

    if shots < 1:
        raise EngineError(f"--shots must be ≥ 1, got {shots}")
    pairs = demo_pairs() if data == "demo" else read_pairs(Path(data))
    cfg = PromptLearningConfig(shots=shots, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                               score_weights=score_weights, preset=preset)
    run = run_training(model, pairs, out_dir, cfg, overwrite=overwrite)
    out.print(f"[green]wrote[/] {out_dir} ({run['pairs']} pairs, {len(run['captions'])} captions, {steps} steps, "
              f"loss {run['loss'][0]:.4f} -> {run['final_loss_mean20']:.4f} (mean of last 20), {run['wall_time_s']:.0f} s)")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app(standalone_mode=False)
    except EngineError as e:
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
