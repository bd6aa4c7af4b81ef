"""The torch reference Diffusion Classifier against a deliberately naive loop (same ε, same t)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffscore.reference.classifier import classify_reference
from diffscore.reference.loading import load_components

LABELS = ["cat", "dog", "bird", "car"]


def naive_classifier(comp, image_pixels, prompts, stages, loss, seed):
    """Plain loops over classes and timesteps straight from DESIGN.md §3, no batching, no shared code."""
    T = comp.num_train_timesteps
    m = max(n for n, _ in stages)
    grid = list(range(T // m // 2, T, T // m))[:m]
    order, per_stage = [], []
    for n, _ in stages:
        new = [t for t in grid[len(grid) // n // 2 :: len(grid) // n][:n] if t not in order]
        order += new
        per_stage.append(new)
    x0 = (image_pixels if comp.vae is None
          else comp.vae.encode(image_pixels[None]).latent_dist.mean[0] * comp.vae.config.scaling_factor)
    g = np.random.default_rng(seed)
    noise = torch.from_numpy(g.standard_normal((len(order), *x0.shape), dtype=np.float32))
    abar = comp.scheduler.alphas_cumprod.double()
    ids = comp.tokenizer(prompts, padding="max_length", max_length=comp.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    emb = comp.text_encoder(ids)[0]
    errors = {c: [] for c in range(len(prompts))}
    alive = list(range(len(prompts)))
    passes = 0
    for (n, keep), ts in zip(stages, per_stage):
        for c in alive:
            for t in ts:
                eps = noise[order.index(t)]
                xt = abar[t].sqrt().float() * x0 + (1 - abar[t]).sqrt().float() * eps
                pred = comp.unet(xt[None], torch.tensor([t]), encoder_hidden_states=emb[c : c + 1]).sample[0]
                d = pred - eps
                e = {"l2": d**2, "l1": d.abs(), "huber": F.huber_loss(pred, eps, reduction="none")}[loss].mean()
                errors[c].append(float(e))
                passes += 1
        alive = sorted(alive, key=lambda c: (np.mean(errors[c]), c))[:keep]
    return {prompts[c]: np.mean(v) for c, v in errors.items()}, prompts[alive[0]], passes


@pytest.mark.parametrize("kind,loss", [("pixel", "l2"), ("sd1", "l1"), ("sd2", "huber")])
@torch.no_grad()
def test_reference_equals_naive_loop(tiny_models, kind, loss):
    comp = load_components(tiny_models[kind])
    rng = np.random.default_rng(1)
    ch, size = comp.image_channels, comp.image_size
    image = rng.integers(0, 256, (size, size, ch) if ch == 3 else (size, size), dtype=np.uint8)
    stages = [(4, 2), (8, 1)]
    result = classify_reference(comp, [image], LABELS, stages=stages, loss=loss, seed=5, batch_size=7)[0]
    pixels = torch.from_numpy(image.astype(np.float32) / 127.5 - 1)
    pixels = pixels[None] if ch == 1 else pixels.permute(2, 0, 1)
    scores, best, passes = naive_classifier(comp, pixels, LABELS, stages, loss, seed=5)
    assert result.label == best
    assert result.passes == passes == 4 * 4 + 2 * 4
    for label, score in result.ranking:
        assert score == pytest.approx(scores[label], rel=1e-5)


@torch.no_grad()
def test_same_seed_same_scores_other_seed_differs(tiny_models):
    comp = load_components(tiny_models["pixel"])
    image = np.random.default_rng(2).integers(0, 256, (8, 8), dtype=np.uint8)
    run = lambda seed: classify_reference(comp, image, LABELS, stages=[(5, 1)], seed=seed)[0].scores
    assert run(0) == run(0)
    assert run(0) != run(1)


@torch.no_grad()
def test_multiple_templates_score_a_class_by_its_best_prompt(tiny_models):
    comp = load_components(tiny_models["pixel"])
    image = np.random.default_rng(3).integers(0, 256, (8, 8), dtype=np.uint8)
    templates = ["a photo of a {}", "{}"]
    res = classify_reference(comp, image, LABELS, templates=templates, stages=[(4, 8)], seed=0)[0]
    single = {t: classify_reference(comp, image, LABELS, templates=[t], stages=[(4, 4)], seed=0)[0].scores
              for t in templates}
    for label, score in res.ranking:
        assert score == pytest.approx(min(single[t][label] for t in templates), rel=1e-6)
