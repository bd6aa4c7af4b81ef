"""Which UNet graph a call runs: the ε̂-only graph (export/eps_graph.py) for the methods that read ε̂ only
(Diffusion Classifier, race, cascade), the scoring graph (ε̂ + attention scores) for DSD matching.

When an engine has the ε̂-only graph of its precision (and, on TensorRT, a plan of it for this GPU), load()
opens that graph as the "unet_eps" runner beside the scoring graph's "unet" runner. Both open at load, so that
every graph is checked against the manifest there (docs/engine-format.md); the price is a second UNet in memory.
"""

from __future__ import annotations

from diffscore.engine.graph_contract import UNET_EPS
from diffscore.engine.manifest import Manifest


def eps_graph(precision: str) -> str:
    """The manifest key of the ε̂-only UNet graph of a precision: "unet_eps" (fp32, bf16), "unet_eps.fp16", ..."""
    return UNET_EPS if precision in ("fp32", "bf16") else f"{UNET_EPS}.{precision}"


def has_eps_graph(manifest: Manifest, precision: str, backend: str, device: int = 0) -> bool:
    """Whether the ε̂-only graph of `precision` exists and runs on `backend` (TensorRT: a plan of it here)."""
    key = eps_graph(precision)
    if key not in manifest.graphs:
        return False
    if backend == "tensorrt":
        from diffscore.engine.backends.tensorrt_plans import matching_plan

        return matching_plan(manifest, key, device) is not None
    return True
