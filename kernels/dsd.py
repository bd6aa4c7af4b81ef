"""DSD scoring presets (DESIGN.md §3): diffscore's own choices and the seed's (Discffusion) side by side.

Both score a pair (image, text) as mean_k (a_k + λ·b_k) over timesteps t_k with a fixed ε_k per k, where
b_k = ||ε − ε̂(∅)||₂ − ||ε − ε̂(text)||₂. They differ in four ways (eric-ai-lab/Discffusion,
pipeline_dsd.py and unet_2d_condition.py):

| | diffscore | discffusion |
|---|---|---|
| a_k | the conditional pass's attention score | the mean of the unconditional (empty prompt) and conditional passes' \
(its batch is [∅, text] and the score a mean over the batch) |
| λ | 0 (bias off) | 1 (bias on) |
| t_k | range(10, 990, T//S) | T − 1 − idx for idx in range(10, 990, T//S) |
| layers | the last cross-attention layer of every block with one | per down/mid/up section: the last block with \
cross-attention, every one of its attentions, the last transformer block of each |
| S (default timesteps per pair) | 10 | 30 (dsd_infer.py's --sampling_time_steps); 10 stays a speed option: \
`--timesteps 10` |

Prompt learning (reference.prompt_learning) follows the preset's score (attention only, or attention +
bias with the empty prompt averaged in) and, for discffusion (dsd_train.py), also draws a new t and ε
per (image, caption) pair (diffscore: one t per step, one fixed ε per image) and clips the gradient
norm at 1.0 (diffscore: no clipping).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DsdPreset:
    name: str
    pool_unconditional: bool  # a_k = ½ (a_k(∅) + a_k(text)) instead of a_k(text)
    bias_weight: float  # default λ
    reversed_timesteps: bool  # t = T − 1 − idx instead of t = idx
    layers: str  # "last-per-block" | "last-block-per-section" (reference.scoring_unet.preset_attention_layers)
    noise_per_pair: bool  # prompt learning: a new (t, ε) per (image, caption) pair, not per step / per image
    clip_grad_norm: float | None  # prompt learning: gradient-norm clipping
    steps: int = 10  # default timesteps per pair (an export records it as the engine's defaults.dsd_steps)


DSD_PRESETS = {
    "diffscore": DsdPreset("diffscore", False, 0.0, False, "last-per-block", False, None),
    "discffusion": DsdPreset("discffusion", True, 1.0, True, "last-block-per-section", True, 1.0, steps=30),
}

# export's and prompt learning's default: chosen on bench/match.py's validation slice (200 training-split digits),
# where the presets' own defaults score diffscore 10.00% and discffusion 97.50% R@1 (99.50% at 10 timesteps)
DEFAULT_DSD_PRESET = "discffusion"


def dsd_preset(name: str) -> DsdPreset:
    if name not in DSD_PRESETS:
        raise ValueError(f"unknown DSD preset {name!r}; choose from {', '.join(DSD_PRESETS)}")
    return DSD_PRESETS[name]


def dsd_pair_scores(attn: np.ndarray, norms: np.ndarray | None, n_texts: int, preset: DsdPreset,
                    bias_weight: float) -> np.ndarray:
    """(..., texts) scores from per-prompt attention scores attn (..., P, K) and ||ε − ε̂||₂ norms (..., P, K),
    where the last prompt (P = texts + 1) is the empty one whenever the preset or λ needs it."""
    a = attn[..., :n_texts, :]
    if preset.pool_unconditional:
        a = 0.5 * (a + attn[..., -1:, :])
    if bias_weight:
        a = a + bias_weight * (norms[..., -1:, :] - norms[..., :n_texts, :])
    return a.mean(axis=-1)
