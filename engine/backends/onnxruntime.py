"""ONNX Runtime runner: CPU, CUDA and TensorRT execution providers behind the runner contract."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from diffscore.engine.backends.base import RunnerBase, check_signature, run_error
from diffscore.engine.graph_contract import at_batch
from diffscore.errors import EngineError, first_line
from diffscore.engine.manifest import GraphSpec

log = logging.getLogger("diffscore")

ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(int8)": "int8",
             "tensor(bool)": "bool"}
PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def import_onnxruntime():
    """The onnxruntime module, or one line saying which extra installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise EngineError("ONNX Runtime is not installed: pip install 'diffscore[cpu]', or 'diffscore[gpu]' on a CUDA "
                          "machine (one of the two); or use --backend tensorrt with plans built for this GPU") from None
    return onnxruntime


def available_providers() -> list[str]:
    """The providers this onnxruntime was *built* with: not proof that their libraries load (see gpu_backends)."""
    return import_onnxruntime().get_available_providers()


def tensorrt_loadable() -> bool:
    """Whether TensorRT's library can be loaded: the TensorRT provider needs it, and onnxruntime-gpu lists that
    provider whether or not it is installed."""
    import ctypes

    for name in ("libnvinfer.so.10", "libnvinfer.so.11", "libnvinfer.so", "nvinfer_10.dll", "nvinfer.dll"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    try:
        import tensorrt  # noqa: F401 - its wheel loads libnvinfer from tensorrt_libs
    except (ImportError, OSError):
        return False
    return True


def gpu_backends() -> list[str]:
    """ort-trt / ort-cuda where this onnxruntime has the provider and, for ort-trt, TensorRT loads. Sessions
    still check what they got (OnnxRuntimeRunner): a provider whose CUDA libraries are missing falls back."""
    providers = available_providers()
    found = []
    if "TensorrtExecutionProvider" in providers and tensorrt_loadable():
        found.append("ort-trt")
    if "CUDAExecutionProvider" in providers:
        found.append("ort-cuda")
    return found


def trt_options(spec: GraphSpec, batches: tuple[int, int, int]) -> dict:
    """TensorRT provider options for a graph: its precision (fp16 / Q/DQ int8 must be enabled, or the provider
    builds fp32 and falls over on fp16 ONNX) and one batch profile (else it rebuilds whenever the batch changes)."""
    shapes = lambda batch: ",".join(f"{t.name}:{'x'.join(map(str, at_batch(t.shape, batch)))}"
                                    for t in spec.inputs)
    lo, opt, hi = batches
    return {"trt_fp16_enable": spec.precision == "fp16", "trt_int8_enable": spec.precision == "int8",
            "trt_profile_min_shapes": shapes(lo), "trt_profile_opt_shapes": shapes(opt),
            "trt_profile_max_shapes": shapes(hi)}


class OnnxRuntimeRunner(RunnerBase):
    """One InferenceSession; on GPU providers, I/O binding keeps outputs on the device until copied once."""

    def __init__(self, path: Path, spec: GraphSpec, backend: str = "ort-cpu", device_id: int = 0,
                 threads: int | None = None, graph: str | None = None, batches: tuple[int, int, int] = (1, 32, 32)):
        """batches: (min, opt, max) batch of the TensorRT provider's profile."""
        ort = import_onnxruntime()

        missing = PROVIDERS[backend][0] not in ort.get_available_providers()
        if missing:
            raise EngineError(
                f"backend {backend} needs {PROVIDERS[backend][0]}, which this onnxruntime lacks "
                f"(has {', '.join(ort.get_available_providers())}); on a CUDA machine: pip uninstall onnxruntime, "
                "then pip install 'diffscore[gpu]'"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        providers = []
        for name in PROVIDERS[backend]:
            if name == "TensorrtExecutionProvider":  # precision comes from the ONNX (fp16 / Q/DQ)
                cache = str(Path(path).parent / "trt_ep_cache")
                providers.append((name, {"device_id": device_id, "trt_engine_cache_enable": True,
                                         "trt_engine_cache_path": cache, "trt_timing_cache_enable": True,
                                         **trt_options(spec, batches)}))
            elif name == "CUDAExecutionProvider":
                providers.append((name, {"device_id": device_id}))
            else:
                providers.append(name)
        self.name = f"onnxruntime:{PROVIDERS[backend][0]}"
        self.graph = graph or Path(path).name
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types for a file it cannot read
            raise EngineError(f"onnxruntime cannot load {Path(path).name} ({type(e).__name__}: "
                              f"{first_line(e)[:200]}); the engine directory is damaged: re-export it") from None
        got = self.session.get_providers()  # what the session runs on: a provider that failed to load is left out
        if got[0] != PROVIDERS[backend][0]:
            self.session = None
            raise EngineError(f"backend {backend}: onnxruntime created the {self.graph} session on {got[0]}, not "
                              f"{PROVIDERS[backend][0]} (its CUDA/TensorRT libraries did not load: see onnxruntime's "
                              "log); install the matching CUDA, cuDNN and TensorRT, or choose --backend ort-cpu")
        self.name = f"onnxruntime:{got[0]}"
        self.inputs, self.outputs = spec.inputs, spec.outputs
        meta = lambda args: [(a.name, ORT_TYPES.get(a.type, a.type),  # noqa: E731
                              tuple(d if isinstance(d, int) else None for d in a.shape)) for a in args]
        check_signature(self.graph, "inputs", meta(self.session.get_inputs()), self.inputs)
        check_signature(self.graph, "outputs", meta(self.session.get_outputs()), self.outputs)
        self._gpu = backend != "ort-cpu"
        self._device_id = device_id

    def close(self) -> None:
        self.session = None

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.session is None:
            raise EngineError(f"{self.graph}: this runner was closed")
        try:
            if not self._gpu:
                names = [o.name for o in self.session.get_outputs() if self.fetch is None or o.name in self.fetch]
                return dict(zip(names, self.session.run(names, feed)))
            binding = self.session.io_binding()
            for name, array in feed.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(array))
            for out in self.session.get_outputs():
                binding.bind_output(out.name, "cuda", self._device_id)
            self.session.run_with_iobinding(binding)
            return {o.name: v for o, v in zip(self.session.get_outputs(), binding.copy_outputs_to_cpu())}
        except Exception as e:  # onnxruntime's own InvalidArgument/Fail/RuntimeException types
            raise run_error(self.graph, "onnxruntime", e) from None
