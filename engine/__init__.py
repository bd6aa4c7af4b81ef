"""The lean runtime: numpy + ONNX Runtime or TensorRT. Never imports torch."""

from diffscore.engine.engine import Engine, load
from diffscore.errors import EngineError
from diffscore.engine.results import Classification

__all__ = ["Classification", "Engine", "EngineError", "load"]
