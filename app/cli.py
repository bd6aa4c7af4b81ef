"""`diffscore` command line. Every user mistake is one line on stderr: exit 2 for usage (a flag, a
choice, a missing argument), exit 1 for a problem found while working (a file, an engine, a value).

One vocabulary across commands: images are positional files, folders or glob patterns; labels are
`--labels a,b,c` or `--labels-file FILE`; `-o/--output FILE` writes json/jsonl/csv by extension;
`--limit` counts images, `--timesteps` counts the (t, ε) pairs a candidate is scored at (DSD, DiffDis),
`--grid` the race's timestep grid, `--noise-steps` the fixed noise step(s) features are read at,
`--sampling-steps` a sampler's denoising steps, `--train-steps` optimiser steps, `--text` one caption
(repeat it), `--threads` torch's threads (docs/cli.md has the table).
Runtime commands (classify, match, info, demo on an
exported engine) need no torch; export, parity, calibrate and training need the `torch` extra.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.text import Text

from diffscore import __version__
from diffscore.app.render import Format, emit, err, error_line, say
from diffscore.app.runs import ReadableImages, check_output, check_target, check_writable_dir, save_rows
from diffscore.app.threads import ThreadsOpt, set_threads
from diffscore.engine.backends.choice import BACKENDS
from diffscore.engine.manifest import PRECISIONS
from diffscore.errors import EngineError, UsageMistake, not_a_file
from diffscore.kernels import LOSSES, STRATEGIES
from diffscore.kernels.cascade import SHORTLISTERS
from diffscore.kernels.dsd import DEFAULT_DSD_PRESET, DSD_PRESETS
from diffscore.kernels.timesteps import check_stages

try:  # recent typer bundles its own click (not installed beside it); older typer raises click's exceptions
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
    from typer.exceptions import Abort
except ImportError:  # pragma: no cover
    from click.exceptions import Abort, NoArgsIsHelpError, UsageError

app = typer.Typer(
    help="diffscore: diffusion models as compiled zero-shot classifiers and image-text matchers.",
    add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, rich_markup_mode=None,
)


def choices(name: str, values) -> type[Enum]:
    """A str Enum of allowed values: typer checks them before any work and lists them in --help."""
    return Enum(name, {v: v for v in values}, type=str)


Backend = choices("Backend", BACKENDS)
Precision = choices("Precision", PRECISIONS)
Loss = choices("Loss", LOSSES)
Method = choices("Method", ("dc", "head", "diffdis"))
MatchMethod = choices("MatchMethod", ("dsd", "diffdis", "itc"))
DiffDisMode = choices("DiffDisMode", ("denoise", "generate"))  # = engine.diffdis.MODES (tested)
DiffDisModeOpt = typer.Option(None, "--diffdis-mode", help="diffdis: denoise (lowest x0 error of the text embedding "
                              "over shared (t, ε) wins) | generate (text embedding generated from the image, cosine "
                              "similarity); default: the engine's")
HeadKind = choices("HeadKind", ("linear", "attention", "difformer"))  # = reference.heads.HEAD_KINDS (tested)
Sampler = choices("Sampler", ("dpm-solver", "ddim"))  # = reference.sampling.SAMPLERS (tested)
RangeMethod = choices("RangeMethod", ("minmax", "entropy", "percentile"))  # = calibration.quantize.METHODS (tested)
Strategy = choices("Strategy", STRATEGIES)
ExportPrecision = choices("ExportPrecision", ("fp32", "fp16"))  # int8 comes from calibrate, bf16 is a runtime hint
InfoFormat = choices("InfoFormat", ("table", "json"))
BuildPrecision = choices("BuildPrecision", ("fp32", "fp16", "int8"))  # bf16 is OpenVINO's, no TensorRT plan
Shortlister = choices("Shortlister", SHORTLISTERS)
DsdPresetChoice = choices("DsdPreset", DSD_PRESETS)
StrategyOpt = typer.Option(None, help="stages: fixed pruning stages | race: adaptive paired racing, stops when the "
                           "leader is z standard errors ahead | cascade: a head or DiffDis shortlists --k classes, the "
                           "race decides among them (default: the engine's; --stages implies stages)")
ZOpt = typer.Option(None, "--z", help="race: standard errors behind the leader that drop a candidate "
                    "(default: the engine's)")
BudgetOpt = typer.Option(None, min=1, help="race: at most this many UNet passes per image")

BackendOpt = typer.Option(Backend.auto.value, "--backend", "-b", help="where to run (auto: a GPU backend if any, else "
                          "the CPU backend measured fastest for this engine on this machine)")
PrecisionOpt = typer.Option(Precision.fp32.value, "--precision", "-p", help="UNet precision (bf16: OpenVINO on CPUs "
                            "with AVX-512 BF16 or AMX)")
FormatOpt = typer.Option(Format.table.value, "--format", "-f", help="stdout format")
OutputOpt = typer.Option(None, "--output", "-o", help="also write the results to FILE (.json, .jsonl or .csv)")
SeedOpt = typer.Option(0, min=0, max=2**32 - 1, help="seed of the shared noise: same seed, same scores")
BatchOpt = typer.Option(None, min=1, help="UNet batch (default: automatic)")
ModelArg = typer.Argument(..., help="local diffusers model folder")
PairsOpt = typer.Option(None, "--data", help='JSONL of {"image": path, "caption": str} lines')
LabelsOpt = typer.Option(None, "--labels", "-l", help="class names, comma separated")
LabelsFileOpt = typer.Option(None, "--labels-file", help="class names, one per line (UTF-8)")
ImagesArg = typer.Argument(..., help="image files, folders (searched into subfolders) or glob patterns",
                           show_default=False)
LimitOpt = typer.Option(None, "--limit", min=1, help="use only the first N images")


def version_callback(value: bool) -> None:
    if value:
        say(f"diffscore {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                              help="print the version and exit")):
    """diffscore: diffusion models as compiled zero-shot classifiers and image-text matchers."""


# --- argument parsing helpers ---------------------------------------------------------------------
def require_torch(command: str) -> None:
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("diffusers") is None:
        raise EngineError(f"`diffscore {command}` needs the torch extra: pip install 'diffscore[torch]'")


def parse_stages(text: str | None) -> list[tuple[int, int]] | None:
    """'50:5,500:1' -> [(50, 5), (500, 1)]; None (the engine's) when not given, '' refused below."""
    if text is None:
        return None
    try:
        stages = [tuple(int(v) for v in part.split(":")) for part in text.split(",")]
    except ValueError:
        stages = []
    if not stages or any(len(s) != 2 or min(s) < 1 for s in stages):
        raise UsageMistake(f"--stages {text!r} is not like '50:5,500:1' (n_samples:keep, positive, comma separated)")
    try:
        check_stages(stages)  # keep counts that grow, before anything reads the stages
    except ValueError as e:
        raise UsageMistake(f"--stages {text!r}: {e}") from None
    return stages  # type: ignore[return-value]


def race_options(strategy, z: float | None, budget: int | None) -> dict:
    """classify's race keywords from --strategy/--z/--budget; the race flags need the race."""
    strategy = getattr(strategy, "value", strategy)
    if (z is not None or budget is not None) and strategy not in (None, "race", "cascade"):
        raise UsageMistake("--z and --budget tune the race; use them with --strategy race (or cascade)")
    if z is not None and not z > 0:
        raise UsageMistake(f"--z {z}: z must be > 0 (standard errors behind the leader that drop a candidate)")
    if strategy is None and (z is not None or budget is not None):
        strategy = "race"
    return {"strategy": strategy, "z": z, "budget": budget}


def cascade_options(shortlist, k: int | None, mass: float | None) -> dict:
    """classify's cascade keywords (the engine refuses them without --strategy cascade)."""
    given = {"shortlist": getattr(shortlist, "value", shortlist), "k": k, "mass": mass}
    return {name: v for name, v in given.items() if v is not None}


def split(text: str | None) -> list[str] | None:
    """'a, b,c' -> ['a', 'b', 'c']; None or '' -> None."""
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def parse_steps(text: str, flag: str = "--noise-steps") -> list[int]:
    """'50,200' -> [50, 200]."""
    try:
        steps = [int(x) for x in split(text) or []]
    except ValueError:
        steps = []
    if not steps or min(steps) < 0:
        raise UsageMistake(f"{flag} {text!r} is not like '50,200' (noise steps, comma separated integers ≥ 0)")
    return steps


def one_step(text: str) -> int:
    """--noise-steps where a command reads features at one fixed step: '50' -> 50."""
    steps = parse_steps(text)
    if len(steps) != 1:
        raise UsageMistake(f"--noise-steps {text!r}: this command reads one fixed noise step, e.g. --noise-steps 50")
    return steps[0]


def read_text_lines(path: Path, what: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file (a byte-order mark dropped); one line naming the file and the
    encoding otherwise."""
    if not path.is_file():
        raise EngineError(not_a_file(path, what))
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise EngineError(f"{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise EngineError(f"cannot read {what} {path}: {e.strerror or e}") from None


TextOpt = typer.Option(None, "--text", "-t", help="a caption, commas and all (repeat the option for several)")
TextsFileOpt = typer.Option(None, "--texts-file", help="captions, one per line (UTF-8)")


def read_texts(texts: list[str] | None, texts_file: Path | None) -> list[str]:
    """--text (repeated) or --texts-file: each --text is one caption, commas included; a lone caption with a
    comma gets a note, since `--text "a,b"` may have meant two."""
    if (not texts) == (texts_file is None):
        raise UsageMistake("give the captions: --text 'a cat' (repeat) or --texts-file FILE, not both")
    if texts_file is not None:
        return read_text_lines(texts_file, "texts file")
    if len(texts) == 1 and "," in texts[0]:
        err.print(f"note: one caption {texts[0]!r} (a comma stays in its caption; repeat --text for several)")
    return list(texts)


def read_labels(labels: str | None, labels_file: Path | None, required: bool = True) -> list[str] | None:
    """--labels or --labels-file (exactly one); None when neither is given and they are optional."""
    if not required and labels is None and labels_file is None:
        return None
    if (labels is None) == (labels_file is None):
        raise UsageMistake("give exactly one of --labels a,b,c or --labels-file FILE")
    if labels_file is not None:
        return read_text_lines(labels_file, "labels file")
    return split(labels) or []


def image_paths(images: List[str]) -> list[Path]:
    from diffscore.engine.images import expand_images

    return expand_images(images)


def open_engine(engine: Path, backend, precision):
    """diffscore.load, with the precisions and backends --help offers but this engine or machine cannot run
    refused as usage mistakes (exit 2) before anything loads."""
    import diffscore
    from diffscore.engine.manifest import Manifest, unet_graph

    backend, precision = getattr(backend, "value", backend), getattr(precision, "value", precision)
    manifest = Manifest.load(engine)
    if unet_graph(precision) not in manifest.graphs:
        have = ", ".join(p for p in ("fp32", "fp16", "int8") if unet_graph(p) in manifest.graphs)
        how = "diffscore export --precision fp16" if precision == "fp16" else "diffscore calibrate"
        raise UsageMistake(f"--precision {precision}: {engine} has no {precision} UNet (it has {have}); make one with "
                           f"`{how}` or pick one it has")
    if precision == "bf16" and backend not in ("auto", "openvino"):
        raise UsageMistake(f"--precision bf16 runs on --backend openvino only, not {backend}")
    return diffscore.load(engine, backend=backend, precision=precision)


def plan_line(eng, labels: list[str], images: int, template: str | None, stages, **race) -> None:
    """Before a long Diffusion Classifier run: its UNet passes per image (and time, where known) on stderr."""
    from diffscore.app.defaults import classify_plan
    from diffscore.engine.options import check_labels, check_template

    check_labels(labels)
    if template is not None:
        check_template(template)
    line = classify_plan(eng, labels, images, stages=stages, **race)
    if line:
        err.print(line)


def finish(rows: list[dict], fmt: Format, output: Path | None, title: str, table_rows: list[dict] | None = None) -> None:
    """Rows to stdout (`table_rows`, if given, for the table) and to -o FILE (kept in a fallback file if it
    cannot be written now: app/runs.py); the note on the file goes to stderr, so stdout stays machine-readable."""
    emit(table_rows if fmt is Format.table and table_rows is not None else rows, fmt, title)
    if output is not None:
        save_rows(rows, output)
        err.print(Text.assemble(("wrote ", "green"), str(output), f" ({len(rows)} rows)"))


# --- runtime commands -----------------------------------------------------------------------------
@app.command()
def classify(
    engine: Path = typer.Argument(..., help="engine directory made by `diffscore export`"),
    images: List[str] = ImagesArg,
    labels: Optional[str] = LabelsOpt, labels_file: Optional[Path] = LabelsFileOpt,
    method: Method = typer.Option(Method.dc.value, help="dc: zero-shot Diffusion Classifier | head: a trained head, "
                                  "one UNet pass per noise step (labels are the head's) | diffdis: the engine's DiffDis "
                                  "(`export --diffdis`), one image pass"),
    head: Optional[str] = typer.Option(None, help="the head's name (--method head), when the engine has several"),
    template: Optional[str] = typer.Option(None, help="prompt template with one {}, e.g. 'a photo of a {}' (default: the engine's)"),
    stages: Optional[str] = typer.Option(None, help="pruning stages n_samples:keep, e.g. 50:5,500:1 (default: the engine's)"),
    loss: Optional[Loss] = typer.Option(None, help="denoising error (default: the engine's)"),
    seed: int = SeedOpt, batch_size: Optional[int] = BatchOpt,
    backend: Backend = BackendOpt, precision: Precision = PrecisionOpt,
    fmt: Format = FormatOpt, output: Optional[Path] = OutputOpt,
    strategy: Optional[Strategy] = StrategyOpt, z: Optional[float] = ZOpt, budget: Optional[int] = BudgetOpt,
    diffdis_mode: Optional[DiffDisMode] = DiffDisModeOpt,
    timesteps: Optional[int] = typer.Option(None, min=1, help="diffdis denoise: shared (t, ε) per label (default: "
                                            "the engine's)"),
    limit: Optional[int] = LimitOpt,
    shortlist: Optional[Shortlister] = typer.Option(None, help="cascade: who shortlists, the engine's head (--head) "
                                                    "or its DiffDis (default: head)"),
    k: Optional[int] = typer.Option(None, "--k", min=1, help="cascade: classes the race decides among (default 3; "
                                    "with --mass: at most)"),
    mass: Optional[float] = typer.Option(None, "--mass", min=0.0, max=1.0, help="cascade: per image, the fewest best "
                                         "classes whose shortlister probability sums to MASS (at most --k)"),
):
    """Classify images: the zero-shot Diffusion Classifier (default), a trained head (--method head) or
    DiffDis (--method diffdis). --strategy cascade: a head or DiffDis shortlists --k classes, the race decides.

    confidence: the winner's lead over the best other class in standard errors of their paired errors (a head:
    its logit lead over the runner-up, log(p1/p2))."""
    check_output(output)
    label_list = read_labels(labels, labels_file, required=method is not Method.head)  # a head has its own labels
    paths = image_paths(images)[:limit]
    stage_list = parse_stages(stages)
    if method is not Method.diffdis and (diffdis_mode or timesteps):
        raise UsageMistake("--diffdis-mode and --timesteps go with --method diffdis")
    if head is not None and method is not Method.head:
        raise UsageMistake(f"--head {head} names a trained head; use it with --method head")
    extra = {"diffdis_mode": diffdis_mode.value if diffdis_mode else None, "timesteps": timesteps} if method is Method.diffdis else {}
    readable = ReadableImages(paths).start()  # an unreadable image becomes an error row; the others are scored
    with open_engine(engine, backend, precision) as eng:
        if method is Method.dc:
            plan_line(eng, label_list, len(paths), template, stage_list, **race_options(strategy, z, budget))
        results = eng.classify(readable, label_list, method=method.value, head=head, template=template,
                               stages=stage_list, loss=loss.value if loss else None, seed=seed, batch_size=batch_size,
                               progress=True, **race_options(strategy, z, budget), **extra,
                               **cascade_options(shortlist, k, mass))
        title = (f"head {eng.head_name(head)} (higher probability = better)" if method is Method.head
                 else "DiffDis (higher score = better)" if method is Method.diffdis
                 else "Diffusion Classifier (lower mean error = better)")
    score = {Method.head: "probability", Method.diffdis: "score"}.get(method, "mean_error")
    rows = []
    for p, r in zip(readable.read_paths, results):
        row = {"image": str(p), "label": r.label, score: r.ranking[0][1],
               "runner_up": r.ranking[1][0] if len(r.ranking) > 1 else "", "passes": r.passes,
               **({} if r.confidence is None else {"confidence": r.confidence})}
        rows.append({**row, **r.to_dict()})
    table = [{k: v for k, v in row.items() if k not in ("ranking", "options")} for row in readable.rows(rows, "")]
    finish(readable.rows(rows), fmt, output, title, table)
    readable.check()


@app.command()
def match(
    engine: Path = typer.Argument(..., help="engine directory"),
    images: List[str] = ImagesArg,
    texts: Optional[List[str]] = TextOpt, texts_file: Optional[Path] = TextsFileOpt,
    timesteps: Optional[int] = typer.Option(None, min=1, help="timesteps per pair (DSD), shared (t, ε) per text "
                                            "(diffdis denoise) (default: the engine's)"),
    bias_weight: Optional[float] = typer.Option(None, help="λ of the denoising bias (default: the engine's DSD preset's: "
                                                "discffusion 1, diffscore 0)"),
    seed: int = SeedOpt, batch_size: Optional[int] = BatchOpt,
    backend: Backend = BackendOpt, precision: Precision = PrecisionOpt,
    fmt: Format = FormatOpt, output: Optional[Path] = OutputOpt,
    method: MatchMethod = typer.Option(MatchMethod.dsd.value, "--method", help="dsd: DSD attention scores | diffdis: "
                                       "the engine's DiffDis (`export --diffdis`), one image pass for all texts | itc: "
                                       "cosine similarity of a `diffscore finetune` run's embeddings (one UNet pass per image)"),
    diffdis_mode: Optional[DiffDisMode] = DiffDisModeOpt,
    limit: Optional[int] = LimitOpt,
):
    """Image-text matching: an images x texts matrix of scores (higher = better match): DSD, DiffDis or ITC."""
    check_output(output)
    text_list = read_texts(texts, texts_file)
    paths = image_paths(images)[:limit]
    if method is not MatchMethod.diffdis and diffdis_mode:
        raise UsageMistake("--diffdis-mode goes with --method diffdis")
    if method is not MatchMethod.dsd and bias_weight is not None:
        raise UsageMistake(f"--bias-weight is DSD's; --method {method.value} has none")
    extra = {"diffdis_mode": diffdis_mode.value if diffdis_mode else None} if method is MatchMethod.diffdis else {}
    readable = ReadableImages(paths).start()  # an unreadable image becomes an error row; the others are scored
    with open_engine(engine, backend, precision) as eng:
        res = eng.match(readable, text_list, steps=timesteps, bias_weight=bias_weight, seed=seed,
                        batch_size=batch_size, progress=True, method=method.value, **extra)
    read, best = readable.read_paths, res.best()
    if fmt is Format.table:
        rows = [{"image": str(p), **{t: float(s) for t, s in zip(res.texts, row)}, "best": b}
                for p, row, b in zip(read, res.scores, best)]
    else:
        rows = [{"image": str(p), "best": b, "scores": dict(zip(res.texts, map(float, row))),
                 "options": res.options.to_dict()} for p, row, b in zip(read, res.scores, best)]
    title = {MatchMethod.dsd: "DSD", MatchMethod.diffdis: "DiffDis", MatchMethod.itc: "ITC"}[method]
    finish(readable.rows(rows), fmt, output, f"{title} scores (higher = better match)", readable.rows(rows, ""))
    readable.check()


@app.command()
def info(engine: Path = typer.Argument(..., help="engine directory"),
         verify: bool = typer.Option(False, "--verify", help="also check every file's sha256 (slow for big graphs)"),
         fmt: InfoFormat = typer.Option(Format.table.value, "--format", "-f", help="table (for people) or json")):
    """What an engine directory holds: graphs, precisions, plans, captured layers, heads, defaults."""
    import dataclasses

    from diffscore.engine.manifest import Manifest

    fmt = Format(fmt.value)
    m = Manifest.load(engine)
    bad = m.verify(engine) if verify else []
    if fmt is Format.json:
        record = dataclasses.asdict(m)
        record.pop("alphas_cumprod")
        record["verified"] = None if not verify else not bad
        sys.stdout.write(json.dumps(record, indent=1) + "\n")
    else:
        say((str(engine), "bold"), f" (format {m.format_version}, diffscore {m.diffscore_version})")
        say(f"source {m.source_path} sha256 {m.source_sha256[:12]}; "
            f"{'pixel space' if m.pixel_space else f'latent space (scaling {m.latent_scaling})'}; "
            f"image {m.image_size}px x{m.image_channels}; sample {m.sample_shape}; T={len(m.alphas_cumprod)}; "
            f"predicts {m.prediction_type}; DSD preset {m.defaults.dsd_preset}")
        rows = [{"graph": k, "file": g.file, "precision": g.precision, "MB": g.size / 1e6} for k, g in m.graphs.items()]
        rows += [{"graph": k, "file": p.file, "precision": p.precision, "MB": p.size / 1e6} for k, p in m.plans.items()]
        emit(rows)
        if m.conditioning == "sdxl":
            say(f"conditioning: sdxl (two tokenizers; UNet inputs "
                f"{', '.join(t.name for t in m.graphs['unet'].inputs)}; time ids {m.time_ids})")
        say(f"attention layers: {', '.join(m.attention_layers) or '-'}")
        say(f"feature blocks: {', '.join(m.feature_blocks) or '-'}; merged adapters: {', '.join(m.adapters) or '-'}")
        for name, a in m.adapters.items():
            if a.score_weights:
                say(f"{name} score weights: " + ", ".join(f"{k} {v:.3f}" for k, v in a.score_weights.items()))
        for name, h in m.heads.items():
            say(f"head {name}: {h.kind} on {', '.join(h.blocks)} at steps {h.steps}, "
                f"{len(h.labels)} labels ({', '.join(h.labels[:5])}{', …' if len(h.labels) > 5 else ''})"
                + (f"; DifFeed feedback {', '.join(':'.join(p) for p in h.feedback)}, 2 UNet passes per step"
                   if h.feedback else ""))
            if h.training is not None:
                say(f"  {h.training.describe()}")
        if m.itc is not None:
            say(f"itc (match --method itc): {', '.join(m.itc.blocks)} at step {m.itc.noise_step}, {m.itc.dim}-d, "
                f"trained with {'+'.join(m.itc.objectives)}")
        say(f"defaults: {json.dumps(dataclasses.asdict(m.defaults))}")
        if m.diffdis is not None:
            d = m.diffdis
            say(f"diffdis: on {', '.join(d.blocks)} at t = {d.image_step}; default mode {d.mode} ({d.timesteps} shared "
                f"(t, ε); generate: {d.generate_steps} DDIM steps)")
        if m.calibration is not None:
            c = m.calibration
            say(f"int8: {c.method} on {c.samples} samples from {c.source}; {len(c.float_layers)} layers float"
                + (f"; gate {c.gate['agreement']:.2%} on {c.gate['images']} images" if c.gate else ""))
        from diffscore.engine.autoselect import auto_lines

        for line in auto_lines(m):
            say(line)
    if bad:
        raise EngineError(f"sha256 mismatch in {', '.join(bad)}: the engine directory is damaged; re-export it")
    if verify and fmt is Format.table:
        say(("all sha256 match", "green"))


@app.command()
def demo(
    limit: Optional[int] = typer.Option(None, min=1, help="classify only the first N held-out images"),
    backend: Backend = BackendOpt, precision: Precision = PrecisionOpt,
    stages: Optional[str] = typer.Option(None, help="override the demo's stages, e.g. 10:3,40:1"),
    strategy: Optional[Strategy] = StrategyOpt, z: Optional[float] = ZOpt, budget: Optional[int] = BudgetOpt,
):
    """The main job: zero-shot classification of held-out handwritten digits on the demo model."""
    require_torch("demo")  # the first run exports the demo model; the digits come from scikit-learn (same extra)
    import diffscore
    from diffscore.app.demo import demo_engine_dir, logistic_baseline, run_demo
    from diffscore.app.digits import load_digits_split

    stage_list = parse_stages(stages)
    engine_dir = demo_engine_dir(precisions=("fp32", precision.value) if precision is Precision.fp16 else ("fp32",))
    with diffscore.load(engine_dir, backend=backend.value, precision=precision.value) as eng:
        res = run_demo(eng, limit=limit, stages=stage_list, **race_options(strategy, z, budget))
        where = f"{eng.backend}, {precision.value}"
    baseline = logistic_baseline(load_digits_split())
    rows = [
        {"method": f"Diffusion Classifier, zero-shot ({where})", "accuracy": f"{res['accuracy']:.2%}",
         "UNet passes/image": res["passes_per_image"], "images/s": res["images_per_s"]},
        {"method": "logistic regression on pixels (trained)", "accuracy": f"{baseline:.2%}", "UNet passes/image": 0.0,
         "images/s": float("nan")},
    ]
    emit(rows, Format.table, f"held-out digits: {res['images']} images, wall {res['seconds']:.1f} s")


# --- scoring defaults: recorded at export, changed by `diffscore defaults` (app/defaults.py) -------
DefaultTemplateOpt = typer.Option(None, help="default prompt template, one {} for the label (fresh export: '{}')")
DefaultStrategyOpt = typer.Option(None, help="default strategy: race (fresh export: adaptive, spread order until "
                                  "`diffscore profile`) | stages (fixed pruning stages)")
DefaultStagesOpt = typer.Option(None, help="default pruning stages n_samples:keep for --strategy stages, "
                                "e.g. 50:5,500:1")
DefaultLossOpt = typer.Option(None, help="default denoising error (fresh export: l2)")
DefaultZOpt = typer.Option(None, "--z", help="race: standard errors behind the leader that drop a candidate")
MinRoundsOpt = typer.Option(None, "--min-rounds", min=1, help="race: rounds before the first candidate may leave")
RoundSizeOpt = typer.Option(None, "--round-size", min=1, help="race: timesteps per round")
DefaultBudgetOpt = typer.Option(None, "--budget", min=1, help="race: at most this many UNet passes per image")
DefaultTimestepsOpt = typer.Option(None, "--timesteps", min=1, help="default DSD timesteps per pair (match)")


def flag_defaults(template, strategy, stages, loss, timesteps, **race) -> dict:
    """The scoring defaults export and `defaults` were given, checked (app/defaults.scoring_changes)."""
    from diffscore.app.defaults import scoring_changes

    return scoring_changes(template=template, strategy=getattr(strategy, "value", None), stages=parse_stages(stages),
                           loss=getattr(loss, "value", None), timesteps=timesteps, **race)


@app.command("defaults")
def defaults_command(
    engine: Path = typer.Argument(..., help="engine directory"),
    template: Optional[str] = DefaultTemplateOpt, strategy: Optional[Strategy] = DefaultStrategyOpt,
    stages: Optional[str] = DefaultStagesOpt, loss: Optional[Loss] = DefaultLossOpt,
    z: Optional[float] = DefaultZOpt, min_rounds: Optional[int] = MinRoundsOpt,
    round_size: Optional[int] = RoundSizeOpt, budget: Optional[int] = DefaultBudgetOpt,
    timesteps: Optional[int] = DefaultTimestepsOpt,
    reset: bool = typer.Option(False, "--reset", help="first go back to what a fresh export records"),
):
    """Show an engine's scoring defaults (what classify and match use when not told), or change them:
    the manifest is rewritten atomically, under the engine's writer lock."""
    from diffscore.app.defaults import change_defaults, describe
    from diffscore.engine.manifest import Manifest

    changes = flag_defaults(template, strategy, stages, loss, timesteps, z=z, min_rounds=min_rounds,
                            round_size=round_size, budget=budget)
    defaults = change_defaults(engine, changes, reset) if changes or reset else Manifest.load(engine).defaults
    if changes or reset:
        say(("changed ", "green"), f"the scoring defaults of {engine}: {', '.join(changes) or 'reset'}")
    for line in describe(defaults, Manifest.load(engine).timestep_profile):
        say(line)


# --- build commands (torch extra) -----------------------------------------------------------------
@app.command()
def export(
    model: Path = ModelArg,
    out_dir: Path = typer.Argument(..., help="engine directory to create"),
    precision: List[ExportPrecision] = typer.Option([Precision.fp32.value], "--precision", "-p",
                                              help="fp32 and/or fp16 (repeat; int8 comes from `diffscore calibrate`)"),
    attention_layers: Optional[str] = typer.Option(None, help="cross-attention modules to score, comma separated (default: last of each block)"),
    feature_blocks: Optional[str] = typer.Option(None, help="UNet blocks whose outputs the graph returns, e.g. mid_block,up_blocks.1"),
    head_dir: List[Path] = typer.Option([], "--head-dir", help="a head folder from `diffscore train-head` to ship (repeat)"),
    adapters: Optional[Path] = typer.Option(None, help="a `diffscore train-prompts` run directory: its LoRA is merged into the UNet"),
    overwrite: bool = typer.Option(False, help="replace an existing engine directory"),
    dsd_preset: Optional[DsdPresetChoice] = typer.Option(
        None, help="DSD scoring preset: diffscore | discffusion (the seed's: its layers, timesteps, λ=1, conditional+"
                   "unconditional attention); default: the adapters', else discffusion"),
    diffdis: Optional[Path] = typer.Option(None, "--diffdis", help="a `diffscore train-diffdis` run to ship (one graph)"),
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
                         feature_blocks=split(feature_blocks) or [], heads=head_dir, overwrite=overwrite, adapters=adapters,
                         dsd_preset=dsd_preset.value if dsd_preset else None, diffdis=diffdis, defaults=changes)
    say(("wrote ", "green"), str(path))


@app.command("train-head")
def train_head_command(
    model: Path = ModelArg,
    data: Optional[Path] = typer.Option(None, "--data", help="labelled image folder: one subfolder per class (folder name = label)"),
    demo: bool = typer.Option(False, "--demo", help="the demo digits' training split (1,347 images) instead of --data"),
    kind: HeadKind = typer.Option(HeadKind.difformer.value, "--kind", help="the head's architecture"),
    blocks: str = typer.Option("down_blocks.1,mid_block", help="UNet blocks to read (diffusers module names), comma separated"),
    noise_steps: str = typer.Option("50,200", "--noise-steps", help="noise steps, comma separated: one UNet pass each per image"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="head folder to write (default: head-<kind>); its name names the head in an engine"),
    prompt: str = typer.Option("", help="conditioning of the feature passes (default: the empty prompt)"),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="seed of the fixed noise, the initialisation, the validation split and shuffling"),
    epochs: int = typer.Option(100, min=1, help="at most; training stops early on a 10% validation split"),
    overwrite: bool = typer.Option(False, help="replace an existing head folder"),
    synthesize: Optional[int] = typer.Option(None, "--synthesize", min=1, help="no images needed: generate N images per "
                                             "label with the model itself and train on them (needs --labels)"),
    pseudo_label: Optional[Path] = typer.Option(None, "--pseudo-label", help="no labels needed: this engine's Diffusion "
                                                "Classifier labels the --data images (a folder of unlabelled images)"),
    labels: Optional[str] = LabelsOpt, labels_file: Optional[Path] = LabelsFileOpt,
    template: Optional[str] = typer.Option(None, help="--synthesize: the prompt per label, one {} (default {}); "
                                           "--pseudo-label: the DC's template (default: the engine's)"),
    sampler: Sampler = typer.Option("dpm-solver", help="--synthesize: the diffusers sampler (DPM-Solver++ or DDIM)"),
    sampling_steps: int = typer.Option(10, "--sampling-steps", min=1, help="--synthesize: denoising steps per image"),
    guidance: float = typer.Option(2.0, min=0.0, help="--synthesize: classifier-free guidance scale (≤ 1: none)"),
    save_samples: Optional[Path] = typer.Option(None, "--save-samples", help="--synthesize: also write the generated "
                                                "images to DIR/<label>/ (reuse them with --data DIR)"),
    min_confidence: Optional[float] = typer.Option(None, "--min-confidence", help="--pseudo-label: keep decisions at "
                                                   "least this many standard errors ahead of their best rival (default 1)"),
    strategy: Optional[Strategy] = StrategyOpt, backend: Backend = BackendOpt,
    feedback: bool = typer.Option(False, "--feedback", help="DifFeed: feed decoder outputs of a first UNet pass, through "
                                  "small learned modules trained with the head, into the mirrored encoder blocks of a "
                                  "second pass whose features the head reads (2 UNet passes per noise step)"),
    feedback_pairs: Optional[str] = typer.Option(None, "--feedback-pairs", help="with --feedback: SOURCE:TARGET block "
                                                 "pairs, comma separated (default: every up_blocks.i into its mirrored "
                                                 "down block, where that reaches the head's blocks)"),
    threads: Optional[int] = ThreadsOpt,
):
    """Train a head on UNet block features (extracted once, cached); then `export --head-dir`.

    The training images come with labels (--data FOLDER/<label>/, --demo), from the model itself
    (--synthesize N --labels a,b,...), or labelled by an engine's Diffusion Classifier
    (--pseudo-label ENGINE --data FOLDER --labels a,b,...); the head records which. One UNet pass per
    noise step; with --feedback a DifFeed head (two passes per step, slower to train)."""
    out_dir = out_dir or Path(f"head-{kind.value}")
    if out_dir.exists() and not overwrite:
        raise EngineError(f"{out_dir} already exists; pass --overwrite to replace it")
    check_label_free_flags(data, demo, synthesize, pseudo_label, save_samples, min_confidence, strategy, template,
                           labels is not None or labels_file is not None)
    spec_blocks, steps = split(blocks) or [], parse_steps(noise_steps)
    classes = read_labels(labels, labels_file, required=synthesize is not None or (pseudo_label is not None and not demo))
    if feedback_pairs is not None and not feedback:
        raise UsageMistake("--feedback-pairs needs --feedback")
    pairs = [[b.strip() for b in p.split(":")] for p in split(feedback_pairs) or []] if feedback else None
    require_torch("train-head")
    set_threads(threads)
    from diffscore.app.demo import cache_root
    from diffscore.reference.features import FeatureSpec
    from diffscore.reference.head_training import TrainOptions, train_head_on_images
    from diffscore.reference.heads import save_head

    comp = None  # the loaded model, where generating samples loaded it already
    if synthesize is not None:
        from diffscore.app.label_free import synthetic_set

        images, targets, origin, comp = synthetic_set(model, classes, synthesize, template or "{}", sampler.value,
                                                      sampling_steps, guidance, seed, save_samples, overwrite)
    elif pseudo_label is not None:
        from diffscore.app.label_free import pseudo_labelled_set

        images, targets, origin, classes = pseudo_labelled_set(
            pseudo_label, data, demo, classes, 1.0 if min_confidence is None else min_confidence, backend.value,
            template=template, strategy=strategy.value if strategy else None)
    elif demo:
        from diffscore.app.digits import CLASS_NAMES, load_digits_split

        digits = load_digits_split()
        images, targets, classes = list(digits.train_images), digits.train_labels, list(CLASS_NAMES)
    else:
        from diffscore.engine.images import image_folder
        from diffscore.reference.sampling import saved_record

        images, targets, classes = image_folder(data)
    if synthesize is None and pseudo_label is None:
        from diffscore.engine.manifest import HeadTraining

        origin = (None if demo else saved_record(data)) or HeadTraining(source="labels")
        origin.images = len(images)
    spec = FeatureSpec(blocks=spec_blocks, steps=steps, seed=seed, prompt=prompt)
    trained, config = train_head_on_images(model, images, targets, classes, kind.value, spec,
                                           TrainOptions(epochs=epochs, seed=seed), cache_root() / "features", progress=True,
                                           origin=origin, feedback=pairs, comp=comp)
    save_head(trained, config, out_dir)
    say(config.origin.describe())
    t = config.training
    val = f"validation accuracy {t['val_accuracy']:.2%} on {t['val_images']} images" if t["val_images"] else "no validation split"
    fed = f" (DifFeed: {', '.join(':'.join(p) for p in config.feedback.pairs)} fed back)" if config.feedback else ""
    say(("wrote ", "green"), f"{out_dir}: {kind.value} head{fed} on {', '.join(spec.blocks)} at steps {spec.steps}, "
        f"{len(classes)} classes, {t['images']} training images, {val}, best epoch {t['best_epoch']} of {t['epochs']}")
    say(f"next: diffscore export {model} ENGINE_DIR --head-dir {out_dir}")


