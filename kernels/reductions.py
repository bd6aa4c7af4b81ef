"""Batched reductions: one denoising error per (candidate, timestep) pair, one DSD score per pair."""

from __future__ import annotations

import numpy as np

LOSSES = ("l2", "l1", "huber")


def denoising_error(eps: np.ndarray, eps_hat: np.ndarray, loss: str = "l2") -> np.ndarray:
    """Mean over all non-batch axes of loss(ε, ε̂); (B, ...) -> (B,) float32.

    huber uses δ = 1 (torch's ``huber_loss`` default, as in the Diffusion Classifier code).
    """
    d = (eps_hat.astype(np.float32) - eps.astype(np.float32)).reshape(len(eps_hat), -1)
    if loss == "l2":
        e = d * d
    elif loss == "l1":
        e = np.abs(d)
    elif loss == "huber":
        a = np.abs(d)
        e = np.where(a <= 1.0, 0.5 * d * d, a - 0.5)
    else:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    return e.mean(axis=1, dtype=np.float64).astype(np.float32)


def pool_layer_scores(scores: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """DSD attention score from per-layer scores (..., layers): their mean, or the convex per-layer
    weights prompt learning may train (they sum to 1, so uniform weights give the mean)."""
    return scores.mean(axis=-1) if weights is None else scores @ np.asarray(weights, dtype=scores.dtype)
