"""TensorRT backend: runs a prebuilt plan with numpy in and out (no torch, no pycuda).

A plan only loads on the GPU model and TensorRT version that built it, so the runner checks both
first (engine/backends/tensorrt_plans.py) and says how to fix a mismatch. `tensorrt` and cuda-python are
imported inside the functions that need them: the rest of the runtime works on machines without them.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

import numpy as np

from diffscore.engine.backends.base import RunnerBase
from diffscore.engine.backends.tensorrt_plans import (cuda_call, gpu_model, import_tensorrt, plan_fit, set_device,
                                                     tensorrt_version)
from diffscore.engine.graph_contract import at_batch
from diffscore.errors import EngineError
from diffscore.engine.manifest import BATCH, GraphSpec, PlanSpec

log = logging.getLogger("diffscore")


def native_handle(obj) -> int:
    """The address behind a cuda-python handle (stream, pointer): cuda-bindings 13 deprecates int(obj)."""
    if isinstance(obj, int):
        return obj
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:  # cuda-python before 12.9
        return int(obj)
    return get_cuda_native_handle(obj)


def numpy_dtype(trt, dtype) -> np.dtype:
    """numpy's dtype for a TensorRT tensor type; one EngineError line for types numpy lacks (bf16, fp8)."""
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:
        raise EngineError(f"the plan has a {getattr(dtype, 'name', dtype)} input or output, which numpy cannot "
                          "hold; export the graph with float32/float16 inputs and outputs and build it again") from None


class SharedActivations:
    """One block of activation memory per GPU for every execution context of the process (TensorRT's
    USER_MANAGED allocation): the text encoder, VAE and UNet contexts run one after another, so each would
    otherwise reserve its own max-profile activations. The block grows to the largest context's need (every
    context is pointed at the new block; `generation` tells CUDA graphs captured on the old one to re-capture),
    and `lock` serializes the contexts that share it, from execution to the stream's sync."""

    def __init__(self, cudart, device: int):
        self.cudart, self.device = cudart, device
        self.pointer, self.size, self.generation = None, 0, 0
        self.contexts: dict[int, tuple] = {}  # id(runner) -> (context, its size)
        self.lock = threading.RLock()

    def attach(self, owner, context, size: int) -> None:
        with self.lock:
            self.contexts[id(owner)] = (context, size)
            if size > self.size:
                if self.pointer is not None:
                    cuda_call(self.cudart.cudaFree(self.pointer), "cudaFree of the shared activations")
                self.pointer = cuda_call(self.cudart.cudaMalloc(size), f"cudaMalloc({size} bytes) for activations")
                self.size, self.generation = size, self.generation + 1
                for ctx, need in self.contexts.values():
                    set_device_memory(ctx, self.pointer, need)
            else:
                set_device_memory(context, self.pointer, size)

    def detach(self, owner) -> None:
        with self.lock:
            self.contexts.pop(id(owner), None)
            if not self.contexts and self.pointer is not None:
                self.cudart.cudaFree(self.pointer)
                self.pointer, self.size = None, 0
                _ACTIVATIONS.pop(self.device, None)


_ACTIVATIONS: dict[int, SharedActivations] = {}  # GPU index -> its shared activation block
_ACTIVATIONS_LOCK = threading.Lock()


def shared_activations(cudart, device: int) -> SharedActivations:
    with _ACTIVATIONS_LOCK:
        return _ACTIVATIONS.setdefault(device, SharedActivations(cudart, device))


def set_device_memory(context, pointer, size: int) -> None:
    """TensorRT >= 10.1: set_device_memory(address, size); 10.0: the device_memory attribute."""
    address = native_handle(pointer)
    if hasattr(context, "set_device_memory"):
        context.set_device_memory(address, size)
    else:
        context.device_memory = address


