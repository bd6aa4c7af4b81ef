"""The manifest is untrusted input: every field checked once, at load (`Manifest.load` calls `check_manifest`).

An engine directory may come from anyone. Before any field reaches a path, a shape, an allocation, a
format string or a computation, it is checked here: JSON size and nesting, every field's type against
its dataclass annotation, hex digests, sizes, dims, dtypes, enumerations, layer lists, the schedule
(finite, in (0, 1)), timesteps in range, and the graphs' declared signatures against the manifest's own
sizes (image size and channels, sample shape, tokenizer length, hidden size, attention layers). The
backends then hold each graph file to its declared signature (engine/backends/base.py: check_signature).
Each problem is one EngineError line that names the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path

from diffscore.errors import EngineError

MAX_MANIFEST_BYTES = 64 << 20  # a real manifest is tens of KB (1000 schedule values, a few graphs)
MAX_DEPTH = 32  # JSON nesting; a real manifest nests 6 deep
MAX_ITEMS = 1 << 20  # entries of any one list or object
MAX_TEXT = 1 << 16  # characters of any one string
MAX_DIM = 1 << 20  # any one fixed tensor dimension
MAX_ELEMENTS = 1 << 28  # elements of one sample (C·H·W) or image
MAX_BYTES = 1 << 46  # bytes of one file (64 TiB)
MAX_TIMESTEPS = 100_000  # length of the training schedule
MAX_SEED = 2**32 - 1
HEX64 = re.compile(r"[0-9a-f]{64}")
MODULE_NAME = re.compile(r"[A-Za-z0-9_.]{1,256}")  # a diffusers module name, e.g. up_blocks.1.attentions.0
AXIS = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # a symbolic axis: "batch", "queries"
KEY = re.compile(r"[A-Za-z0-9_.\-]{1,128}")  # a graph, head, file or plan key
DTYPES = ("float32", "float16", "float64", "bfloat16", "int64", "int32", "int8", "uint8", "bool")
GRAPH_PRECISIONS = ("fp32", "fp16", "int8")
# The manifest's vocabularies, owned here (torch-free) and imported by the stages that make them and by the CLI:
HEAD_KINDS = ("linear", "attention", "difformer")  # a head's architecture (reference.heads)
HEAD_SOURCES = ("labels", "synthetic", "pseudo-labels")
SAMPLERS = ("dpm-solver", "ddim")  # the sampler of synthetic training images (reference.sampling)
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")  # INT8 range calibration (calibration.quantize)


def bad(where: str, value, expected: str) -> EngineError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return EngineError(f"manifest.json: {where} is {shown}, expected {expected}: the engine directory is damaged or "
                       "was not made by `diffscore export`; re-export it")


def check_json_shape(raw, path: Path) -> None:
    """Bounded nesting and size of the parsed JSON (iterative: a deep document cannot exhaust the stack)."""
    stack, seen = [(raw, 1)], 0
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise EngineError(f"{path} nests deeper than {MAX_DEPTH} levels; it is not a diffscore manifest: re-export "
                              "the engine")
        if isinstance(value, (dict, list)):
            seen += len(value)
            if len(value) > MAX_ITEMS or seen > 16 * MAX_ITEMS:
                raise EngineError(f"{path} holds more than {MAX_ITEMS:,} entries in one place; re-export the engine")
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
        elif isinstance(value, str) and len(value) > MAX_TEXT:
            raise EngineError(f"{path} holds a string of {len(value):,} characters (at most {MAX_TEXT:,}); re-export "
                              "the engine")


# --- types: every field against its dataclass annotation --------------------------------------------------
def check_types(record, where: str = "") -> None:
    hints = typing.get_type_hints(type(record))
    for f in dataclasses.fields(record):
        check_type(getattr(record, f.name), hints[f.name], f"{where}{f.name}")


def check_type(value, hint, where: str) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise bad(where, value, f"a {hint.__name__} record")
        check_types(value, f"{where}.")
    elif origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        check_type(value, next(a for a in args if a is not type(None)), where)
    elif hint is list or origin is list:
        if not isinstance(value, list):
            raise bad(where, value, "a list")
        for i, item in enumerate(value):
            if args:
                check_type(item, args[0], f"{where}[{i}]")
    elif hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad(where, value, "an object")
        for k, item in value.items():
            if args:
                check_type(item, args[1], f"{where}[{k!r}]")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(where, value, "an integer")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(where, value, "a finite number")
    elif hint is str:
        if not isinstance(value, str):
            raise bad(where, value, "a string")
    elif hint is bool:
        if not isinstance(value, bool):
            raise bad(where, value, "true or false")


# --- values ------------------------------------------------------------------------------------------------
def in_range(where: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise bad(where, value, f"an integer in [{lo}, {hi}]")
    return value


def one_of(where: str, value, allowed) -> None:
    if value not in allowed:
        raise bad(where, value, f"one of {', '.join(map(str, allowed))}")


def hex_digest(where: str, value: str) -> None:
    if not HEX64.fullmatch(value):
        raise bad(where, value, "a sha256: 64 lowercase hex digits")


def names(where: str, values: list[str], pattern=MODULE_NAME, empty_ok: bool = True) -> None:
    """Distinct strings of the given form (module names, keys)."""
    if not values and not empty_ok:
        raise bad(where, values, "a non-empty list")
    for i, v in enumerate(values):
        if not pattern.fullmatch(v):
            raise bad(f"{where}[{i}]", v, f"a name matching {pattern.pattern}")
    if len(set(values)) != len(values):
        raise bad(where, values, "distinct names")


def labels(where: str, values: list[str]) -> None:
    if not values or any(not v.strip() for v in values) or len(set(values)) != len(values):
        raise bad(where, values, "a non-empty list of distinct, non-empty labels")


def shape_of(where: str, shape: list, exact: list | None = None) -> None:
    """Dims: a symbolic axis name (BATCH, "queries", ...) or a positive int; with `exact`, equal to it."""
    if len(shape) > 8 or any(not (isinstance(d, str) and AXIS.fullmatch(d) or
                                  isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_DIM) for d in shape):
        raise bad(where, shape, f"at most 8 dims, each an axis name or an integer in [1, {MAX_DIM}]")
    if exact is not None and list(shape) != list(exact):
        raise bad(where, shape, f"{exact} (the manifest's own sizes)")


def graph_io(m, key: str, inputs, outputs) -> None:
    """A graph the runtime feeds directly: at least these inputs (dtype and shape) and outputs (shape where given;
    any float dtype, as a reduced-precision graph may return its own), as its contract builds them from the
    manifest's sizes (engine/graph_contract.py)."""
    graph = m.graphs.get(key)
    if graph is None:
        return
    for what, specs, want in (("inputs", graph.inputs, inputs), ("outputs", graph.outputs, outputs)):
        declared = {t.name: t for t in specs}
        for spec in want:
            if spec.name not in declared:
                raise bad(f"graphs[{key!r}].{what}", sorted(declared), f"a list with {spec.name!r}")
            found = declared[spec.name]
            shape_of(f"graphs[{key!r}].{what}[{spec.name!r}].shape", found.shape, spec.shape)
            one_of(f"graphs[{key!r}].{what}[{spec.name!r}].dtype", found.dtype,
                   (spec.dtype,) if what == "inputs" else ("float32", "float16"))


