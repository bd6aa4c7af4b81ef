"""ONNX Runtime runner: CPU, CUDA and TensorRT execution providers behind the runner contract."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from diffscore.engine.backends.base import RunnerBase, check_signature, run_error
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


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


class OnnxRuntimeRunner(RunnerBase):
    """One InferenceSession; on GPU providers, I/O binding keeps outputs on the device until copied once."""

    def __init__(self, path: Path, spec: GraphSpec, backend: str = "ort-cpu", device_id: int = 0, threads: int | None = None,
                 graph: str | None = None):
        import onnxruntime as ort

        missing = PROVIDERS[backend][0] not in ort.get_available_providers()
        if missing:
            raise EngineError(
                f"backend {backend} needs {PROVIDERS[backend][0]}, which this onnxruntime lacks "
                f"(has {', '.join(ort.get_available_providers())}); pip install 'diffscore[gpu]' on a CUDA machine"
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
                                         "trt_engine_cache_path": cache, "trt_timing_cache_enable": True}))
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
                values = self.session.run(None, feed)
                return {o.name: v for o, v in zip(self.session.get_outputs(), values)}
            binding = self.session.io_binding()
            for name, array in feed.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(array))
            for out in self.session.get_outputs():
                binding.bind_output(out.name, "cuda", self._device_id)
            self.session.run_with_iobinding(binding)
            return {o.name: v for o, v in zip(self.session.get_outputs(), binding.copy_outputs_to_cpu())}
        except Exception as e:  # onnxruntime's own InvalidArgument/Fail/RuntimeException types
            raise run_error(self.graph, "onnxruntime", e) from None
