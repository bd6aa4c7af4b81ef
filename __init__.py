"""diffscore: diffusion models as compiled zero-/few-shot classifiers and image-text matchers.

The top-level names are the runtime's (no torch)::

    import diffscore
    with diffscore.load("engines/sd15") as engine:
        results = engine.classify(["cat.png"], ["cat", "dog"])   # list[Classification]
        scores = engine.match(["cat.png"], ["a cat", "a dog"])  # MatchResult

Export, calibration and training live in diffscore.export, diffscore.calibration and diffscore.reference
(the torch extra); the command line is `diffscore --help`.
"""

__version__ = "0.1.0"

__all__ = ["load", "Engine", "Classification", "ClassifyOptions", "DcOptions", "HeadOptions", "DiffDisOptions",
           "MatchResult", "MatchOptions", "EngineError", "__version__"]


def __getattr__(name):  # lazy, so `import diffscore` stays instant and torch-free
    if name == "EngineError":
        from diffscore.errors import EngineError

        return EngineError
    if name in __all__:
        from diffscore import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'diffscore' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
