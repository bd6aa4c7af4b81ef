"""The graph contract, owned by the runtime: for each graph role, its inputs and outputs (names, dtypes, shapes with
the symbolic batch axis), a sample feed and its batch profile, all from the model's sizes (`ModelDims`).

Export builds each graph to it (export/graphs.py), load checks a manifest's graphs against it
(engine/manifest_checks.py), the TensorRT builder sizes its profiles by it, parity and autoselect draw their random
feeds from it, and the runtime feeds graphs by its names. TensorRT demo/Diffusion's per-model `get_input_names` /
`get_input_profile` / `get_sample_input` is the model. Torch-free: the runtime owns it, export imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffscore.engine.manifest_schema import BATCH, TensorSpec

# graph roles (the manifest keys of their fp32 graphs)
TEXT_ENCODER, VAE_ENCODER, UNET, UNET_EPS = "text_encoder", "vae_encoder", "unet", "unet_eps"
ITC_IMAGE, ITC_TEXT, DIFFDIS = "itc_image", "itc_text", "diffdis"
QUERIES = "queries"  # DiffDis's symbolic axis of (text, noise, timestep) queries per image
# tensor names
INPUT_IDS, INPUT_IDS_2 = "input_ids", "input_ids_2"  # token ids of tokenizer 1 and (SDXL) 2
HIDDEN, POOLED = "last_hidden_state", "text_embeds"  # text encoder outputs; POOLED is also an SDXL UNet input
IMAGE, LATENT = "image", "latent"  # VAE encoder: pixels in [-1, 1] -> x0
SAMPLE, TIMESTEP, CONTEXT, TIME_IDS = "sample", "timestep", "encoder_hidden_states", "time_ids"  # UNet inputs
EPS, ATTN_SCORES = "eps", "attn_scores"  # UNet outputs: the model output (ε̂, v or x0), per-layer DSD scores
LOGITS = "logits"  # a head graph's output
PIXEL_VALUES, EMBEDDING = "pixel_values", "embedding"  # ITC towers: CLIP's pixels or x_t / ids or states -> embedding
TEXT_QUERY, NOISE_QUERY, ERROR, SIMILARITY = "text", "noise", "error", "similarity"  # DiffDis: queries -> scores

VAE_BATCH = 8  # images per VAE encoder call: at 512² its activations at a larger batch would reserve GBs for nothing
TOKEN_ID_LIMIT = 49406  # sample token ids stay below CLIP's special tokens (every exported tokenizer is CLIP's)


def at_batch(shape: list, batch: int, other: int | None = None) -> tuple[int, ...]:
    """A declared shape with its symbolic batch axis set to `batch` (and any other symbolic axis to `other`)."""
    return tuple(batch if d == BATCH else other if isinstance(d, str) and other is not None else d for d in shape)


@dataclass(frozen=True)
class ModelDims:
    """The sizes every graph's shapes come from: read from the torch model at export, from the manifest at load."""

    max_length: int  # L: tokens per prompt
    text_hidden_size: int  # D: width of encoder_hidden_states (both encoders' on SDXL)
    sample_shape: tuple[int, int, int]  # (C, H, W) of the UNet sample: latent or pixel
    image_channels: int
    image_size: int
    timesteps: int  # T: the schedule's length
    attention_layers: int  # width of the scoring UNet's attn_scores; 0: it has none
    pixel_space: bool  # no VAE encoder
    pooled_size: int | None = None  # SDXL: encoder 2's pooled projection
    time_ids: tuple[float, ...] | None = None  # SDXL: the added time ids the engine feeds

    @classmethod
    def of(cls, manifest) -> "ModelDims":
        pooled = next((t.shape[-1] for t in manifest.graphs[TEXT_ENCODER].outputs if t.name == POOLED), None) \
            if TEXT_ENCODER in manifest.graphs else None
        return cls(manifest.max_length, manifest.text_hidden_size, tuple(manifest.sample_shape),
                   manifest.image_channels, manifest.image_size, len(manifest.alphas_cumprod),
                   len(manifest.attention_layers), manifest.pixel_space, pooled,
                   None if manifest.time_ids is None else tuple(manifest.time_ids))