def check_manifest(m, path: Path) -> None:
    """Every field of a loaded manifest (types already built by `_typed`), each problem one line."""
    from diffscore.engine.scorers.diffdis import MODES
    from diffscore.engine.graph_contract import (ITC_IMAGE, ITC_TEXT, TEXT_ENCODER, UNET, ModelDims,
                                                 diffdis_graph_contract, graph_contracts, head_graph_contract,
                                                 itc_graph_contracts, role_of)
    from diffscore.engine.manifest import PRECISIONS
    from diffscore.kernels import DSD_PRESETS, LOSSES, PREDICTION_TYPES, STRATEGIES
    from diffscore.engine.options import check_template

    check_types(m)
    if len(m.diffscore_version) > 64:
        raise bad("diffscore_version", m.diffscore_version, "a version string")
    hex_digest("source_sha256", m.source_sha256)
    in_range("image_size", m.image_size, 1, 1 << 14)
    one_of("image_channels", m.image_channels, (1, 3))
    if m.image_size**2 * m.image_channels > MAX_ELEMENTS:
        raise bad("image_size", m.image_size, "an image of at most 2^28 values")
    if len(m.sample_shape) != 3:
        raise bad("sample_shape", m.sample_shape, "(channels, height, width)")
    for i, d in enumerate(m.sample_shape):
        in_range(f"sample_shape[{i}]", d, 1, MAX_DIM)
    if math.prod(m.sample_shape) > MAX_ELEMENTS:
        raise bad("sample_shape", m.sample_shape, "a sample of at most 2^28 values")
    T = len(m.alphas_cumprod)
    if not 2 <= T <= MAX_TIMESTEPS:
        raise bad("alphas_cumprod", f"<{T} values>", f"the training schedule, 2 to {MAX_TIMESTEPS:,} values")
    for i, a in enumerate(m.alphas_cumprod):  # types checked: finite numbers
        if not 0.0 < a < 1.0:
            raise bad(f"alphas_cumprod[{i}]", a, "a cumulative alpha in (0, 1)")
    in_range("max_length", m.max_length, 1, 1 << 16)
    in_range("text_hidden_size", m.text_hidden_size, 1, MAX_DIM)
    names("attention_layers", m.attention_layers)
    names("feature_blocks", m.feature_blocks)
    one_of("prediction_type", m.prediction_type, PREDICTION_TYPES)
    one_of("conditioning", m.conditioning, ("sd", "sdxl"))
    sdxl = m.conditioning == "sdxl"
    if sdxl != (m.tokenizer_2 is not None) or sdxl != (m.time_ids is not None):
        raise EngineError(f"{path}: conditioning {m.conditioning!r} with tokenizer_2 {m.tokenizer_2!r} and time_ids "
                          f"{m.time_ids!r} do not fit (sd: neither; sdxl: both); re-export it")
    if m.time_ids is not None and len(m.time_ids) != 6:
        raise bad("time_ids", m.time_ids, "6 numbers (original size, crop top-left, target size)")
    timestep = lambda where, t: in_range(where, t, 0, T - 1)  # noqa: E731

    # graphs and files
    names("graphs", list(m.graphs), KEY, empty_ok=False)
    for key in (TEXT_ENCODER, UNET):
        if key not in m.graphs:
            raise EngineError(f"manifest.json lists no {key} graph (it lists {', '.join(m.graphs) or 'none'}): the "
                              "engine directory is damaged or incomplete; re-export it")
    for key, g in m.graphs.items():
        at = f"graphs[{key!r}]"
        hex_digest(f"{at}.sha256", g.sha256)
        in_range(f"{at}.size", g.size, 0, MAX_BYTES)
        one_of(f"{at}.precision", g.precision, GRAPH_PRECISIONS)
        for what, specs in (("inputs", g.inputs), ("outputs", g.outputs)):
            if not 1 <= len(specs) <= 64:
                raise bad(f"{at}.{what}", f"<{len(specs)} tensors>", "1 to 64 tensors")
            names(f"{at}.{what}", [t.name for t in specs], KEY)
            for t in specs:
                one_of(f"{at}.{what}[{t.name!r}].dtype", t.dtype, DTYPES)
                shape_of(f"{at}.{what}[{t.name!r}].shape", t.shape)
    names("files", list(m.files), KEY)
    for key, f in m.files.items():
        hex_digest(f"files[{key!r}].sha256", f.sha256)
        in_range(f"files[{key!r}].size", f.size, 0, MAX_BYTES)
    names("plans", list(m.plans), KEY)
    for key, p in m.plans.items():
        at = f"plans[{key!r}]"
        one_of(f"{at}.graph", p.graph, list(m.graphs))
        one_of(f"{at}.precision", p.precision, PRECISIONS)
        hex_digest(f"{at}.sha256", p.sha256)
        in_range(f"{at}.size", p.size, 0, MAX_BYTES)
        in_range(f"{at}.min_batch", p.min_batch, 1, 1 << 16)
        in_range(f"{at}.opt_batch", p.opt_batch, p.min_batch, 1 << 16)
        in_range(f"{at}.max_batch", p.max_batch, p.opt_batch, 1 << 16)

    # the graphs the runtime feeds itself, against the contract at the manifest's sizes
    C, S = m.image_channels, m.image_size
    if m.pixel_space:
        if m.latent_scaling is not None or list(m.sample_shape) != [C, S, S]:
            raise bad("sample_shape", m.sample_shape, f"[{C}, {S}, {S}] with latent_scaling null (no VAE: pixel space)")
    elif m.latent_scaling is None or not m.latent_scaling > 0:
        raise bad("latent_scaling", m.latent_scaling, "a positive number (the VAE's scaling factor)")
    dims = ModelDims.of(m)
    contracts = graph_contracts(dims)
    for key in m.graphs:
        if role_of(key) in contracts:
            graph_io(m, key, contracts[role_of(key)].inputs, contracts[role_of(key)].outputs)

    # heads, adapters, defaults, records
    names("heads", list(m.heads), KEY)
    for key, h in m.heads.items():
        at = f"heads[{key!r}]"
        one_of(f"{at}.graph", h.graph, list(m.graphs))
        one_of(f"{at}.kind", h.kind, HEAD_KINDS)
        labels(f"{at}.labels", h.labels)
        names(f"{at}.blocks", h.blocks, empty_ok=False)
        if not h.steps:
            raise bad(f"{at}.steps", h.steps, "at least one noise step")
        for i, t in enumerate(h.steps):
            timestep(f"{at}.steps[{i}]", t)
        in_range(f"{at}.seed", h.seed, 0, MAX_SEED)
        for i, pair in enumerate(h.feedback):
            if len(pair) != 2:
                raise bad(f"{at}.feedback[{i}]", pair, "a [source, target] block pair")
            names(f"{at}.feedback[{i}]", pair)
        head = head_graph_contract(dims, len(h.steps), len(h.labels))
        graph_io(m, h.graph, head.inputs, head.outputs)
        if h.training is not None:
            one_of(f"{at}.training.source", h.training.source, HEAD_SOURCES)
    for key, a in m.adapters.items():
        at = f"adapters[{key!r}]"
        in_range(f"{at}.lora_rank", a.lora_rank, 1, 1 << 16)
        hex_digest(f"{at}.adapter_sha256", a.adapter_sha256)
        if a.score_weights is not None and set(a.score_weights) != set(m.attention_layers):
            raise bad(f"{at}.score_weights", sorted(a.score_weights), "one weight per attention layer")
    d = m.defaults
    try:
        check_template(d.template)
    except EngineError as e:
        raise bad("defaults.template", d.template, f"a template with one {{}} ({e})") from None
    if not d.stages:
        raise bad("defaults.stages", d.stages, "at least one [n_samples, keep] stage")
    for i, stage in enumerate(d.stages):
        if len(stage) != 2 or not 1 <= stage[0] <= T or stage[1] < 1:
            raise bad(f"defaults.stages[{i}]", stage, f"[n_samples in [1, {T}], keep >= 1]")
    one_of("defaults.loss", d.loss, LOSSES)
    in_range("defaults.dsd_steps", d.dsd_steps, 1, T)
    one_of("defaults.strategy", d.strategy, STRATEGIES)
    one_of("defaults.dsd_preset", d.dsd_preset, list(DSD_PRESETS))
    if m.timestep_profile is not None:
        for i, t in enumerate(m.timestep_profile):
            timestep(f"timestep_profile[{i}]", t)
        if len(set(m.timestep_profile)) != len(m.timestep_profile):
            raise bad("timestep_profile", "<repeated timesteps>", "distinct timesteps")
    if (c := m.calibration) is not None:
        hex_digest("calibration.sha256", c.sha256)
        in_range("calibration.size", c.size, 0, MAX_BYTES)
        in_range("calibration.samples", c.samples, 1, MAX_ITEMS)
        one_of("calibration.method", c.method, CALIBRATION_METHODS)
        one_of("calibration.graph", c.graph, list(m.graphs))
        for key, kind in (("agreement", float), ("images", int), ("min_agreement", float)) if c.gate else ():
            check_type(c.gate.get(key), kind, f"calibration.gate.{key}")  # `diffscore info` prints them
    if (dd := m.diffdis) is not None:
        one_of("diffdis.graph", dd.graph, list(m.graphs))
        names("diffdis.blocks", dd.blocks, empty_ok=False)
        timestep("diffdis.image_step", dd.image_step)
        in_range("diffdis.seed", dd.seed, 0, MAX_SEED)
        in_range("diffdis.eos_token_id", dd.eos_token_id, 0, (1 << 31) - 1)
        in_range("diffdis.text_dim", dd.text_dim, 1, MAX_DIM)
        in_range("diffdis.timesteps", dd.timesteps, 1, T)
        in_range("diffdis.generate_steps", dd.generate_steps, 1, T)
        one_of("diffdis.mode", dd.mode, MODES)
        contract = diffdis_graph_contract(dims, dd.text_dim)
        graph_io(m, dd.graph, contract.inputs, contract.outputs)
    if (itc := m.itc) is not None:
        one_of("itc.image_graph", itc.image_graph, list(m.graphs))
        one_of("itc.text_graph", itc.text_graph, list(m.graphs))
        timestep("itc.noise_step", itc.noise_step)
        in_range("itc.seed", itc.seed, 0, MAX_SEED)
        in_range("itc.dim", itc.dim, 1, MAX_DIM)
        names("itc.blocks", itc.blocks, empty_ok=False)
        one_of("itc.kind", itc.kind, ("unet", "clip"))
        if itc.kind == "clip":  # the CLIP towers' feeds, built from these (engine/scorers/itc.py)
            if not itc.tokenizer:
                raise bad("itc.tokenizer", itc.tokenizer, "the CLIP tokenizer file of a kind 'clip' record")
            in_range("itc.max_length", itc.max_length, 1, 1 << 16)
            in_range("itc.image_size", itc.image_size, 1, 1 << 14)
            one_of("itc.image_channels", itc.image_channels, (1, 3))
            for key in ("image_mean", "image_std"):
                values = getattr(itc, key)
                if len(values) != itc.image_channels or (key == "image_std" and min(values) <= 0):
                    raise bad(f"itc.{key}", values, f"{itc.image_channels} per-channel values (std > 0)")
        towers = itc_graph_contracts(dims, itc.dim, clip=(itc.image_channels, itc.image_size, itc.max_length)
                                     if itc.kind == "clip" else None)
        for key, contract in ((itc.image_graph, towers[ITC_IMAGE]), (itc.text_graph, towers[ITC_TEXT])):
            graph_io(m, key, contract.inputs, contract.outputs)
