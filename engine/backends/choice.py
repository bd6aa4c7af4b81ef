"""Which backend runs a graph, and how: the `backend=` names, the GPU-first resolution of "auto", CPU
worker counts, and opening one graph's runner. (On a CPU, "auto" measures: engine/autoselect.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from diffscore.engine.backends.base import Runner
from diffscore.engine.graph_contract import batch_profile
from diffscore.engine.manifest import Manifest, resolve_inside
from diffscore.errors import EngineError

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt", "openvino")
# On CPU, small UNets (samples of at most this many elements) run faster as several concurrent
# single-threaded runs of one session than as one multi-threaded run: measured on the demo UNet,
# 2 cores, batch 128: 855 vs 691 samples/s. Big latents keep ONNX Runtime's intra-op threading.
CONCURRENT_MAX_ELEMENTS = 4096
GPU_BATCH = 32  # UNet pairs per call on the ONNX Runtime GPU backends (TensorRT: its plan's max_batch)


def cpu_workers(manifest: Manifest, backend: str, threads: int | None) -> int:
    """Concurrent UNet runs on CPU backends: several single-threaded ones for small samples."""
    if backend in ("ort-cpu", "openvino") and int(np.prod(manifest.sample_shape)) <= CONCURRENT_MAX_ELEMENTS:
        return threads or os.cpu_count() or 1
    return 1


def resolve_backend(manifest: Manifest, backend: str, unet: str, device: int = 0) -> str:
    """A GPU backend when `auto` finds one, else "auto" still (load() then measures the CPU backends)."""
    if backend != "auto":
        return backend
    from diffscore.engine.backends.onnxruntime import gpu_backends

    if any(p.graph == unet for p in manifest.plans.values()):
        from diffscore.engine.backends.tensorrt_plans import matching_plan

        if matching_plan(manifest, unet, device) is not None:
            return "tensorrt"
    return next(iter(gpu_backends()), "auto")  # "auto": a CPU, load() measures the CPU backends


def make_runner(engine_dir: Path, manifest: Manifest, graph: str, backend: str, device: int, threads, *,
                workers: int = 1, precision: str = "fp32") -> Runner:
    """threads: all the graph's threads together; workers: concurrent infer calls it serves (CPU backends).
    precision: "bf16" asks OpenVINO for bf16 inference of the fp32 graph."""
    spec = manifest.graphs[graph]
    if backend == "openvino":
        from diffscore.engine.backends.openvino import OpenVINORunner

        return OpenVINORunner(resolve_inside(engine_dir, spec.file, f"graph {graph}"), spec, precision, threads,
                              streams=workers, graph=graph)
    if backend == "tensorrt":
        from diffscore.engine.backends.tensorrt import TensorRTRunner
        from diffscore.engine.backends.tensorrt_plans import import_tensorrt, matching_plan, set_device

        set_device(import_tensorrt()[1], device)  # the install message first, then an absent device's
        plan = matching_plan(manifest, graph, device)
        if plan is None:
            raise EngineError(f"{engine_dir} has no TensorRT plan of {graph} for this GPU and TensorRT; run `diffscore "
                              f"build-trt {engine_dir}`")
        return TensorRTRunner(resolve_inside(engine_dir, plan.file, f"plan of {graph}"), plan, spec, device)
    from diffscore.engine.backends.onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(resolve_inside(engine_dir, spec.file, f"graph {graph}"), spec, backend, device,
                             1 if workers > 1 else threads, graph,
                             batches=batch_profile(manifest, graph, (1, GPU_BATCH, GPU_BATCH)))
