"""The lean runtime: numpy + ONNX Runtime or TensorRT. Never imports torch."""

from diffscore.engine.engine import Engine, load
from diffscore.engine.classify_options import ClassifyOptions, DcOptions, DiffDisOptions, HeadOptions
from diffscore.engine.results import Classification, MatchOptions, MatchResult
from diffscore.errors import EngineError

__all__ = ["Classification", "ClassifyOptions", "DcOptions", "DiffDisOptions", "Engine", "EngineError", "HeadOptions",
           "MatchOptions", "MatchResult", "load"]