def check_label_free_flags(data, demo, synthesize, pseudo_label, save_samples, min_confidence, strategy, template,
                           labels_given: bool) -> None:
    """train-head's sources of training images, and the flags that belong to one of them, before any work."""
    if synthesize is not None and pseudo_label is not None:
        raise UsageMistake("--synthesize and --pseudo-label are two ways to train without labels; pick one")
    if synthesize is not None and (demo or data is not None):
        raise UsageMistake("--synthesize makes its own training images; drop --data/--demo")
    if synthesize is None and demo == (data is not None):
        raise UsageMistake("give exactly one of --data FOLDER, --demo, --synthesize N or --pseudo-label ENGINE --data FOLDER")
    if save_samples is not None and synthesize is None:
        raise UsageMistake("--save-samples saves the images --synthesize makes; use it with --synthesize")
    if (min_confidence is not None or strategy is not None) and pseudo_label is None:
        raise UsageMistake("--min-confidence and --strategy choose the pseudo-labels; use them with --pseudo-label")
    if synthesize is None and pseudo_label is None and (template is not None or labels_given):
        raise UsageMistake("--labels and --template go with --synthesize or --pseudo-label; labelled folders name "
                          "their classes by subfolder")


@app.command("build-trt")
def build_trt(
    engine: Path = typer.Argument(..., help="engine directory"),
    precision: BuildPrecision = typer.Option(Precision.fp16.value, "--precision", "-p", help="which UNet graph to build"),
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
    from diffscore.engine.images import expand_images
    from diffscore.engine.profiling import make_profile, save_profile

    from diffscore.app.runs import engine_writer
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
    images: Optional[List[str]] = typer.Argument(None, help="images like the ones you will score: files, folders or globs"),
    demo: bool = typer.Option(False, "--demo", help="calibrate on the demo's training digits (never the held-out ones)"),
    labels: Optional[str] = LabelsOpt, labels_file: Optional[Path] = LabelsFileOpt,
    samples: int = typer.Option(256, min=1, help="UNet inputs in the calibration set"),
    ranges: RangeMethod = typer.Option(RangeMethod.minmax.value, "--ranges", help="how activation ranges are set"),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="seed of the image split, the sampling and the shared noise"),
    report: bool = typer.Option(False, "--report", help="per-layer sensitivity: score error and flipped decisions"),
    auto: bool = typer.Option(False, "--auto", help="keep the most sensitive layers in float until the decision gate holds"),
    validation: int = typer.Option(100, min=0, help="images held out of calibration for the decision gate (0: no gate)"),
    keep_float: Optional[str] = typer.Option(None, help="layers to keep in float, name substrings comma separated "
                                             "(default: time_embedding,conv_in,conv_out,conv_shortcut; 'none')"),
    smoothquant: Optional[float] = typer.Option(None, "--smoothquant", metavar="ALPHA", help="SmoothQuant-style scaling "
                                                "of LayerNorm -> linear layers before quantizing, α in (0, 1), e.g. 0.5"),
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
            raise UsageMistake(f"the demo digits are labelled {', '.join(CLASS_NAMES)}; --labels {','.join(label_list)!r} "
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


@app.command("train-prompts")
def train_prompts(
    model: Path = ModelArg,
    data: Optional[Path] = PairsOpt,
    demo: bool = typer.Option(False, "--demo", help="the demo digits' training split instead of --data"),
    shots: int = typer.Option(..., "--shots", "-k", min=1, help="training pairs per class (a class = a distinct caption)"),
    out_dir: Path = typer.Option(..., "--out", help="run directory: adapter.safetensors + training_log.json"),
    train_steps: int = typer.Option(200, "--train-steps", min=1, help="optimiser steps, one random timestep each"),
    lr: float = typer.Option(1e-4, min=0.0, help="AdamW learning rate (DESIGN's 1e-4; on the demo 3e-3 learns in ~300 steps)"),
    batch_size: int = typer.Option(16, min=1, help="images per step"),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="seed of the shots, timesteps, noise and LoRA init"),
    score_weights: bool = typer.Option(False, "--score-weights", help="also learn how much each scored attention layer counts (the engine pools the layers with these weights)"),
    overwrite: bool = typer.Option(False, help="replace an existing run directory's adapter"),
    preset: DsdPresetChoice = typer.Option(DEFAULT_DSD_PRESET, help="DSD preset trained for: discffusion (the default: attention + bias, a new "
                                                   "t and ε per pair, gradients clipped at 1.0) | diffscore (attention score)"),
    threads: Optional[int] = ThreadsOpt,
):
    """Few-shot prompt learning for DSD matching: a rank-4 LoRA on the attention projections (export with --adapters)."""
    if demo == (data is not None):
        raise UsageMistake("give exactly one of --data PAIRS.jsonl or --demo")
    require_torch("train-prompts")
    set_threads(threads)
    from diffscore.app.digits import demo_pairs
    from diffscore.reference.prompt_learning import PromptLearningConfig, read_pairs
    from diffscore.reference.prompt_learning import train_prompts as run_training

    pairs = demo_pairs() if demo else read_pairs(data)
    cfg = PromptLearningConfig(shots=shots, steps=train_steps, lr=lr, batch_size=batch_size, seed=seed,
                               score_weights=score_weights, preset=preset.value)
    run = run_training(model, pairs, out_dir, cfg, overwrite=overwrite)
    say(("wrote ", "green"), f"{out_dir} ({run['pairs']} pairs, {len(run['captions'])} captions, {train_steps} steps, "
        f"loss {run['loss'][0]:.4f} -> {run['final_loss_mean20']:.4f} (mean of last 20), {run['wall_time_s']:.0f} s)")


