"""The CLI's shared pieces: the Typer app, choice lists (imported from the modules that own them), the
options several commands take, and the parsers that turn flags into library arguments (a usage
mistake is a UsageMistake: one line, exit 2)."""

from __future__ import annotations

import importlib.util
from enum import Enum
from pathlib import Path
from typing import List

import typer
from rich.text import Text

from diffscore import __version__
from diffscore.app.render import Format, emit, err, say
from diffscore.app.runs import save_rows
from diffscore.engine.backends.choice import BACKENDS
from diffscore.engine.classify_options import METHODS
from diffscore.engine.scorers.diffdis import MODES
from diffscore.engine.manifest import PRECISIONS
from diffscore.engine.manifest_checks import CALIBRATION_METHODS, HEAD_KINDS, SAMPLERS
from diffscore.engine.options import MAX_SEED
from diffscore.engine.results import MATCH_METHODS
from diffscore.errors import EngineError, UsageMistake, not_a_file
from diffscore.kernels import LOSSES, STRATEGIES, RaceConfig
from diffscore.kernels.cascade import SHORTLISTERS
from diffscore.kernels.dsd import DSD_PRESETS
from diffscore.kernels.timesteps import check_stages

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
Method = choices("Method", METHODS)
MatchMethod = choices("MatchMethod", MATCH_METHODS)
DiffDisMode = choices("DiffDisMode", MODES)
DiffDisModeOpt = typer.Option(None, "--diffdis-mode", help="diffdis: denoise (lowest x0 error of the text embedding "
                              "over shared (t, ε) wins) | generate (text embedding generated from the image, cosine "
                              "similarity); default: the engine's")
HeadKind = choices("HeadKind", HEAD_KINDS)
Sampler = choices("Sampler", SAMPLERS)
RangeMethod = choices("RangeMethod", CALIBRATION_METHODS)
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
SeedOpt = typer.Option(0, min=0, max=MAX_SEED, help="seed of the shared noise: same seed, same scores")
BatchOpt = typer.Option(None, min=1, help="UNet batch (default: automatic)")
ModelArg = typer.Argument(..., help="local diffusers model folder")
PairsOpt = typer.Option(None, "--data", help='JSONL of {"image": path, "caption": str} lines')
LabelsOpt = typer.Option(None, "--labels", "-l", help="class names, comma separated")
LabelsFileOpt = typer.Option(None, "--labels-file", help="class names, one per line (UTF-8)")
ImagesArg = typer.Argument(..., help="image files, folders (searched into subfolders) or glob patterns",
                           show_default=False)
LimitOpt = typer.Option(None, "--limit", min=1, help="use only the first N images")
TextOpt = typer.Option(None, "--text", "-t", help="a caption, commas and all (repeat the option for several)")
TextsFileOpt = typer.Option(None, "--texts-file", help="captions, one per line (UTF-8)")
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


def version_callback(value: bool) -> None:
    if value:
        say(f"diffscore {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                              help="print the version and exit")):
    """diffscore: diffusion models as compiled zero-shot classifiers and image-text matchers."""


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
    if not stages or any(len(s) != 2 for s in stages):
        raise UsageMistake(f"--stages {text!r} is not like '50:5,500:1' (n_samples:keep, positive, comma separated)")
    try:
        check_stages(stages)  # the stages' one check, before anything reads them
    except ValueError as e:
        raise UsageMistake(f"--stages {text!r}: {e}") from None
    return stages  # type: ignore[return-value]


def race_options(strategy, z: float | None, budget: int | None) -> dict:
    """classify's race keywords from --strategy/--z/--budget; the race flags need the race."""
    strategy = getattr(strategy, "value", strategy)
    if (z is not None or budget is not None) and strategy not in (None, "race", "cascade"):
        raise UsageMistake("--z and --budget tune the race; use them with --strategy race (or cascade)")
    given = {name: v for name, v in dict(z=z, budget=budget).items() if v is not None}
    try:
        RaceConfig(**given)  # the race's own checks, on the flags given
    except ValueError as e:
        raise UsageMistake(f"--{' --'.join(given)}: {e}") from None
    if strategy is None and given:
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


def plan_line(eng, options, images: int) -> None:
    """Before a long Diffusion Classifier run: its UNet passes per image (and time, where known) on stderr."""
    from diffscore.app.defaults import classify_plan

    if options.method == "dc" and (line := classify_plan(eng, options, images)):
        err.print(line)


def finish(rows: list[dict], fmt: Format, output: Path | None, title: str,
           table_rows: list[dict] | None = None) -> None:
    """Rows to stdout (`table_rows`, if given, for the table) and to -o FILE (kept in a fallback file if it
    cannot be written now: app/runs.py); the note on the file goes to stderr, so stdout stays machine-readable."""
    emit(table_rows if fmt is Format.table and table_rows is not None else rows, fmt, title)
    if output is not None:
        save_rows(rows, output)
        err.print(Text.assemble(("wrote ", "green"), str(output), f" ({len(rows)} rows)"))


def flag_defaults(template, strategy, stages, loss, timesteps, **race) -> dict:
    """The scoring defaults export and `defaults` were given, checked (app/defaults.scoring_changes)."""
    from diffscore.app.defaults import scoring_changes

    return scoring_changes(template=template, strategy=getattr(strategy, "value", None), stages=parse_stages(stages),
                           loss=getattr(loss, "value", None), timesteps=timesteps, **race)
