"""The engine directory's manifest: the one contract between export (writer) and runtime (reader). Its records
are in engine/manifest_schema.py; here the root record and the code that reads, checks, writes and verifies it.

Plain typed dataclasses + JSON, so a Jetson with only the runtime extra can read it. `Manifest.load`
is the one place a manifest is read and checked: format version, types, every file named by the
manifest resolving *inside* the engine directory (symlinks included) and present with its size.
Full sha256 checks of every file are one call away (`verify`), because hashing a multi-GB graph on
every load is slow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from diffscore.engine.graph_contract import VAE_ENCODER
from diffscore.engine.manifest_checks import MAX_MANIFEST_BYTES, check_json_shape, check_manifest
from diffscore.engine.manifest_schema import (  # noqa: F401  (re-exported: engine.manifest stays the one import path)
    BATCH,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PRECISIONS,
    UNSTATED_DSD_PRESET,
    AdapterSpec,
    CalibrationRecord,
    DiffDisSpec,
    FileSpec,
    GraphSpec,
    HeadSpec,
    HeadTraining,
    ItcSpec,
    PlanSpec,
    ScoringDefaults,
    TensorSpec,
    _typed,
    race_record,
    unet_graph,
)
from diffscore.errors import EngineError


@dataclass
class Manifest:
    diffscore_version: str
    source_path: str
    source_sha256: str  # content hash of the model folder's files
    image_size: int  # side of the square the image is resized/cropped to
    image_channels: int  # channels the image is read with (1 = greyscale, 3 = RGB)
    latent_scaling: float | None  # VAE scaling factor; None in pixel space (no VAE)
    sample_shape: list[int]  # (C, H, W) of the UNet sample: latent or pixel
    alphas_cumprod: list[float]  # the training schedule's cumulative alphas, length T
    tokenizer: str  # file name, loadable by the `tokenizers` library
    max_length: int
    text_hidden_size: int
    attention_layers: list[str]  # diffusers module names of captured cross-attention layers
    feature_blocks: list[str]  # diffusers module names whose outputs the UNet graph returns
    graphs: dict[str, GraphSpec]  # "text_encoder", "vae_encoder", "unet", "unet.fp16", "head.<name>", ...
    files: dict[str, FileSpec] = field(default_factory=dict)  # every other file of the engine, by name
    plans: dict[str, PlanSpec] = field(default_factory=dict)
    heads: dict[str, HeadSpec] = field(default_factory=dict)
    adapters: dict[str, AdapterSpec] = field(default_factory=dict)  # "prompt_learning" -> its merged LoRA
    defaults: ScoringDefaults = field(default_factory=ScoringDefaults)
    calibration: CalibrationRecord | None = None
    # the race's visiting order: grid timesteps, best separating first (`diffscore profile`); None = spread order
    timestep_profile: list[int] | None = None
    # what the UNet predicts (the scheduler config's prediction_type): errors are taken on ε̂ converted from it
    prediction_type: str = "epsilon"
    diffdis: DiffDisSpec | None = None  # `export --diffdis RUN`: image-text discrimination by text-embedding diffusion
    itc: ItcSpec | None = None  # ITC embedding graphs of a `diffscore finetune` run; None = none
    # the text conditioning the graphs take: "sd" (input_ids -> encoder_hidden_states) or "sdxl" (two tokenizers,
    # input_ids + input_ids_2 -> encoder_hidden_states + text_embeds; the UNet also takes text_embeds and time_ids)
    conditioning: str = "sd"
    tokenizer_2: str | None = None  # SDXL's second tokenizer file (its own padding)
    time_ids: list[float] | None = None  # SDXL: original size, crop top-left, target size of a scored image
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        self.graphs = {k: _typed(GraphSpec, g, f"graph {k}") for k, g in self.graphs.items()}
        self.files = {k: _typed(FileSpec, f, f"file {k}") for k, f in self.files.items()}
        self.plans = {k: _typed(PlanSpec, p, f"plan {k}") for k, p in self.plans.items()}
        self.heads = {k: _typed(HeadSpec, h, f"head {k}") for k, h in self.heads.items()}
        self.adapters = {k: _typed(AdapterSpec, a, f"adapter {k}") for k, a in self.adapters.items()}
        self.defaults = _typed(ScoringDefaults, self.defaults, "defaults")
        if self.calibration is not None:
            self.calibration = _typed(CalibrationRecord, self.calibration, "calibration")
        if self.diffdis is not None:
            self.diffdis = _typed(DiffDisSpec, self.diffdis, "diffdis")
        if self.itc is not None:
            self.itc = _typed(ItcSpec, self.itc, "itc")

    @property
    def pixel_space(self) -> bool:
        return VAE_ENCODER not in self.graphs

    @property
    def score_weights(self) -> dict[str, float] | None:
        """The DSD layer weights prompt learning trained, if any."""
        trained = self.adapters.get("prompt_learning")
        return trained.score_weights if trained else None

    def all_files(self) -> dict[str, str]:
        """Every file the manifest names -> what it is (for containment and presence checks)."""
        named = {f: f"graph {k}" for k, g in self.graphs.items() for f in g.files}
        named.update({p.file: f"plan {k}" for k, p in self.plans.items()})
        named.update({f: "engine file" for f in self.files})
        named[self.tokenizer] = "tokenizer"
        if self.tokenizer_2 is not None:
            named[self.tokenizer_2] = "tokenizer_2"
        for k, h in self.heads.items():
            named.update({h.weights: f"head {k} weights", h.config: f"head {k} config"})
        if self.calibration is not None:
            named[self.calibration.file] = "calibration set"
        if self.diffdis is not None:
            named.update({self.diffdis.weights: "DiffDis weights", self.diffdis.config: "DiffDis config"})
        if self.itc is not None and self.itc.tokenizer:
            named[self.itc.tokenizer] = "ITC tokenizer"
        return named

    def record_file(self, engine_dir: Path, name: str) -> None:
        """List a non-graph file (already inside engine_dir) with its sha256 and size."""
        path = resolve_inside(engine_dir, name, "engine file")
        self.files[name] = FileSpec(sha256_files([path]), path.stat().st_size)

    def save(self, engine_dir: Path) -> None:
        """Write manifest.json atomically (temp file, then rename)."""
        path = Path(engine_dir) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, engine_dir: Path | str) -> "Manifest":
        """Read and check an engine directory: format version, types, containment, every file present
        with its size. Each problem is one EngineError line."""
        engine_dir = Path(engine_dir)
        path = engine_dir / MANIFEST_NAME
        if not engine_dir.is_dir():
            raise EngineError(f"engine directory {engine_dir} does not exist; create one with `diffscore export`")
        if not path.is_file():
            raise EngineError(f"{engine_dir} is not a diffscore engine (no {MANIFEST_NAME}); "
                              f"create one with `diffscore export`")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise EngineError(f"{path} is {path.stat().st_size:,} bytes, a manifest is at most {MAX_MANIFEST_BYTES:,}; "
                              "re-export the engine")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except RecursionError:
            raise EngineError(f"{path} nests too deep to be a diffscore manifest; re-export the engine") from None
        except UnicodeDecodeError:
            raise EngineError(f"{path} is not UTF-8 text; re-export the engine") from None
        except json.JSONDecodeError as e:
            raise EngineError(f"{path} is not valid JSON ({e}); re-export the engine") from None
        if not isinstance(raw, dict):
            raise EngineError(f"{path} holds a JSON {type(raw).__name__}, not an object; re-export the engine")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            older = isinstance(version, int) and version < FORMAT_VERSION
            raise EngineError(
                f"{engine_dir} has engine format {version!r}, this diffscore ({_version()}) reads format "
                f"{FORMAT_VERSION}; "
                f"{'re-export it' if older else 'upgrade diffscore or re-export it'} with `diffscore export`"
            )
        check_json_shape(raw, path)
        manifest = _typed(cls, raw, "")
        check_manifest(manifest, path)  # every field: types, ranges, digests, enumerations, shapes (untrusted input)
        for name, what in manifest.all_files().items():
            resolve_inside(engine_dir, name, what)
        for name, graph in manifest.graphs.items():
            size = sum((engine_dir / f).stat().st_size for f in graph.files)
            if size != graph.size:
                raise EngineError(
                    f"graph {name} ({', '.join(graph.files)}) is {size} bytes, the manifest says {graph.size}: "
                    "the engine directory is damaged or from another export; re-export it"
                )
        for name, spec in manifest.files.items():
            if (engine_dir / name).stat().st_size != spec.size:
                raise EngineError(f"engine file {name} is not the size the manifest says: the engine directory is "
                                  "damaged; re-export it")
        for key, head in manifest.heads.items():
            if head.graph not in manifest.graphs:
                raise EngineError(f"head {key} names graph {head.graph!r}, "
                                  f"which the manifest does not list; re-export it")
        if manifest.diffdis is not None and manifest.diffdis.graph not in manifest.graphs:
            raise EngineError(f"diffdis names graph {manifest.diffdis.graph!r}, "
                              f"which the manifest does not list; re-export it")
        for graph in (manifest.itc.image_graph, manifest.itc.text_graph) if manifest.itc else ():
            if graph not in manifest.graphs:
                raise EngineError(f"the manifest's itc record names graph {graph!r}, "
                                  f"which it does not list; re-export it")
        return manifest

    def verify(self, engine_dir: Path | str) -> list[str]:
        """Full sha256 check of every file the manifest lists; returns the names that do not match."""
        engine_dir = Path(engine_dir)
        bad = [n for n, g in self.graphs.items() if sha256_files([engine_dir / f for f in g.files]) != g.sha256]
        bad += [n for n, p in self.plans.items() if sha256_files([engine_dir / p.file]) != p.sha256]
        bad += [n for n, f in self.files.items() if sha256_files([engine_dir / n]) != f.sha256]
        hashed = ({f for g in self.graphs.values() for f in g.files} | {p.file for p in self.plans.values()}
                  | set(self.files))
        if self.calibration is not None:
            hashed.add(self.calibration.file)
            if sha256_files([engine_dir / self.calibration.file]) != self.calibration.sha256:
                bad.append(self.calibration.file)
        unlisted = sorted(set(self.all_files()) - hashed)
        return bad + [f"{n} (no sha256 in the manifest)" for n in unlisted]


def resolve_inside(engine_dir: Path | str, name: str, what: str = "engine file", must_exist: bool = True) -> Path:
    """The path of a file the manifest names, refused in one line unless it stays inside the engine
    directory (after resolving symlinks) and, with must_exist, is a regular file there."""
    engine_dir = Path(engine_dir)
    outside = EngineError(f"the manifest's {what} {name!r} "
                          f"is not inside the engine directory {engine_dir}; refusing it")
    if not isinstance(name, str) or not name or Path(name).is_absolute() or "\\" in name:
        raise outside
    try:
        path = (engine_dir / name).resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        raise EngineError(f"the manifest's {what} {name!r} is a symlink loop in {engine_dir}; re-export the "
                          "engine") from None
    if engine_dir.resolve() not in path.parents:
        raise outside
    if must_exist and not path.is_file():
        raise EngineError(f"engine file {name} ({what}) is missing from {engine_dir}; re-export the engine")
    return path


def sha256_files(paths: list[Path], chunk: int = 1 << 20) -> str:
    """One digest over the files' bytes in order (a graph and its external data hash as one)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder: Path) -> str:
    """Content hash of a model folder: every file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(sha256_files([path]).encode())
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    return sha256_files([path])


def _version() -> str:
    from diffscore import __version__

    return __version__