@app.command("train-diffdis")
def train_diffdis(
    model: Path = ModelArg,
    data: Optional[Path] = PairsOpt,
    demo: bool = typer.Option(False, "--demo", help="the demo digits' training split, captioned with 6 of the 8 "
                              "templates (2 held out for the zero-shot benchmark) instead of --data"),
    out_dir: Path = typer.Option(..., "--out", help="run directory: diffdis.safetensors + diffdis.json"),
    blocks: Optional[str] = typer.Option(None, help="UNet blocks the text stream reads (several scales), comma "
                                         "separated (default: down_blocks.1,mid_block,up_blocks.1; --unified: all)"),
    noise_steps: str = typer.Option("50", "--noise-steps", help="the image's fixed noise step (one)"),
    epochs: int = typer.Option(150, min=1, help="at most; training stops early on a 10% validation split of the images"),
    batch_size: int = typer.Option(128, min=1, help="pairs per optimiser step"),
    lr: float = typer.Option(1e-3, min=0.0, help="AdamW learning rate"),
    timesteps: int = typer.Option(5, "--timesteps", min=1, help="default shared (t, ε) per candidate of the denoise mode"),
    generate_steps: int = typer.Option(4, "--sampling-steps", min=1, help="DDIM steps of the generate mode (baked "
                                       "into the exported graph)"),
    mode: DiffDisMode = typer.Option(DiffDisMode.denoise.value, help="the engine's default inference mode"),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="seed of the fixed noises, the initialisation, the split and shuffling"),
    overwrite: bool = typer.Option(False, help="replace an existing run"),
    threads: Optional[int] = ThreadsOpt,
    # --- unified training (issue 30) ---
    unified: bool = typer.Option(False, "--unified", help="train the UNet too (full fine-tune), with the denoising "
                                 "loss and the text-diffusion loss; the text stream fused stage by stage with every block"),
    generation_weight: Optional[float] = typer.Option(None, help="--unified: weight of the denoising loss (default 1)"),
    text_weight: Optional[float] = typer.Option(None, help="--unified: weight of the text-diffusion loss (default 1)"),
    unet_lr: Optional[float] = typer.Option(None, help="--unified: AdamW learning rate of the UNet (default 1e-4)"),
):
    """Train DiffDis: a text stream that denoises the caption's text embedding with cross-attention to the frozen
    UNet's block features (several scales) at a fixed noise step; --unified trains the UNet with it (the paper's
    unified training); then `export --diffdis RUN`."""
    if demo == (data is not None):
        raise UsageMistake("give exactly one of --data PAIRS.jsonl or --demo")
    if not lr > 0:
        raise UsageMistake(f"--lr must be > 0, got {lr}")
    from diffscore.app.diffdis_options import unified_options

    unified_extra = unified_options(unified, generation_weight, text_weight, unet_lr)
    image_step = one_step(noise_steps)
    require_torch("train-diffdis")
    set_threads(threads)
    from diffscore.reference.diffdis import DiffDisTrainOptions, train_diffdis_run
    from diffscore.reference.prompt_learning import read_pairs

    if demo:
        from diffscore.app.digits import DIFFDIS_HELD_OUT_TEMPLATES, diffdis_demo_pairs

        pairs, note = diffdis_demo_pairs(), {"source": "demo digits, training split",
                                             "held_out_templates": list(DIFFDIS_HELD_OUT_TEMPLATES)}
    else:
        pairs, note = read_pairs(data), {"source": str(data)}
    model_ = train_diffdis_run(model, pairs.images, pairs.captions, out_dir,
                               blocks=None if blocks is None else split(blocks) or [], unified=unified,
                               image_step=image_step, seed=seed, overwrite=overwrite, data=note,
                               options=DiffDisTrainOptions(epochs=epochs, batch_size=batch_size, lr=lr, **unified_extra),
                               timesteps=timesteps, generate_steps=generate_steps, mode=mode.value)
    t = model_.config.training
    say(("wrote ", "green"), f"{out_dir}: {'unified ' if unified else ''}DiffDis on {', '.join(model_.config.blocks)} at "
        f"t = {image_step}, {t['pairs']} "
        f"training pairs ({t['images']} images, {t['captions']} captions), validation loss {t['val_loss']:.4f}, "
        f"best epoch {t['best_epoch']} of {t['epochs']}, {t['wall_time_s']:.0f} s")
    say(f"next: diffscore export {model} ENGINE_DIR --diffdis {out_dir}")


