"""Seeded shared noise and forward noising.

One ε per evaluated timestep, drawn from a seeded numpy generator and shared by every candidate of
an image: the shared noise is what makes comparing candidates fair. Both the torch reference and
the runtime draw it here, so the two paths see bit-identical ε.
"""

from __future__ import annotations

import numpy as np


def shared_noise(seed: int, n: int, sample_shape: tuple[int, ...]) -> np.ndarray:
    """(n, *sample_shape) float32 standard normal noise; row k goes with the k-th evaluated timestep."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *sample_shape), dtype=np.float32)


def add_noise(x0: np.ndarray, eps: np.ndarray, alphas_cumprod: np.ndarray, timesteps) -> np.ndarray:
    """x_t = sqrt(ā_t) x0 + sqrt(1 - ā_t) ε, for one x0 (C,H,W) and a stack of ε (K,C,H,W)."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)[np.asarray(timesteps)]
    a = np.sqrt(abar).astype(np.float32).reshape(-1, *([1] * x0.ndim))  # (K, 1, 1, 1)
    s = np.sqrt(1.0 - abar).astype(np.float32).reshape(-1, *([1] * x0.ndim))
    return a * x0[None] + s * eps
