"""A small fake `tensorrt` and CUDA runtime (`cudart`) that record every call, so the TensorRT runner and
builder run in CI without a GPU. bench/gpu_check.py uses the fake `tensorrt` as its stand-in network on a
GPU without TensorRT, with the real cudart underneath.

The fake plan is JSON: per tensor its mode, dtype and shape (-1 = the batch axis), and for each output the
input it copies (an identity network) or none (zeros). Device memory in the fake cudart is ctypes buffers,
so host<->device copies are plain memmoves that the tests can check byte for byte.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import json
import sys
import types

import numpy as np


class Calls(list):
    """(name, *args) per call, in order."""

    def named(self, name: str) -> list[tuple]:
        return [c for c in self if c[0] == name]


# --- the CUDA runtime -------------------------------------------------------------------------------
class FakeCudart:
    """cuda.bindings.runtime's shape: every call returns (error, *values); error 0 is cudaSuccess."""

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToHost = 0
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorInvalidDevice = 101

    class cudaStream_t:  # cuda-bindings 13 deprecates int(handle): get_cuda_native_handle(handle) instead
        def __init__(self, handle: int):
            self.handle = handle

        def __int__(self):
            raise AssertionError("int(cuda object) is deprecated in cuda-bindings 13: use get_cuda_native_handle")

    def __init__(self, gpus=(("NVIDIA H100 80GB HBM3", 9, 0, 132),), total=80 << 30):
        """gpus: (name, major, minor, SMs[, integrated]) per device."""
        self.calls = Calls()
        self.gpus, self.total, self.device = list(gpus), total, 0
        self.buffers: dict[int, ctypes.Array] = {}
        self.streams = self.graphs = 0
        self.copies: list[tuple] = []  # (kind, dst, src, nbytes) per cudaMemcpyAsync
        self.pinned: set[int] = set()  # cudaMallocHost's allocations

    def _ok(self, *values):
        return (self.cudaError_t.cudaSuccess, *values)

    def cudaGetDeviceCount(self):
        self.calls.append(("cudaGetDeviceCount",))
        return self._ok(len(self.gpus))

    def cudaSetDevice(self, device: int):
        self.calls.append(("cudaSetDevice", device))
        if not 0 <= device < len(self.gpus):
            return (self.cudaError_t.cudaErrorInvalidDevice,)
        self.device = device
        return self._ok()

    def cudaGetDevice(self):
        self.calls.append(("cudaGetDevice",))
        return self._ok(self.device)

    def cudaGetDeviceProperties(self, device: int):
        self.calls.append(("cudaGetDeviceProperties", device))
        if not 0 <= device < len(self.gpus):
            return (self.cudaError_t.cudaErrorInvalidDevice, None)
        name, major, minor, sms, *integrated = self.gpus[device]
        return self._ok(types.SimpleNamespace(name=name.encode() + b"\0\0", major=major, minor=minor,
                                              multiProcessorCount=sms, integrated=int(any(integrated))))

    def cudaMemGetInfo(self):
        used = sum(len(b) for b in self.buffers.values())
        return self._ok(self.total - used, self.total)

    def cudaMalloc(self, nbytes: int):
        self.calls.append(("cudaMalloc", self.device, nbytes))
        buffer = ctypes.create_string_buffer(nbytes)
        self.buffers[ctypes.addressof(buffer)] = buffer
        return self._ok(ctypes.addressof(buffer))

    def cudaFree(self, pointer: int):
        self.calls.append(("cudaFree", pointer))
        if pointer:  # cudaFree(0) only makes sure the context exists
            self.buffers.pop(pointer)
        return self._ok()

    def cudaMallocHost(self, nbytes: int):
        self.calls.append(("cudaMallocHost", nbytes))
        buffer = ctypes.create_string_buffer(nbytes)
        self.buffers[ctypes.addressof(buffer)] = buffer
        self.pinned.add(ctypes.addressof(buffer))
        return self._ok(ctypes.addressof(buffer))

    def cudaFreeHost(self, pointer: int):
        self.calls.append(("cudaFreeHost", pointer))
        self.buffers.pop(pointer)
        self.pinned.discard(pointer)
        return self._ok()

    def cudaStreamCreateWithFlags(self, flags: int):
        self.calls.append(("cudaStreamCreateWithFlags", flags))
        self.streams += 1
        return self._ok(self.cudaStream_t(1000 + self.streams))

    def cudaStreamCreate(self):
        return self.cudaStreamCreateWithFlags(0)

    def cudaStreamDestroy(self, stream):
        self.calls.append(("cudaStreamDestroy", stream.handle))
        self.streams -= 1
        return self._ok()

    def cudaStreamSynchronize(self, stream):
        self.calls.append(("cudaStreamSynchronize", stream.handle))
        return self._ok()

    def _run(self, work) -> None:
        """Run a stream operation now, or record it into the graph being captured (CUDA's stream capture)."""
        if self.capturing is not None:
            self.capturing.append(work)
        else:
            work()

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind, stream):
        self.calls.append(("cudaMemcpyAsync", self.cudaMemcpyKind(kind).name, nbytes))
        self.copies.append((self.cudaMemcpyKind(kind).name, dst, src, nbytes))
        self._run(lambda: ctypes.memmove(dst, src, nbytes))
        return self._ok()

    def cudaMemsetAsync(self, dst: int, value: int, nbytes: int, stream):
        self.calls.append(("cudaMemsetAsync", nbytes))
        self._run(lambda: ctypes.memset(dst, value, nbytes))
        return self._ok()

    class cudaStreamCaptureMode(enum.IntEnum):
        cudaStreamCaptureModeGlobal = 0
        cudaStreamCaptureModeThreadLocal = 1
        cudaStreamCaptureModeRelaxed = 2

    capturing = None  # the operations recorded since cudaStreamBeginCapture, else None

    def cudaStreamBeginCapture(self, stream, mode):
        self.calls.append(("cudaStreamBeginCapture", stream.handle))
        assert self.capturing is None, "a capture is already under way"
        self.capturing = []
        return self._ok()

    def cudaStreamEndCapture(self, stream):
        self.calls.append(("cudaStreamEndCapture", stream.handle))
        graph, self.capturing = types.SimpleNamespace(work=self.capturing), None
        self.graphs += 1
        return self._ok(graph)

    def cudaGraphInstantiate(self, graph, flags):
        self.calls.append(("cudaGraphInstantiate",))
        return self._ok(types.SimpleNamespace(work=list(graph.work)))

    def cudaGraphLaunch(self, executable, stream):
        self.calls.append(("cudaGraphLaunch", stream.handle))
        for work in executable.work:
            work()
        return self._ok()

    def cudaGraphExecDestroy(self, executable):
        self.calls.append(("cudaGraphExecDestroy",))
        return self._ok()

    def cudaGraphDestroy(self, graph):
        self.calls.append(("cudaGraphDestroy",))
        self.graphs -= 1
        return self._ok()


