"""The runner contract every backend meets (borrowed from Polygraphy).

A runner wraps one compiled graph: `infer(feed) -> outputs` with numpy arrays in and out, named as in
the manifest; it is a context manager and `close()` releases it. Torch (the reference), ONNX Runtime
and TensorRT all fit it, so parity is "same feed, two runners". `RunnerBase` does the checks every
backend shares: the feed against the manifest's inputs before each call, and the outputs against
the manifest's outputs on the first call (a graph swapped for another one is refused, not broadcast).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from diffscore.engine.graph_contract import at_batch
from diffscore.engine.manifest import BATCH, TensorSpec
from diffscore.errors import EngineError, first_line


class Runner(Protocol):
    name: str  # e.g. "onnxruntime:CPUExecutionProvider", "tensorrt", "torch"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class RunnerBase:
    """Shared behaviour: validated `infer`, `close`, context manager. Subclasses implement `_infer`."""

    name: str = "runner"
    graph: str = "graph"  # the manifest key, for messages
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    _outputs_checked = False
    # the outputs the caller reads (None: all); backends that can skip copying the others back do (TensorRT,
    # ONNX Runtime on the CPU): the UNet graph's features.* maps are ~168 MB per SD-1.5 call of 32 nobody reads
    fetch: set[str] | None = None

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feed(feed, self.inputs, f"{self.graph} ({self.name})")
        out = self._infer(feed)
        if not self._outputs_checked:
            batch = next((feed[t.name].shape[t.shape.index(BATCH)] for t in self.inputs if BATCH in t.shape), None)
            fetched = [t for t in self.outputs if self.fetch is None or t.name in self.fetch]
            check_outputs(out, fetched, f"{self.graph} ({self.name})", batch)
            self._outputs_checked = True
        return out

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the backend's resources; the runner is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def run_error(graph: str, runtime: str, error: Exception) -> EngineError:
    """A backend's failure while running a graph, as one line: which graph, what the runtime said, the likely cause."""
    return EngineError(f"{graph}: {runtime} failed to run it ({type(error).__name__}: {first_line(error)[:200]}); "
                       "the engine directory is damaged or its manifest does not match its graphs or tokenizer: "
                       "re-export it")


def check_outputs(out: dict[str, np.ndarray], outputs: list[TensorSpec], graph: str, batch: int | None) -> None:
    """Every output the manifest lists, with its dtype and shape (the batch axis = the feed's batch)."""
    missing = [t.name for t in outputs if t.name not in out]
    if missing:
        raise EngineError(f"{graph}: the graph does not produce {missing} (it produces {sorted(out)}): it is not the "
                          "graph this engine was exported with; re-export the engine")
    for spec in outputs:
        array = np.asarray(out[spec.name])
        want = at_batch(spec.shape, batch)
        shape_ok = array.ndim == len(want) and all(w is None or isinstance(w, str) or a == w
                                                   for a, w in zip(array.shape, want))
        if not shape_ok or np.dtype(array.dtype) != np.dtype(spec.dtype):
            raise EngineError(f"{graph}: output {spec.name} is {array.dtype}{list(array.shape)}, the manifest says "
                              f"{spec.dtype}{want}: the graph does not match this engine; re-export it")


def check_signature(graph: str, what: str, got: list[tuple[str, str, tuple]], want: list[TensorSpec]) -> None:
    """At load: a backend's (name, numpy dtype, dims) per input or output against the manifest's: names, dtypes,
    ranks, and every dim fixed on both sides (dims: an int where the graph fixes it, else None)."""
    expected = [(t.name, np.dtype(t.dtype).name, len(t.shape)) for t in want]
    if sorted((n, d, len(s)) for n, d, s in got) != sorted(expected):
        raise EngineError(f"{graph}: the graph's {what} are {sorted((n, d, len(s)) for n, d, s in got)}, the manifest "
                          f"says {sorted(expected)}: it is not the graph this engine was exported with; "
                          "re-export the engine")
    declared = {t.name: t.shape for t in want}
    for name, _, dims in got:
        fixed = [g if isinstance(g, int) and isinstance(w, int) else None for g, w in zip(dims, declared[name])]
        if any(f is not None and f != w for f, w in zip(fixed, declared[name])):
            raise EngineError(f"{graph}: the graph's {what[:-1]} {name} has shape {list(dims)}, the manifest says "
                              f"{declared[name]}: the manifest does not match its graphs; re-export the engine")
