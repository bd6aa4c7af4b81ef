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
from functools import lru_cache
from pathlib import Path

import numpy as np

from diffscore.engine.backends.base import RunnerBase, check_signature
from diffscore.engine.cache import cache_root
from diffscore.engine.manifest import GraphSpec
from diffscore.errors import EngineError

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
    """One compiled model with `streams` infer requests: up to `streams` concurrent `infer` calls run at once
    (the engine's worker threads), each on its own OpenVINO stream; threads = all streams' threads together."""

    def __init__(self, path: Path, spec: GraphSpec, precision: str = "fp32", threads: int | None = None,
                 streams: int = 1, graph: str | None = None):
        config = {"INFERENCE_PRECISION_HINT": HINTS.get(precision, "f32"), "NUM_STREAMS": str(max(1, streams)),
                  "CACHE_DIR": str(cache_root() / "openvino" / spec.sha256[:16])}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if precision == "bf16":
            require_bf16()
        ov_core = core()
        self.name = f"openvino:CPU:{precision}"
        self.graph = graph or Path(path).name
        self.inputs, self.outputs = spec.inputs, spec.outputs
        try:
            self.compiled = ov_core.compile_model(str(path), "CPU", config)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EngineError(f"OpenVINO could not compile {Path(path).name}: {first}") from None
        wanted = {t.name for t in self.inputs + self.outputs}

        def signature(ports):  # a port has several names; the manifest's, where it is one of them
            return [(next(iter(p.get_names() & wanted), p.get_any_name()), p.get_element_type().to_dtype().name,
                     p.get_partial_shape().rank.get_length()) for p in ports]

        check_signature(self.graph, "inputs", signature(self.compiled.inputs), self.inputs)
        check_signature(self.graph, "outputs", signature(self.compiled.outputs), self.outputs)
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(max(1, streams)):
            self._requests.put(self.compiled.create_infer_request())

    def close(self) -> None:
        self._requests = queue.SimpleQueue()
        self.compiled = None

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.compiled is None:
            raise EngineError(f"{self.graph}: this runner was closed")
        request = self._requests.get()  # blocks while every request is busy
        try:
            request.infer({k: np.ascontiguousarray(v) for k, v in feed.items()})
            return {o.name: request.get_tensor(o.name).data.copy() for o in self.outputs}
        finally:
            self._requests.put(request)
