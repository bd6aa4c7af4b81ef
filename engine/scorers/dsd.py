"""DSD matching (DESIGN §3, kernels/dsd.py): every (image, text) pair's attention score + λ · denoising bias over
fixed (t, ε), batched over (image, prompt, timestep) pairs through the engine's UNet."""

from __future__ import annotations

import numpy as np

from diffscore.engine.options import check_count, check_finite, check_labels, check_seed
from diffscore.engine.results import MatchOptions, MatchResult
from diffscore.engine.scorers import Pairs
from diffscore.errors import EngineError
from diffscore.kernels import add_noise, dsd_pair_scores, dsd_timesteps, pool_layer_scores, shared_noise


def match_dsd(engine, images, texts: list[str], *, steps: int | None = None, bias_weight: float | None = None,
              seed: int = 0, batch_size: int | None = None, progress: bool = False,
              preset: str | None = None) -> MatchResult:
    """DSD scores of every (image, text) pair (Engine.match's method "dsd", which describes the options)."""
    texts = check_labels(texts, what="texts")
    engine.check_prompts(texts, "texts")
    steps = check_count("steps", steps, optional=True)
    batch_size = check_count("batch_size", batch_size, optional=True)
    seed = check_seed(seed)
    spec = engine.dsd_preset(preset)
    bias_weight = spec.bias_weight if bias_weight is None else check_finite("bias_weight", bias_weight)
    try:
        ts = np.array(dsd_timesteps(steps or engine.defaults.dsd_steps, len(engine.alphas_cumprod),
                                    reverse=spec.reversed_timesteps))
    except ValueError as e:
        raise EngineError(str(e)) from None
    batch_size = batch_size or engine.default_batch_size()
    use_bias = bias_weight != 0.0
    prompts = texts + ([""] if use_bias or spec.pool_unconditional else [])
    emb = engine.text_conditioning(prompts)
    sample = tuple(engine.manifest.sample_shape)
    noise = shared_noise(seed, len(ts), sample)
    numel = int(np.prod(sample))
    K, P = len(ts), len(prompts)
    layer_weights = engine.layer_weights
    out = []
    for x0 in engine.encoded_windows(images, "match", progress):
        xt = np.concatenate([add_noise(x, noise, engine.alphas_cumprod, ts) for x in x0])
        w = len(x0)
        # pairs in (image, prompt, timestep) order
        img, prm, k = np.meshgrid(np.arange(w), np.arange(P), np.arange(K), indexing="ij")
        pairs = Pairs(xt, (img * K + k).ravel(), ts[k.ravel()].astype(np.float32), prm.ravel(), k.ravel())
        l2, scores = engine._run_pairs(pairs, emb, noise, "l2", batch_size)
        attn = pool_layer_scores(scores, layer_weights).reshape(w, P, K).astype(np.float64)
        norm = np.sqrt(l2.astype(np.float64) * numel).reshape(w, P, K)  # ||ε - ε̂||₂
        out.append(dsd_pair_scores(attn, norm, len(texts), spec, bias_weight))
    weights = None if layer_weights is None else tuple(float(v) for v in layer_weights)
    options = MatchOptions(tuple(int(t) for t in ts), float(bias_weight), seed, weights, engine.backend,
                           engine.precision)
    return MatchResult(np.concatenate(out), texts, options)
