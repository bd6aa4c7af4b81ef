"""OpenVINO runner: the engine's ONNX graphs (fp32, the Q/DQ INT8 UNet) compiled for the CPU by OpenVINO.

OpenVINO reads the ONNX files as they are. Its bf16 inference-precision hint runs the fp32 graph in
bf16 where the CPU has bf16 instructions (AVX-512 BF16 or AMX); everywhere else the hint is pinned to
f32, since OpenVINO would otherwise pick bf16 by itself on such CPUs. Compiled models are cached in the
user cache (keyed by the graph's sha256), so the second load skips compilation. `openvino` is
imported inside the functions that need it: the rest of the runtime works without it.
"""

from __future__ import annotations

import queue
import re
import threading
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import numpy as np

from diffscore.engine.backends.base import RunnerBase, check_signature, run_error
from diffscore.engine.cache import cache_dir
from diffscore.engine.manifest import BATCH, GraphSpec
from diffscore.errors import EngineError, first_line

INSTALL_HINT = "OpenVINO is not installed: pip install 'diffscore[openvino]'"
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of the bf16 instructions OpenVINO uses
HINTS = {"fp32": "f32", "fp16": "f32", "int8": "f32", "bf16": "bf16"}  # graph precision -> inference precision


@lru_cache(maxsize=1)
def core():
    """The one openvino.Core of the process, or an EngineError that says what to install."""
    try:
        import openvino as ov
    except ImportError:
        raise EngineError(INSTALL_HINT) from None
    return ov.Core()


def openvino_version() -> str | None:
    try:
        import openvino as ov
    except ImportError:
        return None
    return ov.__version__.split("-")[0]


def cpuinfo(field: str) -> str:
    """The first `field` line of /proc/cpuinfo ("" where there is none, e.g. macOS)."""
    try:
        found = re.search(rf"^{field}\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        return ""
    return found.group(1).strip() if found else ""


def cpu_flags() -> set[str]:
    return set(cpuinfo("flags").split())


def cpu_has_bf16() -> bool:
    """True when this CPU has bf16 instructions (where /proc/cpuinfo is missing, OpenVINO's own report)."""
    flags = cpu_flags()
    if flags:
        return any(f in flags for f in BF16_FLAGS)
    return "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def require_bf16() -> None:
    if not cpu_has_bf16():
        raise EngineError("precision bf16 needs a CPU with bf16 instructions (AVX-512 BF16 or AMX), which this one "
                          "lacks; use fp32, or int8 (`diffscore calibrate`)")


class OpenVINORunner(RunnerBase):
    """The graph compiled once per batch-size bucket, each with `streams` infer requests: up to `streams`
    concurrent `infer` calls run at once (the engine's worker threads), each on its own OpenVINO stream;
    threads = all streams' threads together.

    Why buckets: OpenVINO's CPU plugin runs a static-shape model much faster than the same graph with a
    dynamic batch axis (demo UNet: INT8 1.8x, bf16 1.6x, fp32 1.7x; bench/openvino_shapes.py). So a call's batch
    is padded (repeating its last row) up to the next power of two and run by a model compiled for that
    size, and the outputs are cut back. Compiled models are kept, least recently used first out, within
    a budget of KEEP_BYTES of graph weights (a Stable-Diffusion-size UNet keeps one); a graph whose
    non-batch axes are not all fixed runs on one dynamic model instead."""

    KEEP_BYTES = 1 << 30

    def __init__(self, path: Path, spec: GraphSpec, precision: str = "fp32", threads: int | None = None,
                 streams: int = 1, graph: str | None = None):
        hint = HINTS.get(precision, "f32")
        # One compile cache per graph *and* inference precision: from a CACHE_DIR shared by both, OpenVINO 2026.4
        # loads the f32 blob of a graph for its bf16 compile, which then returns NaN (seen on an AMX CPU).
        self.config = {"INFERENCE_PRECISION_HINT": hint, "NUM_STREAMS": str(max(1, streams)),
                       "CACHE_DIR": str(cache_dir("openvino", spec.sha256, hint))}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        if precision == "bf16":
            require_bf16()
        self.name = f"openvino:CPU:{precision}"
        self.graph = graph or Path(path).name
        self.inputs, self.outputs = spec.inputs, spec.outputs
        self.streams = max(1, streams)
        try:
            self.model = core().read_model(str(path))
        except RuntimeError as e:
            raise EngineError(f"OpenVINO could not read {Path(path).name}: {first_line(e)}") from None
        wanted = {t.name for t in self.inputs + self.outputs}

        def signature(ports):  # a port has several names; the manifest's, where it is one of them
            return [(next(iter(p.get_names() & wanted), p.get_any_name()), p.get_element_type().to_dtype().name,
                     tuple(d.get_length() if d.is_static else None for d in p.get_partial_shape())) for p in ports]

        check_signature(self.graph, "inputs", signature(self.model.inputs), self.inputs)
        check_signature(self.graph, "outputs", signature(self.model.outputs), self.outputs)
        self.static = all(t.shape[0] == BATCH and all(isinstance(d, int) for d in t.shape[1:])
                          for t in self.inputs + self.outputs)
        self.keep = max(1, min(8, self.KEEP_BYTES // max(1, spec.size)))
        self._compiled: OrderedDict[int | None, tuple] = OrderedDict()  # bucket (None: dynamic) -> (model, requests)
        self._lock = threading.Lock()

    def compiled_for(self, batch: int):
        """The compiled model that runs a batch of `batch` (compiled now if its bucket has none)."""
        return self._entry(self.bucket(batch))[0]

    def bucket(self, batch: int) -> int | None:
        return 1 << max(0, batch - 1).bit_length() if self.static else None

    def _entry(self, bucket: int | None):
        with self._lock:  # one compile per bucket, even with every worker thread asking at once
            if self.model is None:
                raise EngineError(f"{self.graph}: this runner was closed")
            if bucket in self._compiled:
                self._compiled.move_to_end(bucket)
                return self._compiled[bucket]
            model = self.model
            if bucket is not None:
                model = model.clone()
                model.reshape({t.name: [bucket] + t.shape[1:] for t in self.inputs})
            try:
                compiled = core().compile_model(model, "CPU", self.config)
            except RuntimeError as e:
                raise EngineError(f"OpenVINO could not compile {self.graph}: {first_line(e)}") from None
            requests: queue.SimpleQueue = queue.SimpleQueue()
            for _ in range(self.streams):
                requests.put(compiled.create_infer_request())
            self._compiled[bucket] = (compiled, requests)
            while len(self._compiled) > self.keep:
                self._compiled.popitem(last=False)
            return self._compiled[bucket]

    def close(self) -> None:
        with self._lock:
            self._compiled.clear()
            self.model = None

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = len(next(iter(feed.values())))
        bucket = self.bucket(batch)
        _, requests = self._entry(bucket)
        if bucket is not None and bucket > batch:
            feed = {k: np.pad(v, [(0, bucket - batch)] + [(0, 0)] * (v.ndim - 1), mode="edge") for k, v in feed.items()}
        request = requests.get()  # blocks while every request is busy
        try:
            request.infer({k: np.ascontiguousarray(v) for k, v in feed.items()})
            cut = slice(None) if bucket is None else slice(batch)
            return {o.name: request.get_tensor(o.name).data[cut].copy() for o in self.outputs}
        except RuntimeError as e:  # OpenVINO's infer and tensor errors
            raise run_error(self.graph, "OpenVINO", e) from None
        finally:
            requests.put(request)
