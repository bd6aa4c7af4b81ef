"""The manifest's schema: the typed records an engine directory's manifest.json is made of (graphs, plans, files,
scoring defaults, heads, DiffDis, adapters, ITC, calibration) and its vocabularies. Plain dataclasses, torch-free;
`Manifest` (engine/manifest.py) holds them and reads, checks, writes and verifies the file."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffscore.errors import EngineError
from diffscore.kernels.racing import DEFAULT_STRATEGY, RaceConfig

# 2: typed heads / adapters / calibration records, scoring defaults as their own record, every
# non-graph file (tokenizer, head weights, calibration set) listed with its sha256
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
BATCH = "batch"  # the symbolic batch axis of every graph input and output
UNSTATED_DSD_PRESET = "diffscore"  # the preset of manifests written before presets existed (their layers)
PRECISIONS = ("fp32", "fp16", "int8", "bf16")  # bf16: OpenVINO's inference hint on the fp32 graph


def unet_graph(precision: str) -> str:
    """The manifest key of the UNet graph a precision runs: "unet" (fp32, and bf16, which is the fp32 graph
    under OpenVINO's bf16 hint), "unet.fp16", "unet.int8"."""
    return "unet" if precision in ("fp32", "bf16") else f"unet.{precision}"


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64"
    shape: list  # ints, or BATCH for the symbolic batch axis


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
    # what TensorRT's plan compatibility depends on (empty/0 in plans built before they were recorded)
    compute_capability: str = ""  # e.g. "9.0"
    multiprocessors: int = 0  # Jetson modules all report the name "Orin": their SM counts tell them apart


@dataclass
class FileSpec:
    """A non-graph file of the engine (tokenizer, head weights and config, calibration set)."""

    sha256: str
    size: int


def race_record(value) -> RaceConfig:
    """The manifest's race settings as a RaceConfig; a field left null (engines exported before the manifest held
    a RaceConfig) takes RaceConfig's default, as it always did."""
    if isinstance(value, RaceConfig):
        return value
    if not isinstance(value, dict):
        raise EngineError(f"manifest defaults.race is {type(value).__name__}, expected an object; re-export the engine")
    given = {k: v for k, v in value.items() if v is not None}
    try:
        return RaceConfig(**given)
    except TypeError as e:
        raise EngineError(f"manifest defaults.race does not fit engine format {FORMAT_VERSION} ({e}); re-export the "
                          "engine") from None
    except ValueError as e:
        raise EngineError(f"manifest.json: defaults.race is {given!r}, expected valid race settings ({e}): the engine "
                          "directory is damaged or was not made by `diffscore export`; re-export it") from None


@dataclass
class ScoringDefaults:
    """What `classify` and `match` use when the caller does not say."""

    template: str = "{}"  # prompt template, one {} for the label
    stages: list[list[int]] = field(default_factory=lambda: [[50, 5], [500, 1]])  # (n_samples, keep) per stage
    loss: str = "l2"  # l2 | l1 | huber
    dsd_steps: int = 10  # DSD timesteps per pair
    strategy: str = DEFAULT_STRATEGY  # "stages" | "race"
    race: RaceConfig = field(default_factory=RaceConfig)
    # DSD scoring preset (kernels.dsd), fixed at export with its attention layers: export always writes the one it
    # used (kernels.dsd.DEFAULT_DSD_PRESET unless told); this default is only what a manifest without the field
    # (made before presets existed) was exported with
    dsd_preset: str = UNSTATED_DSD_PRESET

    def __post_init__(self):
        self.race = race_record(self.race)


@dataclass
class HeadTraining:
    """How a head's training images got their labels: people ("labels"), the model's own samples
    ("synthetic": generated per label), or the engine's Diffusion Classifier ("pseudo-labels")."""

    source: str = "labels"  # labels | synthetic | pseudo-labels
    images: int | None = None  # images the head trained on (its validation split included)
    # synthetic: the sampler that generated `per_class` images per label from `template`
    sampler: str | None = None  # ddim | dpm-solver
    sampling_steps: int | None = None
    guidance: float | None = None  # classifier-free guidance scale
    per_class: int | None = None
    template: str | None = None
    sample_seed: int | None = None
    # pseudo-labels: the engine whose decisions labelled the images, and which were kept
    engine: str | None = None
    strategy: str | None = None
    threshold: float | None = None  # least decision confidence kept
    candidates: int | None = None  # unlabelled images offered; `images` of them were kept

    def describe(self) -> str:
        """One line for `diffscore info`."""
        if self.source == "synthetic":
            return (f"trained on {self.images} synthetic images ({self.per_class} per label, {self.sampler} "
                    f"{self.sampling_steps} steps, guidance {self.guidance}, template {self.template!r})")
        if self.source == "pseudo-labels":
            return (f"trained on {self.images} of {self.candidates} unlabelled images labelled by {self.engine} "
                    f"({self.strategy}, confidence >= {self.threshold})")
        return f"trained on {self.images if self.images is not None else 'labelled'} labelled images"


@dataclass
class HeadSpec:
    """A trained head shipped as one graph (the UNet layers it reads + the head)."""

    graph: str  # key in Manifest.graphs
    kind: str  # linear | attention | difformer
    labels: list[str]
    blocks: list[str]  # diffusers module names it reads
    steps: list[int]  # noise steps, one UNet pass each
    seed: int  # of the fixed ε shared by all images
    prompt: str  # conditioning of the feature passes ("" = empty prompt)
    weights: str  # head weights file (parity rebuilds the torch head from it)
    config: str  # head config file
    training: HeadTraining | None = None  # how its training images were labelled; None: engines before it existed
    # DifFeed: [source, target] block pairs fed back from a first UNet pass into a second; [] = a one-pass head
    feedback: list[list[str]] = field(default_factory=list)

    @property
    def passes_per_step(self) -> int:
        return 2 if self.feedback else 1

    def __post_init__(self):
        if self.training is not None:
            self.training = _typed(HeadTraining, self.training, "head training")


@dataclass
class DiffDisSpec:
    """DiffDis (`diffscore train-diffdis`) shipped as one graph: the UNet layers up to the last block it
    reads (at its image step, its prompt baked in) + the text stream; x_t, text queries -> error, similarity."""

    graph: str  # key in Manifest.graphs
    blocks: list[str]  # UNet blocks it reads
    image_step: int  # the image's fixed noise step
    seed: int  # of the image's fixed ε
    eos_token_id: int  # the text query is the text encoder's hidden state at the first of these tokens
    text_dim: int
    timesteps: int  # mode "denoise": shared (t, ε) per candidate, by default
    generate_steps: int  # mode "generate": DDIM steps (baked into the graph)
    mode: str  # the default mode: denoise | generate
    weights: str  # the text stream's weights file (parity rebuilds the torch module from it)
    config: str  # its config file


@dataclass
class AdapterSpec:
    """A LoRA run merged into the UNet weights at export (prompt learning)."""

    adapters: str  # the run directory it came from
    lora_rank: int
    adapter_sha256: str
    merged: bool = True
    # DSD pools the attention layers with these weights instead of their mean; None = plain mean
    score_weights: dict[str, float] | None = None
    config: dict = field(default_factory=dict)  # the training configuration, as recorded by the run
    captions: list[str] = field(default_factory=list)


@dataclass
class ItcSpec:
    """The ITC embeddings of a `diffscore finetune` run (`Engine.match(method="itc")`)."""

    image_graph: str  # key in Manifest.graphs: x_t at noise_step -> image embedding
    text_graph: str  # key in Manifest.graphs: the text encoder's last_hidden_state -> text embedding
    noise_step: int  # the image is noised once, at this step
    seed: int  # of the fixed ε (kernels.shared_noise(seed, 1, sample_shape)[0])
    blocks: list[str]  # UNet blocks pooled into the image embedding
    dim: int
    objectives: list[str] = field(default_factory=list)  # what the run trained with (itc, is, rsc)
    run: str = ""  # the run directory it came from
    # kind "clip" (`finetune --clip`): the graphs are the run's CLIP towers, fed CLIP's inputs (engine/scorers/itc.py)
    kind: str = "unet"  # unet: x_t -> embedding, text encoder states -> embedding | clip: pixel_values, input_ids
    tokenizer: str | None = None  # clip: the CLIP tokenizer file (padding to max_length baked in)
    max_length: int = 0  # clip: tokens per text
    image_size: int = 0  # clip: the vision tower's square input
    image_channels: int = 0
    image_mean: list[float] = field(default_factory=list)  # clip: pixel_values = ((x + 1) / 2 - mean) / std
    image_std: list[float] = field(default_factory=list)


@dataclass
class CalibrationRecord:
    """How the INT8 UNet was made (`diffscore calibrate`)."""

    file: str  # the calibration set (npz)
    sha256: str
    size: int
    samples: int
    method: str  # minmax | entropy | percentile
    seed: int
    source: str  # where the calibration images came from
    labels: list[str]
    template: str
    stages: list[list[int]]
    dsd_steps: int
    graph: str  # the INT8 graph's key
    float_layers: list[str]
    auto: bool
    smoothquant: dict | None = None  # {"alpha", "norms"} when SmoothQuant scaling was folded in
    gate: dict | None = None  # {"agreement", "images", "min_agreement"} of the decision gate


def _typed(cls, value, where: str):
    """Build dataclass `cls` from a JSON object; one line naming the record when it does not fit."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise EngineError(f"manifest {where} is {type(value).__name__}, expected an object; re-export the engine")
    try:
        return cls(**value)
    except (TypeError, AttributeError) as e:  # AttributeError: a list where a record's __post_init__ wants an object
        raise EngineError(f"manifest {where} does not fit engine format {FORMAT_VERSION} ({e}); "
                          f"re-export the engine") from None
