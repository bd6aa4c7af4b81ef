"""diffscore: diffusion models as compiled zero-/few-shot classifiers and image-text matchers.

The top-level names are the runtime's (no torch): ``diffscore.load(engine_dir)`` -> ``Engine``.
"""

__version__ = "0.1.0"


def __getattr__(name):  # lazy, so `import diffscore` stays instant and torch-free
    if name in ("load", "Engine"):
        from diffscore import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'diffscore' has no attribute {name!r}")