@app.command("finetune")
def finetune_command(
    model: Path = ModelArg,
    data: Optional[Path] = PairsOpt,
    demo: bool = typer.Option(False, "--demo", help="the demo digits' training split instead of --data"),
    objectives: str = typer.Option("itc,is,rsc", help="comma-separated subset of itc (image-text contrastive), is "
                                   "(denoising loss) and rsc (consistency of the contrastive and diffusion branches)"),
    shots: int = typer.Option(..., "--shots", "-k", min=1, help="training pairs per class (a class = a distinct caption)"),
    out_dir: Path = typer.Option(..., "--out", help="run directory: adapter.safetensors, itc_heads.safetensors, training_log.json"),
    train_steps: int = typer.Option(300, "--train-steps", min=1, help="optimiser steps at most (early stopping may end sooner)"),
    lr: float = typer.Option(3e-3, min=0.0, help="AdamW learning rate of the LoRA and the projections"),
    batch_size: int = typer.Option(32, min=1, help="images per step (the contrastive batch)"),
    blocks: str = typer.Option("mid_block", help="UNet blocks pooled into the image embedding, comma separated"),
    noise_steps: str = typer.Option("50", "--noise-steps", help="the image embedding's fixed noise step (one)"),
    val_shots: int = typer.Option(2, min=0, help="validation pairs per caption for early stopping, from pairs that "
                                  "are not shots (0: train every step)"),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="seed of the shots, noise, timesteps and initialisation"),
    overwrite: bool = typer.Option(False, help="replace an existing run directory's weights"),
    threads: Optional[int] = ThreadsOpt,
):
    """UniDiff-style fine-tuning: LoRA + projections with ITC, IS and RSC (then `export --adapters RUN`, `match --method itc`)."""
    if demo == (data is not None):
        raise UsageMistake("give exactly one of --data PAIRS.jsonl or --demo")
    noise_step = one_step(noise_steps)
    require_torch("finetune")
    set_threads(threads)
    from diffscore.app.digits import demo_pairs
    from diffscore.reference.finetune import FinetuneConfig, check_config, finetune
    from diffscore.reference.prompt_learning import read_pairs

    cfg = check_config(FinetuneConfig(objectives=tuple(split(objectives) or ()), shots=shots, steps=train_steps, lr=lr,
                                      batch_size=batch_size, blocks=split(blocks) or [], noise_step=noise_step,
                                      val_shots=val_shots, seed=seed))
    pairs = demo_pairs() if demo else read_pairs(data)
    run = finetune(model, pairs, out_dir, cfg, overwrite=overwrite)
    stop = f", stopped early, best step {run['best_step']}" if run["stopped_early"] else ""
    losses = ", ".join(f"{k} {v[0]:.3f} -> {sum(v[-20:]) / len(v[-20:]):.3f}" for k, v in run["loss"].items())
    say(("wrote ", "green"), f"{out_dir} ({run['pairs']} pairs, {len(run['captions'])} captions, {run['steps_run']} steps"
        f"{stop}; {losses}; {run['wall_time_s']:.0f} s)")
    say(f"next: diffscore export {model} ENGINE_DIR --adapters {out_dir}")


