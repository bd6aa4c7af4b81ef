"""From candidate (prompt) results to class results: a class scores as its best prompt."""

from __future__ import annotations

import numpy as np

from diffscore.kernels.pruning import StagedPruning
from diffscore.kernels.racing import PairedRace, decision_margin


def class_ranking(run: StagedPruning | PairedRace, candidate_class: np.ndarray) -> list[tuple[int, float, int]]:
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


def confidence(run: StagedPruning | PairedRace, candidate_class: np.ndarray) -> float:
    """The decision's confidence: the winning candidate's lead over the best candidate of another class, in
    standard errors of their paired error differences (decision_margin). Above ~3: more timesteps would
    rarely change the decision; inf with a single class."""
    order = run.ranking()
    rivals = [c for c in order if candidate_class[c] != candidate_class[order[0]]]
    return decision_margin(run.errors, run.counts, int(order[0]), int(rivals[0])) if rivals else float("inf")
