"""The runner contract every backend meets (borrowed from Polygraphy).

A runner wraps one compiled graph: `infer(feed) -> outputs` with numpy arrays in and out, named as in
the manifest. Torch, ONNX Runtime and TensorRT all fit it, so parity is "same feed, two runners".
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from diffscore.errors import EngineError
from diffscore.engine.manifest import TensorSpec


class Runner(Protocol):
    name: str  # e.g. "onnxruntime:CPUExecutionProvider", "tensorrt"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def check_feed(feed: dict[str, np.ndarray], inputs: list[TensorSpec], graph: str) -> None:
    """Validate names, ranks and dtypes before handing a feed to a backend (clear error, not a crash)."""
    expected = {t.name for t in inputs}
    if set(feed) != expected:
        raise EngineError(f"{graph}: feed has inputs {sorted(feed)}, the graph takes {sorted(expected)}")
    for spec in inputs:
        array = feed[spec.name]
        if array.ndim != len(spec.shape) or np.dtype(array.dtype) != np.dtype(spec.dtype):
            raise EngineError(
                f"{graph}: input {spec.name} is {array.dtype}{list(array.shape)}, expected {spec.dtype}{spec.shape}"
            )