def activation_size(engine) -> int:
    """Activation bytes a context of `engine` needs (device_memory_size_v2 from TensorRT 10.1)."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(engine.device_memory_size if size is None else size)


def row_runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """(first output row, first table row, count) per run of consecutive table rows: one copy each."""
    runs, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            runs.append((start, int(rows[start]), i - start))
            start = i
    return runs


CUDA_GRAPHS_ENV = "DIFFSCORE_CUDA_GRAPHS"  # "1": TensorRT runners replay one CUDA graph per batch size


class TensorRTRunner(RunnerBase):
    """One TensorRT plan behind the runner contract, on GPU `device`.

    Memory is set up once, for the plan's max_batch, and reused by every call whatever its batch: a device
    buffer and a pinned (page-locked) host buffer per input and output, so copies are DMA transfers on the
    runner's stream. Inputs that are rows of a constant table (engine.conditioning.Rows: the prompt set's
    embeddings) upload the table once and gather its rows on the GPU. Activations live in one block shared
    by the process's contexts on that GPU (SharedActivations). With `cuda_graphs` (or DIFFSCORE_CUDA_GRAPHS=1)
    the plan's execution is captured once per batch size as a CUDA graph and replayed: fewer launches per call
    for small batches. The engine's caller chunks larger batches by `max_batch`."""

    def __init__(self, plan_path: Path | str, spec: PlanSpec, graph_spec: GraphSpec, device: int = 0,
                 cuda_graphs: bool | None = None):
        self._device: dict[str, int] = {}  # tensor name -> device pointer
        self._host: dict[str, np.ndarray] = {}  # tensor name -> pinned host buffer (max_batch, as bytes)
        self._constants: dict[str, tuple] = {}  # input name -> (table, its device copy)
        self._host_pointers: list = []  # what cudaMallocHost returned, for cudaFreeHost
        self._graphs: dict[int, tuple] = {}  # batch -> (cudaGraph, cudaGraphExec)
        self._graph_generation = 0  # SharedActivations.generation the graphs were captured under
        self._activations = None
        self._stream = None
        trt, self._cudart = import_tensorrt()
        plan_path = Path(plan_path)
        self.name = "tensorrt"
        self.graph = spec.graph
        self.inputs, self.outputs = graph_spec.inputs, graph_spec.outputs
        self.max_batch = spec.max_batch
        self.device = device
        self.cuda_graphs = os.environ.get(CUDA_GRAPHS_ENV) == "1" if cuda_graphs is None else cuda_graphs
        self._batch = None  # the batch the context's input shapes are set for
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
        self._context = self._engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        self._activations = shared_activations(self._cudart, device)
        self._activations.attach(self, self._context, activation_size(self._engine))
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
            self._set_input_shape(t.name, at_batch(t.shape, self.max_batch))
        for n in names:
            nbytes = max(int(np.prod(tuple(self._context.get_tensor_shape(n)))) * self._dtypes[n].itemsize, 1)
            self._device[n] = cuda_call(self._cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes} bytes) for {n}")
            self._context.set_tensor_address(n, native_handle(self._device[n]))
            host = cuda_call(self._cudart.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes} bytes) for {n}")
            self._host_pointers.append(host)
            self._host[n] = np.ctypeslib.as_array(ctypes.cast(native_handle(host), ctypes.POINTER(ctypes.c_uint8)),
                                                  (nbytes,))

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
        for t in self.inputs:
            if feed[t.name].dtype != self._dtypes[t.name]:  # the plan's own dtype, not a silent cast
                raise EngineError(f"{self.graph}: input {t.name} is {feed[t.name].dtype}, the TensorRT plan takes "
                                  f"{self._dtypes[t.name]}; the plan does not match the manifest: rebuild it")
        with self._activations.lock:  # the activation block is shared: one context runs at a time
            if batch != self._batch:
                for t in self.inputs:
                    self._set_input_shape(t.name, feed[t.name].shape)
                self._batch = batch
            for t in self.inputs:
                array = feed[t.name]
                if getattr(array, "table", None) is not None:  # rows of a constant: gathered on the GPU
                    self._gather(t.name, array)
                    continue
                pinned = self._pinned(t.name, array.shape, array.dtype)
                np.copyto(pinned, array)
                self._copy(self._device[t.name], pinned.ctypes.data, pinned.nbytes, kind.cudaMemcpyHostToDevice,
                           f"copy of {t.name} to the GPU")
            self._execute(batch)
            fetched = {}
            wanted = self._output_names if self.fetch is None else [n for n in self._output_names if n in self.fetch]
            for name in wanted:
                pinned = self._pinned(name, tuple(self._context.get_tensor_shape(name)), self._dtypes[name])
                self._copy(pinned.ctypes.data, self._device[name], pinned.nbytes, kind.cudaMemcpyDeviceToHost,
                           f"copy of {name} from the GPU")
                fetched[name] = pinned
            cuda_call(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            return {name: pinned.copy() for name, pinned in fetched.items()}  # the pinned buffers serve the next call

    def _pinned(self, name: str, shape: tuple, dtype) -> np.ndarray:
        """The first prod(shape) elements of `name`'s pinned host buffer, as an array of that shape."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self._host[name][:nbytes].view(dtype).reshape(shape)

    def _copy(self, dst, src, nbytes: int, kind, what: str) -> None:
        cuda_call(self._cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self._stream), what)

    def _gather(self, name: str, rows) -> None:
        """Input `name` = rows.table[rows.rows]: the table goes to the GPU once (per table, i.e. per prompt set),
        then each run of consecutive rows is one device-to-device copy."""
        table, index = rows.table, np.asarray(rows.rows)
        held = self._constants.get(name)
        if held is None or held[0] is not table:
            if held is not None:
                self._cudart.cudaFree(held[1])
            table = np.ascontiguousarray(table)
            pointer = cuda_call(self._cudart.cudaMalloc(max(table.nbytes, 1)), f"cudaMalloc for the {name} table")
            self._constants[name] = held = (rows.table, pointer, table)  # the arrays stay alive with the copy
            self._copy(pointer, table.ctypes.data, table.nbytes, self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                       f"upload of the {name} table")
        row_bytes = held[2][0].nbytes if len(held[2]) else 0
        base, dst = native_handle(held[1]), native_handle(self._device[name])
        for out_row, table_row, count in row_runs(index):
            self._copy(dst + out_row * row_bytes, base + table_row * row_bytes, count * row_bytes,
                       self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, f"gather of {name} rows")

    def _execute(self, batch: int) -> None:
        """Run the plan on the stream; with CUDA graphs, capture it once per batch size, then replay."""
        stream = native_handle(self._stream)
        if not self.cuda_graphs:
            if not self._context.execute_async_v3(stream):
                raise EngineError(f"{self.graph}: TensorRT execution failed (see its log above)")
            return
        if self._graphs and self._graph_generation != self._activations.generation:  # the activations moved
            self._drop_graphs()
        if batch in self._graphs:
            cuda_call(self._cudart.cudaGraphLaunch(self._graphs[batch][1], self._stream), "cudaGraphLaunch")
            return
        # TensorRT updates its state for new shapes on the first run: run once, then capture a second run
        if not self._context.execute_async_v3(stream):
            raise EngineError(f"{self.graph}: TensorRT execution failed (see its log above)")
        mode = self._cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        cuda_call(self._cudart.cudaStreamBeginCapture(self._stream, mode), "cudaStreamBeginCapture")
        ok = self._context.execute_async_v3(stream)
        graph = cuda_call(self._cudart.cudaStreamEndCapture(self._stream), "cudaStreamEndCapture")
        if not ok:
            raise EngineError(f"{self.graph}: TensorRT execution failed while capturing a CUDA graph")
        self._graphs[batch] = (graph, cuda_call(self._cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate"))
        self._graph_generation = self._activations.generation

    def _drop_graphs(self) -> None:
        for graph, executable in self._graphs.values():
            self._cudart.cudaGraphExecDestroy(executable)
            self._cudart.cudaGraphDestroy(graph)
        self._graphs = {}

    def close(self) -> None:
        """Free the buffers, graphs and the stream (also done when the runner is garbage-collected)."""
        if self._device or self._stream is not None:
            self._cudart.cudaSetDevice(self.device)
        self._drop_graphs()
        for pointer in [*self._device.values(), *(held[1] for held in self._constants.values())]:
            self._cudart.cudaFree(pointer)
        self._device, self._constants = {}, {}
        for pointer in self._host_pointers:
            self._cudart.cudaFreeHost(pointer)
        self._host, self._host_pointers = {}, []
        if self._activations is not None:
            self._activations.detach(self)
            self._activations = None
        if self._stream is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._context = self._engine = None  # TensorRT frees the plan's activation memory with them

    def __del__(self):
        self.close()

    def _set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self._context.set_input_shape(name, shape):
            raise EngineError(f"{self.graph}: TensorRT rejected shape {list(shape)} for input {name}")