AddressOpt = typer.Option(None, "--address", help="a running Ray cluster ('auto', 'ray://head:10001'); "
                          "default: start a local Ray on this machine")
CpusPerActorOpt = typer.Option(1.0, help="CPUs Ray reserves for each engine (ONNX Runtime threads on CPU)")
GpusPerActorOpt = typer.Option(0.0, help="GPUs for each engine: 1 = one engine per GPU")


@app.command()
def batch(
    engine: Path = typer.Argument(..., help="engine directory (on a cluster: at the same path on every node)"),
    images: List[str] = typer.Argument(..., help="image files, folders or glob patterns (every Ray node must see them)"),
    output: Path = typer.Option(..., "--output", "-o", help="results file: .parquet or .jsonl (written at the end)"),
    labels: Optional[str] = LabelsOpt, labels_file: Optional[Path] = LabelsFileOpt,
    texts: Optional[List[str]] = typer.Option(None, "--text", "-t", help="DSD matching instead of classifying: a "
                                              "caption, commas and all (repeat the option)"),
    texts_file: Optional[Path] = typer.Option(None, "--texts-file", help="DSD matching instead of classifying: "
                                              "captions, one per line (UTF-8)"),
    method: Method = typer.Option(Method.dc.value, help="dc: zero-shot Diffusion Classifier | head: a trained head"),
    head: Optional[str] = typer.Option(None, help="the head's name (--method head), when the engine has several"),
    template: Optional[str] = typer.Option(None, help="prompt template with one {} (default: the engine's)"),
    stages: Optional[str] = typer.Option(None, help="pruning stages n_samples:keep, e.g. 50:5,500:1"),
    loss: Optional[Loss] = typer.Option(None, help="denoising error (default: the engine's)"),
    seed: int = SeedOpt, address: Optional[str] = AddressOpt,
    actors: int = typer.Option(1, help="engines running at once, each one Ray actor"),
    cpus_per_actor: float = CpusPerActorOpt, gpus_per_actor: float = GpusPerActorOpt,
    batch_images: int = typer.Option(16, help="images per actor call"),
    backend: Backend = BackendOpt, precision: Precision = PrecisionOpt,
    limit: Optional[int] = LimitOpt,
):
    """Score many images with Ray Data: an actor pool of engines, results in one Parquet/JSONL file.

    Rows: path, label, ranking (best first), passes, error (why an image could not be read), or with
    --text: path, scores (one per text), best, error."""
    from diffscore.app import scale

    check_target(output)
    scale.check_output(output)
    if limit is not None:
        images = [str(p) for p in image_paths(images)[:limit]]
    common = dict(actors=actors, batch_images=batch_images, num_cpus=cpus_per_actor, num_gpus=gpus_per_actor,
                  backend=backend.value, precision=precision.value, address=address)
    if texts or texts_file:
        dataset = scale.match_dataset(images, engine, read_texts(texts, texts_file), seed=seed, **common)
    else:
        label_list = read_labels(labels, labels_file, required=method is Method.dc)
        dataset = scale.classify_dataset(images, engine, label_list, method=method.value, head=head, template=template,
                                         stages=parse_stages(stages), loss=loss.value if loss else None, seed=seed,
                                         **common)
    rows, failed = scale.write_results(dataset, output)
    say(f"wrote {rows} rows to {output}" + (f"; {failed} images could not be read (see the error column)" if failed else ""))


