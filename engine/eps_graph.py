"""Which UNet graph a call runs: the ε̂-only graph (export/eps_graph.py) for the methods that read ε̂ only
(Diffusion Classifier, race, cascade), the scoring graph (ε̂ + attention scores) for DSD matching.

When an engine has the ε̂-only graph of its precision (and, on TensorRT, a plan of it for this GPU), load()
opens that graph as the "unet_eps" runner and defers the scoring graph until a method reads scores, so a
classify-only process holds one UNet, not two.
"""

from __future__ import annotations

import threading

from diffscore.engine.manifest import Manifest

EPS_OUTPUT = "eps"
EPS_ROLE = "unet_eps"  # the runner role of the ε̂-only graph (Engine.runners)


def eps_graph(precision: str) -> str:
    """The manifest key of the ε̂-only UNet graph of a precision: "unet_eps" (fp32, bf16), "unet_eps.fp16", ..."""
    return EPS_ROLE if precision in ("fp32", "bf16") else f"{EPS_ROLE}.{precision}"


def has_eps_graph(manifest: Manifest, precision: str, backend: str, device: int = 0) -> bool:
    """Whether the ε̂-only graph of `precision` exists and runs on `backend` (TensorRT: a plan of it here)."""
    key = eps_graph(precision)
    if key not in manifest.graphs:
        return False
    if backend == "tensorrt":
        from diffscore.engine.backends.tensorrt import matching_plan

        return matching_plan(manifest, key, device) is not None
    return True


class Deferred:
    """A runner opened on its first use (infer, or any attribute other than `fetch`); closing an unopened one
    does nothing. Thread-safe: concurrent first calls open it once."""

    def __init__(self, open_runner, graph: str):
        self._open, self.graph, self.fetch = open_runner, graph, None
        self._runner, self._lock = None, threading.Lock()

    @property
    def opened(self) -> bool:
        return self._runner is not None

    def runner(self):
        with self._lock:
            if self._runner is None:
                self._runner = self._open()
                if self.fetch is not None:
                    self._runner.fetch = self.fetch
        return self._runner

    def infer(self, feed):
        return self.runner().infer(feed)

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()

    def __getattr__(self, name):  # name, inputs, outputs, max_batch, ...: the opened runner's
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.runner(), name)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "fetch" and getattr(self, "_runner", None) is not None:
            self._runner.fetch = value
