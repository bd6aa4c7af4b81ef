"""ε̂ from the UNet output, whatever the model was trained to predict (DESIGN.md §3).

Every denoising error and bias is measured on ε̂: a v-prediction model's raw output is v, and
MSE(ε, v) is not a denoising error. With a = sqrt(ā_t), s = sqrt(1 − ā_t):
epsilon → ε̂ = out; v_prediction → ε̂ = a·out + s·x_t; sample → ε̂ = (x_t − a·out) / s.
"""

from __future__ import annotations

import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def epsilon_from_output(out: np.ndarray, x_t: np.ndarray, abar_t, prediction_type: str = "epsilon") -> np.ndarray:
    """(B, ...) ε̂ for a UNet output `out` at samples `x_t` whose timesteps have ā_t = `abar_t` (B,)."""
    if prediction_type == "epsilon":
        return out
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    abar = np.asarray(abar_t, dtype=np.float64).reshape(-1, *([1] * (out.ndim - 1)))
    a, s = np.sqrt(abar), np.sqrt(1.0 - abar)
    eps = a * out + s * x_t if prediction_type == "v_prediction" else (x_t - a * out) / s
    return eps.astype(np.float32)