def token_option(value: Optional[str]) -> Optional[str]:
    """--token / DIFFSCORE_TOKEN checked as a usage mistake (exit 2), without repeating it."""
    from diffscore.app.serve import check_token

    try:
        return check_token(value)
    except EngineError as e:
        raise typer.BadParameter(str(e)) from None


@app.command()
def serve(
    engine: Path = typer.Argument(..., help="engine directory"),
    host: str = typer.Option("127.0.0.1", help="address the HTTP API listens on (0.0.0.0: every interface; Ray's "
                             "own processes stay on loopback)"),
    port: int = typer.Option(8000, min=1, max=65535, help="HTTP port"),
    replicas: int = typer.Option(1, min=1, help="engine replicas behind the one HTTP address"),
    cpus_per_replica: float = CpusPerActorOpt, gpus_per_replica: float = GpusPerActorOpt,
    max_batch: int = typer.Option(16, min=1, help="concurrent requests batched into one engine call, at most"),
    address: Optional[str] = AddressOpt,
    backend: Backend = BackendOpt, precision: Precision = PrecisionOpt,
    token: Optional[str] = typer.Option(None, envvar="DIFFSCORE_TOKEN", callback=token_option, show_envvar=True,
                                        help="bearer token every endpoint but /health asks for (prefer the "
                                        "environment variable: a flag shows in the process list)"),
    docs: bool = typer.Option(False, "--docs", help="serve the API docs at /docs, /redoc and /openapi.json"),
    dashboard: bool = typer.Option(False, "--dashboard", help="start Ray's dashboard (on 127.0.0.1:8265)"),
):
    """Serve an engine over HTTP with Ray Serve: POST /classify, /head, /match (JSON, images base64);
    GET /health, /info. Runs until Ctrl-C or SIGTERM. What it exposes: docs/serving.md."""
    import time

    from diffscore.app.scale import import_ray

    import_ray("diffscore serve")
    import ray
    from ray import serve as ray_serve

    from diffscore.app.serve import start_server

    started, deployed = not ray.is_initialized(), False  # in-process callers may have a Ray of their own
    try:
        url = start_server(engine, host=host, port=port, address=address, replicas=replicas, num_cpus=cpus_per_replica,
                           num_gpus=gpus_per_replica, backend=backend.value, precision=precision.value,
                           max_batch_size=max_batch, token=token, docs=docs, dashboard=dashboard)
        deployed = True
        if token is None and host not in ("127.0.0.1", "localhost", "::1"):
            err.print(Text.assemble(("warning: ", "yellow"), f"serving on {host} without a token: anyone who reaches "
                                    f"port {port} can use it (set DIFFSCORE_TOKEN)"))
        say(f"serving {engine} at {url} ({replicas} replica{'s' * (replicas > 1)}"
            f"{', bearer token' if token else ''}); Ctrl-C stops")
        while True:
            time.sleep(3600)
    finally:  # Ctrl-C or SIGTERM (main turns it into KeyboardInterrupt): Serve and the Ray this started end too
        if ray.is_initialized() and (started or deployed):
            ray_serve.shutdown()
        if ray.is_initialized() and started:
            ray.shutdown()