# --- tensorrt ---------------------------------------------------------------------------------------
DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32, "INT8": np.int8,
          "BOOL": np.bool_}


def plan_bytes(inputs: dict, outputs: dict, activations: int = 1024) -> bytes:
    """A fake plan: inputs {name: (dtype, shape)}, outputs {name: (dtype, shape, source input or None)};
    dtype a TensorRT name ("FLOAT", "HALF", "INT64", or e.g. "BF16" to test unsupported types); activations:
    the bytes a context needs (device_memory_size_v2)."""
    return json.dumps({"inputs": inputs, "outputs": outputs, "activations": activations}).encode()


def fake_tensorrt(cudart, version: str = "10.8.0.43", calls: Calls | None = None, onnx_io=None) -> types.ModuleType:
    """A `tensorrt` module over `cudart` (the fake one, or the real one on a GPU). onnx_io(path) -> (inputs,
    outputs) as plan_bytes takes them: what the fake parser reads from an ONNX file (builder tests)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = calls = Calls() if calls is None else calls
    trt.DataType = enum.Enum("DataType", [*DTYPES, "BF16", "FP8"])
    trt.TensorIOMode = enum.Enum("TensorIOMode", ["INPUT", "OUTPUT"])
    trt.BuilderFlag = enum.Enum("BuilderFlag", ["TF32", "FP16", "INT8"])
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", ["WORKSPACE"])
    trt.ExecutionContextAllocationStrategy = enum.Enum("ExecutionContextAllocationStrategy",
                                                       ["STATIC", "ON_PROFILE_CHANGE", "USER_MANAGED"])
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)

    def nptype(dtype):
        if dtype.name not in DTYPES:
            raise TypeError(f"Could not resolve TensorRT datatype to an equivalent numpy datatype. {dtype}")
        return DTYPES[dtype.name]

    trt.nptype = nptype

    class Logger:
        WARNING = 2

        def __init__(self, level=2):
            self.level = level

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            calls.append(("set_input_shape", name, tuple(shape)))
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            spec = self.engine.tensors[name]
            if name in self.engine.inputs:
                return self.shapes.get(name, tuple(spec[1]))
            batch = next(iter(self.shapes.values()))[0]
            return tuple(batch if d == -1 else d for d in spec[1])

        def set_device_memory(self, address, size):
            calls.append(("set_device_memory", address, size))
            assert isinstance(address, int), "set_device_memory takes the memory's address"
            self.device_memory = (address, size)

        def set_tensor_address(self, name, address):
            calls.append(("set_tensor_address", name))
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream_handle):
            calls.append(("execute_async_v3", stream_handle))
            if self.strategy.name == "USER_MANAGED":
                assert getattr(self, "device_memory", None), "a USER_MANAGED context runs only with device memory set"
            assert isinstance(stream_handle, int), "execute_async_v3 takes the stream's address"
            kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
            for name, (dtype, _, source) in self.engine.outputs.items():
                nbytes = int(np.prod(self.get_tensor_shape(name))) * np.dtype(DTYPES[dtype]).itemsize
                if source is None:
                    error, *_ = cudart.cudaMemsetAsync(self.addresses[name], 0, nbytes, stream_handle)
                else:
                    error, *_ = cudart.cudaMemcpyAsync(self.addresses[name], self.addresses[source], nbytes, kind,
                                                       stream_handle)
                assert getattr(error, "value", error) == 0, error
            return True

    class Engine:
        def __init__(self, plan: dict):
            self.inputs, self.outputs = plan["inputs"], plan["outputs"]
            self.activations = plan.get("activations", 1024)
            self.tensors = {**self.inputs, **self.outputs}
            self.num_io_tensors = len(self.tensors)

        def get_tensor_name(self, i):
            return list(self.tensors)[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name in self.inputs else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return trt.DataType[self.tensors[name][0]]

        @property
        def device_memory_size_v2(self):  # activations: the plan's "activations" entry, else 1 KiB
            return self.activations

        def create_execution_context(self, strategy=None):
            strategy = strategy or trt.ExecutionContextAllocationStrategy.STATIC
            calls.append(("create_execution_context", strategy.name))
            context = Context(self)
            context.strategy = strategy
            return context

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data: bytes):
            calls.append(("deserialize_cuda_engine", len(data)))
            try:
                return Engine(json.loads(data))
            except ValueError:
                return None

    # builder side: records profiles, flags, workspace and timing cache per network
    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class TimingCache:
        def __init__(self, blob: bytes):
            self.blob = blob or b"timing"

        def serialize(self):
            return self.blob

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.pool, self.cache = set(), [], {}, None

        def clear_flag(self, flag):
            self.flags.discard(flag)
            calls.append(("clear_flag", flag.name))

        def set_flag(self, flag):
            self.flags.add(flag)
            calls.append(("set_flag", flag.name))

        def set_memory_pool_limit(self, pool, nbytes):
            self.pool[pool.name] = nbytes
            calls.append(("set_memory_pool_limit", pool.name, nbytes))

        def create_timing_cache(self, blob):
            return TimingCache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Network:
        def __init__(self, flags):
            self.flags, self.io = flags, None

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            self.network.io = onnx_io(path)
            return True

    class Builder:
        def __init__(self, logger):
            pass

        def create_builder_config(self):
            return Config()

        def create_network(self, flags=0):
            return Network(flags)

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            (profile,) = config.profiles
            inputs, outputs = network.io
            calls.append(("build", sorted(inputs), {n: s for n, s in profile.shapes.items()},
                          dict(config.pool), sorted(f.name for f in config.flags)))
            return plan_bytes(inputs, outputs)

    trt.Logger, trt.Runtime, trt.Builder, trt.OnnxParser = Logger, Runtime, Builder, OnnxParser
    return trt


@contextlib.contextmanager
def installed(trt=None, cudart=None):
    """`import tensorrt` gives `trt` and `from cuda.bindings import runtime` gives `cudart` (with
    cuda.bindings.utils.get_cuda_native_handle for its handles) while inside; sys.modules restored after."""
    modules = {}
    if trt is not None:
        modules["tensorrt"] = trt
    if cudart is not None:
        cuda, bindings, utils = (types.ModuleType(n) for n in ("cuda", "cuda.bindings", "cuda.bindings.utils"))
        utils.get_cuda_native_handle = lambda obj: obj.handle
        cuda.bindings, bindings.runtime, bindings.utils = bindings, cudart, utils
        modules.update({"cuda": cuda, "cuda.bindings": bindings, "cuda.bindings.runtime": cudart,
                        "cuda.bindings.utils": utils})
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
