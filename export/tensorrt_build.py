"""Build TensorRT plans for an engine directory, on the GPU that will run them.

Precision comes from the ONNX graphs themselves (fp16 tensors, int8 Q/DQ nodes) and the network is
strongly typed, so no precision builder flags are set (TensorRT 11 removed them); only TF32 is turned
off for fp32 graphs, to keep them at fp32 accuracy. One optimization profile per graph spans the batch
sizes the runtime calls that graph with (its graph contract's profile, engine/graph_contract.py): the UNet and
text encoder up to max_batch, tuned for max_batch (the runtime fills its batches), the VAE encoder up to 8 images.
A timing cache kept in the engine directory makes later builds (another precision, another batch range) fast.
Plans already built for this GPU, TensorRT version and batch range are reused, so running this twice costs only a
hash check.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from diffscore.engine.backends.tensorrt_plans import cuda_call, find_plan, gpu_model, import_tensorrt, tensorrt_version
from diffscore.engine.eps_graph import eps_graph
from diffscore.engine.graph_contract import TEXT_ENCODER, VAE_ENCODER, at_batch, batch_profile
from diffscore.engine.manifest import BATCH, GraphSpec, Manifest, PlanSpec, sha256_file, unet_graph
from diffscore.errors import EngineError

log = logging.getLogger("diffscore")
PRECISIONS = ("fp32", "fp16", "int8")


def tensorrt_available() -> str | None:
    """Why TensorRT plans cannot be built or run on this machine, or None when they can."""
    try:
        _, cudart = import_tensorrt()
        count = cuda_call(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    except (EngineError, RuntimeError, OSError) as e:
        return str(e)
    return None if count > 0 else "no NVIDIA GPU is visible (cudaGetDeviceCount() is 0)"


def graphs_for(manifest: Manifest, precision: str) -> list[str]:
    """Manifest graph keys that run at `precision`: the text and VAE encoders only exist in fp32."""
    if precision not in PRECISIONS:
        raise EngineError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    unet = unet_graph(precision)
    if unet not in manifest.graphs:
        raise EngineError(
            f"the engine has no {precision} UNet graph ({unet}), only {sorted(manifest.graphs)}; "
            "export the fp16 graph or calibrate the int8 one first"
        )
    eps = [eps_graph(precision)] if eps_graph(precision) in manifest.graphs else []  # the ε̂-only UNet, if exported
    return [g for g in (TEXT_ENCODER, VAE_ENCODER) if g in manifest.graphs] + [unet] + eps


def plan_file(graph: str, gpu: str, version: str, precision: str) -> str:
    """E.g. "unet.nvidia-h100-80gb-hbm3.trt10.8.0.fp16.plan" for the manifest graph "unet.fp16"."""
    return f"{graph.split('.')[0]}.{gpu}.trt{version}.{precision}.plan"


def build_plans(
    engine_dir: Path | str,
    precision: str = "fp16",
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int = 32,
    timing_cache: Path | str | None = None,
    workspace_gib: float | None = None,
) -> list[PlanSpec]:
    """Build (or reuse) a plan for every graph `precision` runs and record them in the manifest.

    opt_batch: the batch TensorRT tunes for; default max_batch, the batch the runtime runs.
    timing_cache: file to load and update (default: one per GPU and TensorRT version in engine_dir).
    workspace_gib: cap on TensorRT's scratch memory while building (a Jetson shares it with the CPU);
        None leaves TensorRT's default (the GPU's memory).
    """
    opt_batch = max_batch if opt_batch is None else opt_batch
    if workspace_gib is not None and not workspace_gib > 0:
        raise EngineError(f"workspace_gib must be above 0, got {workspace_gib}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise EngineError(
            "batch sizes must satisfy 1 <= min_batch <= opt_batch <= max_batch, "
            f"got {min_batch}, {opt_batch}, {max_batch}"
        )
    engine_dir = Path(engine_dir)
    manifest = Manifest.load(engine_dir)
    keys = graphs_for(manifest, precision)
    trt, cudart = import_tensorrt()
    model, version = gpu_model(cudart), tensorrt_version(trt)
    gpu = model.slug
    cache_path = Path(timing_cache) if timing_cache else engine_dir / f"timing.{gpu}.trt{version}.cache"

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache = None  # one timing cache shared by every graph's build
    plans = []
    for key in keys:
        batches = batch_profile(manifest, key, (min_batch, opt_batch, max_batch))
        existing = find_plan(manifest.plans, key, model, version, exact=True)
        if existing and _reusable(existing, engine_dir, batches):
            log.info("%s: reusing %s", key, existing.file)
            plans.append(existing)
            continue
        graph = manifest.graphs[key]
        config = builder.create_builder_config()
        if graph.precision == "fp32":  # TF32 (on by default) would break the fp32 parity tolerance of 1e-4
            config.clear_flag(trt.BuilderFlag.TF32)
        if workspace_gib is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
        if cache is None:
            cache = _load_timing_cache(config, cache_path)
        config.set_timing_cache(cache, ignore_mismatch=False)
        name = plan_file(key, gpu, version, graph.precision)
        log.info("%s: building %s (batch %d/%d/%d, TensorRT %s)", key, name, *batches, version)
        start = time.perf_counter()
        source = int8_on_fp16_base(engine_dir, manifest, key) if graph.precision == "int8" else None
        try:
            serialized = _build(trt, builder, config, logger, source or engine_dir / graph.file, key, graph, batches)
        finally:
            if source is not None:
                source.unlink(missing_ok=True)
        _write_atomic(engine_dir / name, serialized)
        _write_atomic(cache_path, config.get_timing_cache().serialize())
        spec = PlanSpec(
            file=name, graph=key, gpu=gpu, tensorrt_version=version, precision=graph.precision,
            min_batch=batches[0], opt_batch=batches[1], max_batch=batches[2],
            sha256=sha256_file(engine_dir / name), size=(engine_dir / name).stat().st_size,
            compute_capability=model.compute_capability, multiprocessors=model.multiprocessors,
        )
        manifest.plans[name.removesuffix(".plan")] = spec
        manifest.save(engine_dir)  # after each plan, so an interrupted run keeps what it built
        log.info("%s: built in %.0f s, %.1f MB", key, time.perf_counter() - start, spec.size / 1e6)
        plans.append(spec)
    return plans


def int8_on_fp16_base(engine_dir: Path, manifest: Manifest, key: str) -> Path | None:
    """An INT8 graph's fp16-base variant (calibration.quantize.on_fp16_base), written beside it for the build: what
    NVIDIA's demo/Diffusion builds INT8 plans from. None (build the fp32-base graph) when `diffscore calibrate`
    gated that variant and it flipped too many decisions."""
    import onnx

    gate = (manifest.calibration.gate if manifest.calibration is not None else None) or {}
    if gate.get("fp16_base_passed") is False:
        log.warning("%s: its fp16-base variant failed the decision gate (agreement %.3f): building the fp32-base "
                    "graph", key, gate.get("fp16_base_agreement", float("nan")))
        return None
    try:
        from diffscore.export.fp16 import on_fp16_base

        model = on_fp16_base(onnx.load(str(engine_dir / manifest.graphs[key].file)))
    except ImportError as e:  # a Jetson without ONNX Runtime (its converter): the graph as calibrated
        log.warning("%s: building the fp32-base INT8 graph (the fp16 base needs onnxruntime: %s)", key, e)
        return None
    path = engine_dir / f".{manifest.graphs[key].file}.fp16-base.onnx"  # < 2 GB: INT8 weights are a quarter
    onnx.save_model(model, str(path))
    return path


def _build(trt, builder, config, logger, path: Path, key: str, graph: GraphSpec, batches: tuple[int, int, int]):
    """Parse one ONNX graph into a strongly typed network with one batch profile; return the plan bytes."""
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)  # holds the weights: must live until the build is done
    if not parser.parse_from_file(str(path)):
        errors = "; ".join(_describe(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(
            f"TensorRT cannot parse {graph.file}: {errors} (diffscore.export.tensorrt_ops.unsupported_ops lists "
            "the operators TensorRT lacks)"
        )
    profile = builder.create_optimization_profile()
    for tensor in graph.inputs:
        if any(isinstance(dim, str) and dim != BATCH for dim in tensor.shape):
            raise EngineError(
                f"{key}: input {tensor.name} has shape {tensor.shape}; only the {BATCH!r} axis may be symbolic"
            )
        profile.set_shape(tensor.name, *(at_batch(tensor.shape, b) for b in batches))
    if config.add_optimization_profile(profile) < 0:
        raise EngineError(f"{key}: TensorRT rejected the batch profile {batches} (see its log above)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT could not build {key} (see its log above); a smaller max_batch may fit")
    return serialized


def _network_flags(trt) -> int:
    """TensorRT 10 builds strongly typed networks on request; 11 always does and deprecates the flag."""
    if int(trt.__version__.split(".")[0]) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _describe(error) -> str:
    """One parser error as "node NAME (OpType): what" on one line."""
    where = f"node {error.node_name() or error.node()} ({error.node_operator()}): " if error.node() >= 0 else ""
    return where + " ".join(str(error.desc()).split())


def _load_timing_cache(config, path: Path):
    """The timing cache saved at `path`, or an empty one when there is none or it does not fit this GPU."""
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if blob and (cache is None or not config.set_timing_cache(cache, ignore_mismatch=False)):
        log.warning("timing cache %s is damaged or from another GPU/TensorRT; starting a new one", path)
        cache = config.create_timing_cache(b"")
    return cache


def _reusable(plan: PlanSpec, engine_dir: Path, batches: tuple[int, int, int]) -> bool:
    path = engine_dir / plan.file
    return (
        (plan.min_batch, plan.opt_batch, plan.max_batch) == batches
        and path.is_file()
        and path.stat().st_size == plan.size
        and sha256_file(path) == plan.sha256
    )


def _write_atomic(path: Path, data) -> None:
    """Write to a temporary name, then rename: a crash never leaves half a plan under the real name."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
