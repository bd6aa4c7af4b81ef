"""The lean runtime: numpy + ONNX Runtime or TensorRT. Never imports torch."""

from diffscore.engine.engine import Engine, load
from diffscore.engine.results import Classification, ClassifyOptions, MatchOptions, MatchResult
from diffscore.errors import EngineError

__all__ = ["Classification", "ClassifyOptions", "Engine", "EngineError", "MatchOptions", "MatchResult", "load"]