@dataclass(frozen=True)
class GraphContract:
    """One graph role: the inputs it takes and the outputs the runtime reads (at least these), and its batch cap."""

    role: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]  # dtypes are fp32's: a reduced-precision graph may return its own
    dims: ModelDims
    max_batch: int | None = None  # a cap on the batch profile (the VAE encoder's)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def profile(self, min_batch: int, opt_batch: int, max_batch: int) -> tuple[int, int, int]:
        """The (min, opt, max) batch of this graph's TensorRT profile for the runtime's batch range."""
        hi = max_batch if self.max_batch is None else min(max_batch, self.max_batch)
        return min(min_batch, hi), min(opt_batch, hi), hi

    def sample_feed(self, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Random inputs of the right names, dtypes and shapes (3 along other symbolic axes: DiffDis's queries),
        with values the graph meets in use: token ids, timesteps in the schedule, pixels in [-1, 1], the engine's
        own time ids, standard normal otherwise."""
        feed = {}
        for t in self.inputs:
            shape = at_batch(t.shape, batch, other=3)
            if t.name in (INPUT_IDS, INPUT_IDS_2):
                value = rng.integers(0, TOKEN_ID_LIMIT, shape)
            elif t.name == TIMESTEP:
                value = rng.integers(0, self.dims.timesteps, shape)
            elif t.name == IMAGE:
                value = rng.uniform(-1, 1, shape)
            elif t.name == TIME_IDS:
                value = np.tile(np.asarray(self.dims.time_ids), (batch, 1))
            else:
                value = rng.standard_normal(shape)
            feed[t.name] = value.astype(t.dtype)
        return feed


def graph_contracts(dims: ModelDims) -> dict[str, GraphContract]:
    """The contract of each graph role the model has: text encoder, VAE encoder (latent models), scoring UNet
    (ε̂ and, where layers are captured, attention scores) and the ε̂-only UNet (engine/eps_graph.py)."""
    L, D, sample = dims.max_length, dims.text_hidden_size, [BATCH, *dims.sample_shape]
    f32 = lambda name, shape: TensorSpec(name, "float32", list(shape))  # noqa: E731
    ids, text_out, unet_extra = [TensorSpec(INPUT_IDS, "int64", [BATCH, L])], [f32(HIDDEN, [BATCH, L, D])], []
    if dims.time_ids is not None:  # SDXL: the second tokenizer, the pooled embedding and the time ids
        ids.append(TensorSpec(INPUT_IDS_2, "int64", [BATCH, L]))
        text_out.append(f32(POOLED, [BATCH, dims.pooled_size]))
        unet_extra = [f32(POOLED, [BATCH, dims.pooled_size]), f32(TIME_IDS, [BATCH, len(dims.time_ids)])]
    unet_in = (f32(SAMPLE, sample), f32(TIMESTEP, [BATCH]), f32(CONTEXT, [BATCH, L, D]), *unet_extra)
    scores = [f32(ATTN_SCORES, [BATCH, dims.attention_layers])] if dims.attention_layers else []
    roles = [GraphContract(TEXT_ENCODER, tuple(ids), tuple(text_out), dims),
             GraphContract(UNET, unet_in, (f32(EPS, sample), *scores), dims),
             GraphContract(UNET_EPS, unet_in, (f32(EPS, sample),), dims)]
    if not dims.pixel_space:
        C, S = dims.image_channels, dims.image_size
        roles.append(GraphContract(VAE_ENCODER, (f32(IMAGE, [BATCH, C, S, S]),), (f32(LATENT, sample),), dims,
                                   max_batch=VAE_BATCH))
    return {c.role: c for c in roles}


def head_graph_contract(dims: ModelDims, steps: int, classes: int) -> GraphContract:
    """A head graph: the image noised at each of the head's `steps` -> logits over its classes."""
    return GraphContract("head", (TensorSpec(SAMPLE, "float32", [BATCH, steps, *dims.sample_shape]),),
                         (TensorSpec(LOGITS, "float32", [BATCH, classes]),), dims)


def itc_graph_contracts(dims: ModelDims | None, dim: int, clip: tuple[int, int, int] | None = None) -> dict:
    """The two ITC towers -> L2-normalised embeddings of width `dim`. Kind "unet": x_t at the run's noise step and
    the text encoder's states; kind "clip": CLIP's pixel_values and token ids, `clip` = (channels, size, length)
    (its own sizes: `dims` may then be None)."""
    if clip is None:
        L, D = dims.max_length, dims.text_hidden_size
        image_in = TensorSpec(SAMPLE, "float32", [BATCH, *dims.sample_shape])
        text_in = TensorSpec(HIDDEN, "float32", [BATCH, L, D])
    else:
        c, s, length = clip
        image_in, text_in = (TensorSpec(PIXEL_VALUES, "float32", [BATCH, c, s, s]),
                             TensorSpec(INPUT_IDS, "int64", [BATCH, length]))
    out = (TensorSpec(EMBEDDING, "float32", [BATCH, dim]),)
    return {ITC_IMAGE: GraphContract(ITC_IMAGE, (image_in,), out, dims),
            ITC_TEXT: GraphContract(ITC_TEXT, (text_in,), out, dims)}


def diffdis_graph_contract(dims: ModelDims, text_dim: int) -> GraphContract:
    """The DiffDis graph: x_t and, per image, Q (text query, noise query, timestep) rows -> error and similarity."""
    f32 = lambda name, shape: TensorSpec(name, "float32", shape)  # noqa: E731
    query = [BATCH, QUERIES, text_dim]
    return GraphContract(DIFFDIS, (f32(SAMPLE, [BATCH, *dims.sample_shape]), f32(TEXT_QUERY, query),
                                   f32(NOISE_QUERY, query), f32(TIMESTEP, [BATCH, QUERIES])),
                         (f32(ERROR, [BATCH, QUERIES]), f32(SIMILARITY, [BATCH, QUERIES])), dims)


def batch_profile(manifest, key: str, batches: tuple[int, int, int]) -> tuple[int, int, int]:
    """(min, opt, max) batch of manifest graph `key`'s profile: its contract's cap on the runtime's batch range."""
    contract = graph_contracts(ModelDims.of(manifest)).get(role_of(key))
    return batches if contract is None else contract.profile(*batches)


def role_of(key: str) -> str:
    """The role of a manifest graph key: "unet.fp16" -> "unet", "unet_eps.int8" -> "unet_eps"."""
    return key.split(".")[0]
