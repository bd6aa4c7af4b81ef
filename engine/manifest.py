"""The engine directory's manifest: the one contract between export (writer) and runtime (reader).

Kept to plain dataclasses + JSON so a Jetson with only the runtime extra can read it. Loading checks
the format version and each file's presence and size; full sha256 checks are one call away
(`verify`), because hashing a multi-GB graph on every load is slow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from diffscore.errors import EngineError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64"
    shape: list  # ints, or strings for symbolic axes ("batch")


@dataclass
class GraphSpec:
    file: str
    sha256: str
    size: int  # bytes of the .onnx file plus its external-data files
    precision: str  # "fp32" | "fp16" | "int8"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    data_files: list[str] = field(default_factory=list)  # external-data files beside the graph (> 2 GB)

    @property
    def files(self) -> list[str]:
        return [self.file, *self.data_files]

    def __post_init__(self):
        self.inputs = [t if isinstance(t, TensorSpec) else TensorSpec(**t) for t in self.inputs]
        self.outputs = [t if isinstance(t, TensorSpec) else TensorSpec(**t) for t in self.outputs]


@dataclass
class PlanSpec:
    """A TensorRT plan built on (and only valid for) one GPU model and TensorRT version."""

    file: str
    graph: str  # key in Manifest.graphs it was built from
    gpu: str
    tensorrt_version: str
    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int
    sha256: str
    size: int


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
    graphs: dict[str, GraphSpec]  # "text_encoder", "vae_encoder", "unet", "unet.fp16", ...
    plans: dict[str, PlanSpec] = field(default_factory=dict)
    # trained heads: name -> {graph, kind, labels, blocks, steps, seed (of the fixed ε), prompt, weights, config}
    heads: dict = field(default_factory=dict)
    # LoRA runs merged into the UNet weights at export: name -> {adapters (run dir), adapter_sha256, lora_rank, config,
    # score_weights ({attention layer: weight} or None: DSD pools the layers with these instead of their mean)}
    adapters: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)  # scoring defaults: template, stages, loss, ...
    # what the UNet predicts (the scheduler config's prediction_type): errors are taken on ε̂ converted from it
    prediction_type: str = "epsilon"
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        self.graphs = {k: g if isinstance(g, GraphSpec) else GraphSpec(**g) for k, g in self.graphs.items()}
        self.plans = {k: p if isinstance(p, PlanSpec) else PlanSpec(**p) for k, p in self.plans.items()}

    @property
    def pixel_space(self) -> bool:
        return "vae_encoder" not in self.graphs

    def save(self, engine_dir: Path) -> None:
        """Write manifest.json atomically (temp file, then rename)."""
        path = Path(engine_dir) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, engine_dir: Path | str) -> "Manifest":
        """Read and check an engine directory: format version, every file present with its size."""
        engine_dir = Path(engine_dir)
        path = engine_dir / MANIFEST_NAME
        if not engine_dir.is_dir():
            raise EngineError(f"engine directory {engine_dir} does not exist; create one with `diffscore export`")
        if not path.is_file():
            raise EngineError(f"{engine_dir} is not a diffscore engine (no {MANIFEST_NAME}); create one with `diffscore export`")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise EngineError(f"{path} is not valid JSON ({e}); re-export the engine") from None
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise EngineError(
                f"{engine_dir} has engine format {version}, this diffscore ({_version()}) reads format "
                f"{FORMAT_VERSION}; re-export it with `diffscore export`"
            )
        try:
            manifest = cls(**raw)
        except TypeError as e:
            raise EngineError(f"{path} does not match engine format {FORMAT_VERSION} ({e}); re-export it") from None
        for name, graph in manifest.graphs.items():
            for file in graph.files:
                _check_file(engine_dir / file, name)
            size = sum((engine_dir / f).stat().st_size for f in graph.files)
            if size != graph.size:
                raise EngineError(
                    f"graph {name} ({', '.join(graph.files)}) is {size} bytes, the manifest says {graph.size}: "
                    "the engine directory is damaged or from another export; re-export it"
                )
        _check_file(engine_dir / manifest.tokenizer, "tokenizer")
        return manifest

    def verify(self, engine_dir: Path | str) -> list[str]:
        """Full sha256 check of every graph and plan; returns the names that do not match."""
        engine_dir = Path(engine_dir)
        bad = [n for n, g in self.graphs.items() if sha256_files([engine_dir / f for f in g.files]) != g.sha256]
        return bad + [n for n, p in self.plans.items() if sha256_files([engine_dir / p.file]) != p.sha256]


def _check_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise EngineError(f"engine file {path.name} ({what}) is missing from {path.parent}; re-export the engine")


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
