"""Build commands (the torch extra, except build-trt): export, build-trt, parity, profile, calibrate."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from diffscore.app.cli.options import (Backend, BackendOpt, BatchOpt, BuildPrecision, DefaultBudgetOpt, DefaultLossOpt,
                                       DefaultStagesOpt, DefaultStrategyOpt, DefaultTemplateOpt, DefaultTimestepsOpt,
                                       DefaultZOpt, DsdPresetChoice, ExportPrecision, LabelsFileOpt, LabelsOpt,
                                       LimitOpt, Loss, MinRoundsOpt, ModelArg, Precision, RangeMethod, RoundSizeOpt,
                                       SeedOpt, Strategy, app, flag_defaults, image_paths, read_labels, require_torch,
                                       split)
from diffscore.app.render import Format, emit, say
from diffscore.app.runs import ReadableImages, check_writable_dir
from diffscore.app.threads import ThreadsOpt, set_threads
from diffscore.engine.options import MAX_SEED
from diffscore.errors import EngineError, UsageMistake


@app.command()
def export(
    model: Path = ModelArg,
    out_dir: Path = typer.Argument(..., help="engine directory to create"),
    precision: List[ExportPrecision] = typer.Option([Precision.fp32.value], "--precision", "-p",
                                              help="fp32 and/or fp16 (repeat; int8 comes from `diffscore calibrate`)"),
    attention_layers: Optional[str] = typer.Option(None, help="cross-attention modules to score, comma separated "
                                                              "(default: last of each block)"),
    feature_blocks: Optional[str] = typer.Option(None, help="UNet blocks whose outputs the graph returns, e.g. "
                                                            "mid_block,up_blocks.1"),
    head_dir: List[Path] = typer.Option([], "--head-dir", help="a head folder from `diffscore train-head` to ship "
                                                               "(repeat)"),
    adapters: Optional[Path] = typer.Option(None, help="a `diffscore train-prompts` run directory: its LoRA is merged "
                                                       "into the UNet"),
    overwrite: bool = typer.Option(False, help="replace an existing engine directory"),
    dsd_preset: Optional[DsdPresetChoice] = typer.Option(
        None, help="DSD scoring preset: diffscore | discffusion (the seed's: its layers, timesteps, λ=1, conditional+"
                   "unconditional attention); default: the adapters', else discffusion"),
    diffdis: Optional[Path] = typer.Option(None, "--diffdis", help="a `diffscore train-diffdis` run to ship (one "
                                                                   "graph)"),
    template: Optional[str] = DefaultTemplateOpt, strategy: Optional[Strategy] = DefaultStrategyOpt,
    stages: Optional[str] = DefaultStagesOpt, loss: Optional[Loss] = DefaultLossOpt,
    z: Optional[float] = DefaultZOpt, min_rounds: Optional[int] = MinRoundsOpt,
    round_size: Optional[int] = RoundSizeOpt, budget: Optional[int] = DefaultBudgetOpt,
    timesteps: Optional[int] = DefaultTimestepsOpt, threads: Optional[int] = ThreadsOpt,
):
    """Export a diffusers model to an engine directory (ONNX graphs + manifest), atomically.

    The scoring defaults it records (change them later with `diffscore defaults`): the race in spread order
    until `diffscore profile` records a timestep order, template '{}', loss l2."""
    changes = flag_defaults(template, strategy, stages, loss, timesteps, z=z, min_rounds=min_rounds,
                            round_size=round_size, budget=budget)
    require_torch("export")
    set_threads(threads)
    from diffscore.export.onnx_export import export_engine

    precisions = tuple(dict.fromkeys(["fp32", *(p.value for p in precision)]))
    path = export_engine(model, out_dir, precisions=precisions, attention_layers=split(attention_layers),
                         feature_blocks=split(feature_blocks) or [], heads=head_dir, overwrite=overwrite,
                         adapters=adapters,
                         dsd_preset=dsd_preset.value if dsd_preset else None, diffdis=diffdis, defaults=changes)
    say(("wrote ", "green"), str(path))


@app.command("build-trt")
def build_trt(
    engine: Path = typer.Argument(..., help="engine directory"),
    precision: BuildPrecision = typer.Option(Precision.fp16.value, "--precision", "-p", help="which UNet graph to "
                                                                                             "build"),
    min_batch: int = typer.Option(1, min=1),
    opt_batch: Optional[int] = typer.Option(None, min=1, help="the batch TensorRT tunes for [default: --max-batch, "
                                            "the batch the runtime runs]"),
    max_batch: int = typer.Option(32, min=1),
    workspace_gib: Optional[float] = typer.Option(None, "--workspace-gib", help="cap on TensorRT's build scratch "
                                                  "memory, e.g. 2 on a Jetson [default: TensorRT's, the GPU's memory]"),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="timing cache file to reuse and update "
                                                "[default: one per GPU and TensorRT version in the engine]"),
):
    """Build TensorRT plans (strongly typed; precision comes from the ONNX) for this GPU."""
    from diffscore.export.tensorrt_build import build_plans

    for plan in build_plans(engine, precision=precision.value, min_batch=min_batch, opt_batch=opt_batch,
                            max_batch=max_batch, timing_cache=timing_cache, workspace_gib=workspace_gib):
        say(("plan ", "green"), f"{plan.file} ({plan.size / 1e6:.1f} MB)")


@app.command()
def parity(
    engine: Path = typer.Argument(..., help="engine directory"),
    images: Optional[List[str]] = typer.Argument(
        None, help="your images (files, folders or glob patterns) for the decision checks, with --labels; "
                   "default: the held-out digits on a demo-shaped engine, else random images (tensor checks only)"),
    model: Optional[Path] = typer.Option(None, help="source model folder (default: the one recorded in the manifest)"),
    limit: int = typer.Option(100, min=0, help="use at most N images for the decision checks (0: none)"),
    labels: Optional[str] = LabelsOpt, labels_file: Optional[Path] = LabelsFileOpt,
    threads: Optional[int] = ThreadsOpt,
):
    """Torch vs every available backend and precision: tensor errors, and top-1 decision agreement of
    fp32/fp16/int8 with torch fp32 on your images (or the demo digits); exit 1 on a failure."""
    require_torch("parity")
    set_threads(threads)
    from diffscore.app.demo import demo_parity_inputs
    from diffscore.export.parity import run_parity

    if images:
        label_list = read_labels(labels, labels_file)
        readable = ReadableImages(image_paths(images)[:limit])  # an unreadable image is skipped and reported
        inputs = dict(images=readable.readable_paths(), labels=label_list, source="of your images")
        for i in sorted(readable.errors):
            say(("SKIPPED", "yellow"), f" | {readable.errors[i]}")
        if not readable.read:
            readable.check()
    elif labels or labels_file:
        raise UsageMistake("--labels needs images to judge: diffscore parity ENGINE IMAGES... --labels a,b,c")
    else:
        inputs = demo_parity_inputs(engine, limit)
    if not run_parity(engine, model, echo=say, progress=True, **inputs):
        raise EngineError("parity failed: see the FAILED lines above")
    if images:
        readable.check("parity was judged on the other {n} (see the SKIPPED lines above)")


@app.command()
def profile(
    engine: Path = typer.Argument(..., help="engine directory: its manifest records the profile"),
    images: List[str] = typer.Argument(..., help="images to learn from: files, folders or glob patterns; no "
                                       "ground truth needed (keep your test images out)"),
    labels: Optional[str] = LabelsOpt, labels_file: Optional[Path] = LabelsFileOpt,
    template: Optional[str] = typer.Option(None, help="prompt template with one {} (default: the engine's)"),
    grid: Optional[int] = typer.Option(None, "--grid", min=2, help="points of the race's timestep grid (default 100)"),
    limit: Optional[int] = typer.Option(None, min=1, help="use only the first N images"),
    loss: Optional[Loss] = typer.Option(None, help="denoising error (default: the engine's)"),
    seed: int = SeedOpt, batch_size: Optional[int] = BatchOpt,
    backend: Backend = BackendOpt,
):
    """Learn the race's timestep order for an engine and record it in the manifest.

    Scores every label at every grid timestep of the images (labels × timesteps UNet passes per image),
    takes the exhaustive decision as the reference and orders the timesteps by how well they separate
    each image's winner from the other labels. `classify --strategy race` then visits them in that order."""
    import diffscore
    from diffscore.app.runs import engine_writer
    from diffscore.engine.images import expand_images
    from diffscore.engine.profiling import make_profile, save_profile
    from diffscore.export.atomic import disk_errors

    label_list = read_labels(labels, labels_file)
    readable = ReadableImages(expand_images(images)[:limit]).start()  # an unreadable image is skipped, reported
    with diffscore.load(engine, backend=backend.value) as eng, engine_writer(engine, "profile"):
        order = make_profile(eng, readable, label_list, templates=None if template is None else [template],
                             timesteps=grid, loss=loss.value if loss else None, seed=seed, batch_size=batch_size,
                             progress=True)
        with disk_errors(engine):
            save_profile(engine, order)
    say(f"profile of {len(order)} timesteps from {len(readable.read)} images saved in {engine}; first ten: "
        f"{', '.join(map(str, order[:10]))}")
    readable.check("the profile was learned from the other {n}")