# --- entry point ----------------------------------------------------------------------------------
def usage_line(e: UsageError) -> str:
    where = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) is not None else ""
    return f"{e.format_message()}{where}"


def terminated(signum, frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C: temporary folders are removed on the way out


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: exit 0 on success, 1 on a problem found while working, 2 on a usage mistake,
    130 on Ctrl-C and 143 on SIGTERM, each mistake as one line on stderr."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    stopped_by = {"signal": None}

    def on_term(signum, frame):
        stopped_by["signal"] = signum
        terminated(signum, frame)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        code = app(args=argv, prog_name="diffscore", standalone_mode=False)
    except UsageMistake as e:
        error_line(str(e))
        sys.exit(2)
    except EngineError as e:
        error_line(str(e))
        sys.exit(1)
    except NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help())
        sys.exit(0)
    except UsageError as e:
        error_line(usage_line(e))
        sys.exit(2)
    except (Abort, KeyboardInterrupt):
        code = 130
    finally:
        signal.signal(signal.SIGTERM, previous)  # in-process callers (tests, notebooks) get their handler back
    if stopped_by["signal"] or code == 130:  # typer turns Ctrl-C into exit code 130
        error_line("terminated (SIGTERM); nothing half-written was left" if stopped_by["signal"]
                   else "interrupted; nothing half-written was left")
        sys.exit(143 if stopped_by["signal"] else 130)
    if isinstance(code, int) and code:
        sys.exit(code)  # success returns normally (exit 0), so in-process callers need not catch SystemExit


if __name__ == "__main__":
    main()
