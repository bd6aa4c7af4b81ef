"""TensorRT's side of the GPU: importing it (with one line that says what to install), the GPU model a plan is
tied to, and which of an engine's plans fit this GPU and TensorRT version. The runner is in tensorrt.py; the
builder in export/tensorrt_build.py. `tensorrt` and cuda-python are imported inside the functions that need
them: the rest of the runtime works on machines without them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from diffscore.engine.manifest import Manifest, PlanSpec
from diffscore.errors import EngineError

PIP_HINT = ("pip install 'diffscore[tensorrt-cu12]' (CUDA 12 driver) or 'diffscore[tensorrt-cu13]' (CUDA 13) on a "
            "machine with an NVIDIA GPU (TensorRT 10 or 11); on a Jetson, apt's TensorRT (docs/gpu.md)")
INSTALL_HINT = f"TensorRT is not installed: {PIP_HINT}"


def import_tensorrt():
    """The `tensorrt` and CUDA runtime modules, or an EngineError that says what to install."""
    try:
        import tensorrt as trt
    except (ImportError, OSError):  # OSError: the wheel is there but libnvinfer is not loadable
        raise EngineError(INSTALL_HINT) from None
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise EngineError(f"cuda-python is not installed: {PIP_HINT}") from None
    if int(trt.__version__.split(".")[0]) < 10:
        raise EngineError(f"TensorRT {trt.__version__} is too old, diffscore needs 10 or 11: {PIP_HINT}")
    return trt, cudart


def cuda_call(result: tuple, what: str):
    """Unpack cuda-python's (error, *values) tuple; an error becomes one EngineError line."""
    error, *values = result
    if getattr(error, "value", error) != 0:  # cudaSuccess
        name = getattr(error, "name", error)
        raise EngineError(f"CUDA {what} failed with {name}; is an NVIDIA GPU visible (nvidia-smi)?")
    return values[0] if len(values) == 1 else values


def set_device(cudart, device: int) -> None:
    """Make `device` current on this thread (CUDA's current device is per thread), or one EngineError line."""
    count = cuda_call(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if not 0 <= device < count:
        raise EngineError(f"device={device} does not exist: this machine has {count} GPU(s) (0..{count - 1}); "
                          "pass one of those, or check CUDA_VISIBLE_DEVICES")
    cuda_call(cudart.cudaSetDevice(device), f"cudaSetDevice({device})")


@dataclass(frozen=True)
class GpuModel:
    """What a plan's portability depends on: the model's name, its compute capability and SM count, and
    whether it is integrated (a Jetson module: one name, "Orin", for boards of 4 to 16 SMs and 4 to 64 GB)."""

    slug: str  # the name as a file-name slug, e.g. "nvidia-h100-80gb-hbm3"
    compute_capability: str  # "9.0"
    multiprocessors: int
    integrated: bool = False


def gpu_model(cudart, device: int | None = None) -> GpuModel:
    """GPU `device` (the current one by default)."""
    if device is None:
        device = cuda_call(cudart.cudaGetDevice(), "cudaGetDevice")
    props = cuda_call(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.split(b"\0")[0].decode(errors="replace") if isinstance(props.name, bytes) else props.name
    return GpuModel(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), f"{props.major}.{props.minor}",
                    int(props.multiProcessorCount), bool(getattr(props, "integrated", 0)))


def gpu_slug(cudart, device: int | None = None) -> str:
    """A GPU's model (the current one by default) as a file-name slug, e.g. "nvidia-h100-80gb-hbm3"."""
    return gpu_model(cudart, device).slug


def tensorrt_version(trt) -> str:
    """major.minor.patch: plans are tied to it (the build number does not matter)."""
    return ".".join(trt.__version__.split(".")[:3])


def plan_fit(plan: PlanSpec, gpu: GpuModel, version: str) -> str | None:
    """"exact" (same model, same SM count), "compatible" (another discrete GPU of the same compute capability,
    e.g. H100 SXM vs PCIe: TensorRT runs the plan, tuned for the other one), or None (refused: another TensorRT
    version or compute capability, or an integrated GPU whose model or SM count differs)."""
    if plan.tensorrt_version != version:
        return None
    if plan.gpu == gpu.slug and plan.multiprocessors in (0, gpu.multiprocessors):
        return "exact"
    if not gpu.integrated and plan.compute_capability and plan.compute_capability == gpu.compute_capability:
        return "compatible"
    return None


def matching_plan(manifest: Manifest, graph: str, device: int = 0) -> PlanSpec | None:
    """The plan of `graph` for GPU `device` and this TensorRT version (an exact one first). None when there is
    none, or when TensorRT or that GPU is missing here, so that callers can fall back to ONNX Runtime."""
    try:
        trt, cudart = import_tensorrt()
        gpu = gpu_model(cudart, device)
    except (EngineError, RuntimeError, OSError):
        return None
    return find_plan(manifest.plans, graph, gpu, tensorrt_version(trt))


def find_plan(plans: dict[str, PlanSpec], graph: str, gpu: GpuModel, version: str,
              exact: bool = False) -> PlanSpec | None:
    """The plan of manifest graph `graph` for this GPU and TensorRT version: an exact fit first, then (unless
    `exact`) a compatible one."""
    fits = {p.file: plan_fit(p, gpu, version) for p in plans.values() if p.graph == graph}
    for wanted in ("exact",) if exact else ("exact", "compatible"):
        found = next((p for p in plans.values() if p.graph == graph and fits[p.file] == wanted), None)
        if found is not None:
            return found
    return None
