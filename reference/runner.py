"""The torch reference behind the runtime's runner contract, so parity is "the same feed through two
runners" (engine/backends/base.py)."""

from __future__ import annotations

import numpy as np
import torch

from diffscore.engine.backends.base import RunnerBase
from diffscore.engine.manifest import GraphSpec


class TorchRunner(RunnerBase):
    """A module whose forward takes the graph's inputs in manifest order and returns its outputs in
    manifest order (the same modules export traces: export/graphs.py).

    device: where the module runs ("cpu", "cuda:0"); dtype: the float type it runs in (float inputs are
    cast to it, outputs come back in the manifest's dtypes), e.g. torch.float16 for the GPU's fp16 reference."""

    name = "torch"

    def __init__(self, module: torch.nn.Module, spec: GraphSpec, graph: str = "graph", device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.module, self.graph = module.eval().to(self.device, dtype), graph
        self.inputs, self.outputs = spec.inputs, spec.outputs
        if self.device.type != "cpu" or dtype != torch.float32:
            self.name = f"torch:{self.device}:{str(dtype).removeprefix('torch.')}"

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = self.module(*(self._tensor(feed[t.name]) for t in self.inputs))
        out = [out] if isinstance(out, torch.Tensor) else list(out)
        return {spec.name: o.cpu().numpy().astype(spec.dtype, copy=False) for spec, o in zip(self.outputs, out)}

    def close(self) -> None:
        self.module = None
