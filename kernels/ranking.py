"""From candidate (prompt) results to class results: a class scores as its best prompt."""

from __future__ import annotations

import numpy as np

from diffscore.kernels.pruning import StagedPruning


def class_ranking(run: StagedPruning, candidate_class: np.ndarray) -> list[tuple[int, float, int]]:
    """[(class index, mean error, timesteps evaluated)] best first, each class by its best candidate."""
    seen: set[int] = set()
    out = []
    means = run.mean_errors
    for cand in run.ranking():
        cls = int(candidate_class[cand])
        if cls not in seen:
            seen.add(cls)
            out.append((cls, float(means[cand]), int(run.counts[cand])))
    return out
