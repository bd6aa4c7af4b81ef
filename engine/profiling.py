"""The per-engine timestep profile: the order in which the race visits the grid (`diffscore profile`).

Scores every candidate of the given images at every grid timestep (no ground truth: the exhaustive
decision is the reference), orders the timesteps by how well they separate each image's winner from its
rivals (kernels.racing.timestep_profile) and records the order in the manifest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffscore.engine.manifest import Manifest
from diffscore.errors import EngineError
from diffscore.kernels import race_plan, timestep_profile


def make_profile(engine, images, labels: list[str], *, templates: list[str] | None = None, timesteps: int | None = None,
                 loss: str | None = None, seed: int = 0, batch_size: int | None = None,
                 progress: bool = False) -> list[int]:
    """The grid's timesteps, best separating first, learned on `images` scored exhaustively by `engine`."""
    if len(images) < 1:
        raise EngineError("the profile needs at least one image")
    if len(labels) < 2:
        raise EngineError("the profile needs at least two labels: it learns which timesteps tell them apart")
    errors = engine.grid_errors(images, labels, templates=templates, timesteps=timesteps, loss=loss, seed=seed,
                                batch_size=batch_size, progress=progress)
    n_templates = errors.shape[1] // len(labels)
    grid, _ = race_plan(len(engine.alphas_cumprod), errors.shape[2])
    order = timestep_profile(errors, np.repeat(np.arange(len(labels)), n_templates))
    return [int(t) for t in grid[order]]


def save_profile(engine_dir: Path | str, profile: list[int], engine=None) -> None:
    """Record the profile in the engine's manifest (atomic write); also in a loaded `engine`, if given."""
    manifest = Manifest.load(engine_dir)
    manifest.timestep_profile = list(profile)
    manifest.save(Path(engine_dir))
    if engine is not None:
        engine.manifest.timestep_profile = list(profile)
