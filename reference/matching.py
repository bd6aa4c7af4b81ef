"""DSD image-text matching in torch: the reference for `Engine.match` (DESIGN.md §3).

Per pair (image, text), conditional pass only (the discffusion preset averages in the empty prompt's): attention score \
a_k = mean over selected layers of
logsumexp_tokens(scale·QKᵀ) averaged over heads and pixels; optional denoising bias
b_k = ||ε − ε̂(∅)||₂ − ||ε − ε̂(text)||₂; score = mean_k (a_k + λ b_k). Higher = better match.
With learned per-layer score weights (prompt learning), a_k is their weighted sum instead of the mean.
"""

from __future__ import annotations

import numpy as np
import torch

from diffscore.engine.images import preprocess_batch
from diffscore.kernels import DEFAULT_DSD_PRESET, dsd_preset, dsd_timesteps, shared_noise
from diffscore.reference.loading import Components, add_noise, encode_conditioning, encode_images, epsilon_hat, take
from diffscore.reference.scoring_unet import ScoringUNet


def pool_layers(scores: torch.Tensor, layer_weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B, layers) -> (B,): the layers' mean, or their weighted sum (torch twin of kernels.pool_layer_scores)."""
    return scores.mean(dim=1) if layer_weights is None else scores @ layer_weights


@torch.no_grad()
def match_reference(comp: Components, scoring_unet: ScoringUNet, images, texts: list[str], steps: int | None = None,
                    bias_weight: float | None = None, seed: int = 0, layer_weights: dict[str, float] | None = None,
                    preset: str | None = None) -> np.ndarray:
    """(images, texts) scores, one image-text pair at a time over its K timesteps.

    `preset` (kernels.dsd; default DEFAULT_DSD_PRESET, as export's) sets the timesteps, the default λ and whether the \
empty prompt's attention score is
    averaged in; the layers are `scoring_unet`'s (reference.scoring_unet.preset_attention_layers)."""
    spec = dsd_preset(preset or DEFAULT_DSD_PRESET)
    bias_weight = spec.bias_weight if bias_weight is None else bias_weight
    ts = torch.tensor(dsd_timesteps(steps or spec.steps, comp.num_train_timesteps, reverse=spec.reversed_timesteps))
    pixels = preprocess_batch(images, comp.image_size, comp.image_channels)
    x0s = encode_images(comp, torch.from_numpy(pixels))
    noise = torch.from_numpy(shared_noise(seed, len(ts), tuple(x0s.shape[1:])))
    cond = encode_conditioning(comp, list(texts) + [""])
    K = len(ts)
    w = None if not layer_weights else torch.tensor([layer_weights[n] for n in scoring_unet.attention_layers])
    scores = np.zeros((len(x0s), len(texts)))
    for i, x0 in enumerate(x0s):
        x_t = add_noise(x0, noise, comp.alphas_cumprod, ts)  # (K, C, H, W)
        def run(j):
            out, attn, *_ = scoring_unet(x_t, ts.float(), **take(cond, [j] * K))
            eps_hat = epsilon_hat(comp, out, x_t, ts)
            return pool_layers(attn, w).double(), (noise - eps_hat).flatten(1).double().norm(dim=1)
        null_attn, null_norm = run(len(texts))
        for j in range(len(texts)):
            attn, norm = run(j)
            if spec.pool_unconditional:  # Discffusion: the score is a mean over its [∅, text] batch
                attn = (null_attn + attn) / 2
            scores[i, j] = float((attn + bias_weight * (null_norm - norm)).mean())
    return scores