@app.command()
def calibrate(
    engine: Path = typer.Argument(..., help="engine directory made by `diffscore export`"),
    images: Optional[List[str]] = typer.Argument(None, help="images like the ones you will score: files, folders or "
                                                            "globs"),
    demo: bool = typer.Option(False, "--demo", help="calibrate on the demo's training digits (never the held-out "
                                                    "ones)"),
    labels: Optional[str] = LabelsOpt, labels_file: Optional[Path] = LabelsFileOpt,
    samples: int = typer.Option(256, min=1, help="UNet inputs in the calibration set"),
    ranges: RangeMethod = typer.Option(RangeMethod.minmax.value, "--ranges", help="how activation ranges are set"),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="seed of the image split, the sampling and the shared noise"),
    report: bool = typer.Option(False, "--report", help="per-layer sensitivity: score error and flipped decisions"),
    auto: bool = typer.Option(False, "--auto", help="keep the most sensitive layers in float until the decision gate "
                                                    "holds"),
    validation: int = typer.Option(100, min=0, help="images held out of calibration for the decision gate (0: no "
                                                    "gate)"),
    keep_float: Optional[str] = typer.Option(None, help="layers to keep in float, name substrings comma separated "
                                             "(default: time_embedding,conv_in,conv_out,conv_shortcut; 'none')"),
    smoothquant: Optional[float] = typer.Option(None, "--smoothquant", metavar="ALPHA", help="SmoothQuant-style "
                                                                                             "scaling "
                                                "of LayerNorm -> linear layers before quantizing, α in (0, 1), e.g. "
                                                "0.5"),
    limit: Optional[int] = LimitOpt,
):
    """INT8 UNet: calibrate on real scoring inputs, quantize (Q/DQ), gate on decisions, record in the engine."""
    from diffscore.calibration.pipeline import calibrate as run_calibration

    label_list = read_labels(labels, labels_file, required=False)  # --demo brings its own
    if demo == bool(images):
        raise UsageMistake("give images (files, folders or globs) or --demo, not both")
    if engine.is_dir():  # a read-only or full disk shows now, not after the calibration work
        check_writable_dir(engine, f"calibrate writes the INT8 UNet into {engine}")
    source = None
    if demo:
        from diffscore.app.digits import CLASS_NAMES, training_images

        if label_list is not None and label_list != list(CLASS_NAMES):
            raise UsageMistake(f"the demo digits are labelled {', '.join(CLASS_NAMES)}; "
                               f"--labels {','.join(label_list)!r} "
                              "does not match them (leave --labels out with --demo)")
        pool, label_list, source = training_images(), list(CLASS_NAMES), "demo training digits"
    else:
        pool = image_paths(images)[:limit]
        source = f"{len(pool)} images ({', '.join(images[:3])}{', …' if len(images) > 3 else ''})"
    patterns = None if keep_float is None else [p for p in split(keep_float) or [] if p != "none"]
    res = run_calibration(engine, images=pool, labels=label_list, source=source, samples=samples, method=ranges.value,
                          seed=seed, report=report, auto=auto, validation=validation, keep_float=patterns,
                          smoothquant_alpha=smoothquant, progress=True)
    if res.sensitivity:
        rows = [{"layer": r.layer, "score error / margin": r.score_error, "flipped": f"{r.flips:.0%}",
                 "kept float": "yes" if r.layer in res.float_layers else ""} for r in res.sensitivity]
        if res.total is not None:
            rows.append({"layer": "the INT8 UNet written", "score error / margin": res.total.score_error,
                         "flipped": f"{res.total.flips:.0%}", "kept float": ""})
        emit(rows, Format.table, "INT8 sensitivity: each layer quantized alone, most sensitive first")
    for kept, gate in res.auto_steps[1:]:
        say(f"auto: {kept} layers float -> {gate}")
    if res.gate is not None:
        say(str(res.gate))
    say(f"float layers ({len(res.float_layers)}): {', '.join(res.float_layers) or '-'}")
    if res.record.smoothquant:
        sq = res.record.smoothquant
        say(f"SmoothQuant α={sq['alpha']:g}: {len(sq['norms'])} LayerNorms rescaled with the linear layers they feed")
    say(("wrote ", "green"), f"{res.graph.file} ({len(res.quantized)} int8 layers, {res.record.method}, "
        f"{res.record.samples} samples) and {res.record.file} in {engine}")
