"""Staged pruning of the Diffusion Classifier as a small state machine.

The driver only decides *what to evaluate next* and *who survives*; the caller supplies the errors.
That keeps one implementation for the torch reference and every runtime backend, and lets the
runtime batch the requests of many images into one UNet call.
"""

from __future__ import annotations

import numpy as np

from diffscore.kernels.timesteps import stage_timesteps


class StagedPruning:
    """Per-image state: which candidates are alive, their running error sums, passes used.

    Usage::

        run = StagedPruning(n_candidates, stages, T)
        while (req := run.request()) is not None:
            cand, tpos = req                    # candidate indices, positions in run.timesteps
            run.submit(errors)                  # (len(cand), len(tpos)) errors
        run.best, run.mean_errors
    """

    def __init__(self, n_candidates: int, stages: list[tuple[int, int]], num_train_timesteps: int = 1000):
        if n_candidates < 1:
            raise ValueError("need at least one candidate")
        per_stage = stage_timesteps(stages, num_train_timesteps)
        self.timesteps = np.array([t for ts in per_stage for t in ts], dtype=np.int64)  # global order
        bounds = np.cumsum([0] + [len(ts) for ts in per_stage])
        self._stage_positions = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        self._keeps = [keep for _, keep in stages]
        self.sums = np.zeros(n_candidates, dtype=np.float64)
        # per (candidate, timestep) errors for the confidence; a candidate's columns are a prefix of the order
        self.errors = np.zeros((n_candidates, len(self.timesteps)), dtype=np.float64)
        self.counts = np.zeros(n_candidates, dtype=np.int64)
        self.alive = np.arange(n_candidates)
        self.pruned_at = np.full(n_candidates, -1)  # stage index at which a candidate was dropped
        self.passes = 0
        self._stage = 0

    def request(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(candidates, timestep positions) to evaluate next, or None when done."""
        while self._stage < len(self._keeps):
            positions = self._stage_positions[self._stage]
            if len(positions) and len(self.alive) > 0:
                return self.alive, positions
            self._prune()  # a stage with no new timesteps still prunes on the errors so far
        return None

    def submit(self, errors: np.ndarray) -> None:
        positions = self._stage_positions[self._stage]
        errors = np.asarray(errors, dtype=np.float64)
        assert errors.shape == (len(self.alive), len(positions)), (
            f"errors {errors.shape} != (alive {len(self.alive)}, timesteps {len(positions)})"
        )
        self.errors[np.ix_(self.alive, positions)] = errors
        self.sums[self.alive] += errors.sum(axis=1)
        self.counts[self.alive] += len(positions)
        self.passes += errors.size
        self._prune()

    def _prune(self) -> None:
        keep = self._keeps[self._stage]
        means = self.mean_errors[self.alive]
        order = np.argsort(means, kind="stable")  # ties: lower candidate index first
        self.pruned_at[self.alive[order[keep:]]] = self._stage
        self.alive = self.alive[order[:keep]]
        self._stage += 1

    @property
    def done(self) -> bool:
        return self._stage >= len(self._keeps)

    @property
    def mean_errors(self) -> np.ndarray:
        """Each candidate's mean error over the timesteps it was evaluated at (inf if none)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), np.inf)

    @property
    def best(self) -> int:
        """The surviving candidate with the lowest mean error."""
        assert self.done, "classification is not finished"
        return int(self.alive[np.argmin(self.mean_errors[self.alive])])

    def ranking(self) -> np.ndarray:
        """All candidates, best first: later-surviving candidates first, then lower mean error."""
        survived = np.where(self.pruned_at < 0, len(self._keeps), self.pruned_at)
        return np.lexsort((np.arange(len(self.sums)), self.mean_errors, -survived))
