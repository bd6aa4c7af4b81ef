"""TensorRT backend: runs a prebuilt plan with numpy in and out (no torch, no pycuda).

A plan only loads on the GPU model and TensorRT version that built it, so the runner checks both
first and says how to fix a mismatch. `tensorrt` and cuda-python are imported inside the functions
that need them: the rest of the runtime works on machines without them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffscore.engine.backends.base import RunnerBase
from diffscore.errors import EngineError
from diffscore.engine.manifest import BATCH, GraphSpec, Manifest, PlanSpec

log = logging.getLogger("diffscore")
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


def native_handle(obj) -> int:
    """The address behind a cuda-python handle (stream, pointer): cuda-bindings 13 deprecates int(obj)."""
    if isinstance(obj, int):
        return obj
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:  # cuda-python before 12.9
        return int(obj)
    return get_cuda_native_handle(obj)


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


def shape_at(shape: list, batch: int) -> tuple[int, ...]:
    """A manifest shape with its symbolic batch axis set to `batch`."""
    return tuple(batch if dim == BATCH else dim for dim in shape)


def numpy_dtype(trt, dtype) -> np.dtype:
    """numpy's dtype for a TensorRT tensor type; one EngineError line for types numpy lacks (bf16, fp8)."""
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:
        raise EngineError(f"the plan has a {getattr(dtype, 'name', dtype)} input or output, which numpy cannot "
                          "hold; export the graph with float32/float16 inputs and outputs and build it again") from None


class TensorRTRunner(RunnerBase):
    """One TensorRT plan behind the runner contract, on GPU `device`. Device buffers are sized for the plan's
    max_batch and allocated once; the engine's caller chunks larger batches by `max_batch`."""

    def __init__(self, plan_path: Path | str, spec: PlanSpec, graph_spec: GraphSpec, device: int = 0):
        self._device: dict[str, int] = {}  # tensor name -> device pointer
        self._stream = None
        trt, self._cudart = import_tensorrt()
        plan_path = Path(plan_path)
        self.name = "tensorrt"
        self.graph = spec.graph
        self.inputs, self.outputs = graph_spec.inputs, graph_spec.outputs
        self.max_batch = spec.max_batch
        self.device = device
        set_device(self._cudart, device)  # the engine, its context and buffers live on the current device

        gpu, version = gpu_model(self._cudart, device), tensorrt_version(trt)
        fit = plan_fit(spec, gpu, version)
        if fit is None:
            raise EngineError(
                f"{plan_path.name} was built for {spec.gpu} ({spec.multiprocessors or '?'} SMs, compute capability "
                f"{spec.compute_capability or '?'}) with TensorRT {spec.tensorrt_version}, GPU {device} here is "
                f"{gpu.slug} ({gpu.multiprocessors} SMs, {gpu.compute_capability}) with TensorRT {version}; "
                f"build plans here with `diffscore build-trt {plan_path.parent}`"
            )
        if fit == "compatible":
            log.warning("%s was built on %s and runs on %s (same compute capability %s): rebuild it here with "
                        "`diffscore build-trt %s` for this GPU's own tuning", plan_path.name, spec.gpu, gpu.slug,
                        gpu.compute_capability, plan_path.parent)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._engine = trt.Runtime(self._logger).deserialize_cuda_engine(plan_path.read_bytes())
        if self._engine is None:
            raise EngineError(
                f"TensorRT {version} could not load {plan_path.name} (see its log above); "
                f"rebuild it with `diffscore build-trt {plan_path.parent}`"
            )
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        engine_inputs = {n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        if engine_inputs != {t.name for t in self.inputs}:
            raise EngineError(
                f"{plan_path.name} takes inputs {sorted(engine_inputs)}, the manifest's {self.graph} takes "
                f"{sorted(t.name for t in self.inputs)}; rebuild it with `diffscore build-trt {plan_path.parent}`"
            )
        self._output_names = [n for n in names if n not in engine_inputs]
        self._dtypes = {n: numpy_dtype(trt, self._engine.get_tensor_dtype(n)) for n in names}
        self._batch_axis = {t.name: t.shape.index(BATCH) for t in self.inputs}

        # Size each buffer for the largest batch: set the max input shapes, read the output shapes back.
        self._stream = cuda_call(self._cudart.cudaStreamCreateWithFlags(1), "cudaStreamCreateWithFlags")  # non-blocking
        for t in self.inputs:
            self._set_input_shape(t.name, shape_at(t.shape, self.max_batch))
        for n in names:
            nbytes = int(np.prod(tuple(self._context.get_tensor_shape(n)))) * self._dtypes[n].itemsize
            self._device[n] = cuda_call(self._cudart.cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes} bytes) for {n}")
            self._context.set_tensor_address(n, native_handle(self._device[n]))

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy the feed to the GPU, run the plan on one stream, copy the outputs back."""
        if self._stream is None:
            raise EngineError(f"{self.graph}: this runner was closed")
        batches = {name: feed[name].shape[axis] for name, axis in self._batch_axis.items()}
        if len(set(batches.values())) != 1:
            raise EngineError(f"{self.graph}: the inputs disagree on the batch size: {batches}")
        batch = next(iter(batches.values()))
        if batch > self.max_batch:
            raise EngineError(
                f"{self.graph}: batch {batch} is above the TensorRT plan's max_batch {self.max_batch}; "
                "split the feed, or build the plans again with a larger max_batch"
            )
        cudart, kind = self._cudart, self._cudart.cudaMemcpyKind
        cuda_call(cudart.cudaSetDevice(self.device), f"cudaSetDevice({self.device})")  # per thread: callers may vary
        staged = []  # keep the contiguous copies alive until the stream is synchronized
        for t in self.inputs:
            if feed[t.name].dtype != self._dtypes[t.name]:  # the plan's own dtype, not a silent cast
                raise EngineError(f"{self.graph}: input {t.name} is {feed[t.name].dtype}, the TensorRT plan takes "
                                  f"{self._dtypes[t.name]}; the plan does not match the manifest: rebuild it")
            array = np.ascontiguousarray(feed[t.name])
            staged.append(array)
            self._set_input_shape(t.name, array.shape)
            cuda_call(
                cudart.cudaMemcpyAsync(
                    self._device[t.name], array.ctypes.data, array.nbytes, kind.cudaMemcpyHostToDevice, self._stream
                ),
                f"copy of {t.name} to the GPU",
            )
        if not self._context.execute_async_v3(native_handle(self._stream)):
            raise EngineError(f"{self.graph}: TensorRT execution failed (see its log above)")
        outputs = {}
        for name in self._output_names if self.fetch is None else [n for n in self._output_names if n in self.fetch]:
            out = np.empty(tuple(self._context.get_tensor_shape(name)), self._dtypes[name])
            cuda_call(
                cudart.cudaMemcpyAsync(
                    out.ctypes.data, self._device[name], out.nbytes, kind.cudaMemcpyDeviceToHost, self._stream
                ),
                f"copy of {name} from the GPU",
            )
            outputs[name] = out
        cuda_call(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return outputs

    def close(self) -> None:
        """Free the device buffers and the stream (also done when the runner is garbage-collected)."""
        if self._device or self._stream is not None:
            self._cudart.cudaSetDevice(self.device)
        for pointer in self._device.values():
            self._cudart.cudaFree(pointer)
        self._device = {}
        if self._stream is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._context = self._engine = None  # TensorRT frees the plan's activation memory with them

    def __del__(self):
        self.close()

    def _set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self._context.set_input_shape(name, shape):
            raise EngineError(f"{self.graph}: TensorRT rejected shape {list(shape)} for input {name}")
