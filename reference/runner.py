"""The torch reference behind the runtime's runner contract, so parity is "the same feed through two
runners" (engine/backends/base.py)."""

from __future__ import annotations

import numpy as np
import torch

from diffscore.engine.backends.base import RunnerBase
from diffscore.engine.manifest import GraphSpec


class TorchRunner(RunnerBase):
    """A module whose forward takes the graph's inputs in manifest order and returns its outputs in
    manifest order (the same modules export traces: export/graphs.py)."""

    name = "torch"

    def __init__(self, module: torch.nn.Module, spec: GraphSpec, graph: str = "graph"):
        self.module, self.graph = module.eval(), graph
        self.inputs, self.outputs = spec.inputs, spec.outputs

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = self.module(*(torch.from_numpy(np.ascontiguousarray(feed[t.name])) for t in self.inputs))
        out = [out] if isinstance(out, torch.Tensor) else list(out)
        return {spec.name: o.numpy() for spec, o in zip(self.outputs, out)}

    def close(self) -> None:
        self.module = None
