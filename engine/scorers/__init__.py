"""One scorer per method behind one small protocol, one file each: `scorer(engine, images, options, batch_size,
progress)` yields one Classification per image, in input order, from the method's resolved options record
(engine/classify_options.py). Each scorer loops over images with `Engine.encoded_windows` and ranks with
`results.ranked` (or, for the Diffusion Classifier, `results.classification`); `Engine` dispatches by method.

- "dc": engine/scorers/dc.py (fixed stages, the race; the cascade in engine/scorers/cascade.py)
- "head": engine/scorers/head.py `classify_head`
- "diffdis": engine/scorers/diffdis.py `classify_diffdis`
Matching: DSD in engine/scorers/dsd.py, DiffDis in engine/scorers/diffdis.py, ITC in engine/scorers/itc.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Iterable, Protocol

import numpy as np

SCORERS = {  # method -> "module:function"
    "dc": "diffscore.engine.scorers.dc:classify_dc",
    "head": "diffscore.engine.scorers.head:classify_head",
    "diffdis": "diffscore.engine.scorers.diffdis:classify_diffdis",
}


class Scorer(Protocol):
    def __call__(self, engine, images, options, batch_size: int | None, progress: bool) -> Iterable: ...


def scorer(method: str) -> Scorer:
    module, name = SCORERS[method].split(":")
    return getattr(import_module(module), name)


@dataclass
class Pairs:
    """A flat list of UNet evaluations: rows into the x_t stack, the embeddings and the noise."""

    xt: np.ndarray  # (K, C, H, W) noised samples, one per (image, timestep)
    xt_row: np.ndarray  # (n,) row of xt for each pair
    timestep: np.ndarray  # (n,) float32
    emb_row: np.ndarray  # (n,) row of the embedding table
    eps_row: np.ndarray  # (n,) row of the noise table
