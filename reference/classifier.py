"""The Diffusion Classifier in torch: the truth the compiled runtime is checked against.

Algorithm (DESIGN.md §3): shared seeded noise per timestep, staged timestep grid, staged pruning,
error = mean over C,H,W of loss(ε, ε̂). The pruning driver and the noise come from kernels/ (numpy),
the ε-prediction, noising and error reduction are torch, so the runtime's numpy versions are
checked independently.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from diffscore.engine.images import preprocess_batch
from diffscore.engine.scorers.cascade import cascade_result
from diffscore.engine.results import Classification, classification
from diffscore.kernels import RaceConfig, new_run, shared_noise
from diffscore.kernels.cascade import CascadeConfig, cascade_run
from diffscore.reference.loading import (Components, add_noise, encode_conditioning, encode_images, epsilon_hat, take,
                                         unet_output)


def torch_error(eps: torch.Tensor, eps_hat: torch.Tensor, loss: str) -> torch.Tensor:
    """(B,) mean over C,H,W of the chosen loss."""
    fn = {"l2": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss}.get(loss)
    if fn is None:
        raise ValueError(f"loss must be one of l2, l1, huber, got {loss!r}")
    return fn(eps_hat.float(), eps.float(), reduction="none").flatten(1).mean(1)


@torch.no_grad()
def classify_reference(
    components: Components,
    images,
    labels: list[str],
    templates: list[str] = ("{}",),
    stages: list[tuple[int, int]] = ((50, 5), (500, 1)),
    loss: str = "l2",
    seed: int = 0,
    batch_size: int = 256,
    progress=None,
    strategy: str = "stages",
    race: RaceConfig = RaceConfig(),
    timesteps: int | None = None,
    profile: list[int] | None = None,
    shortlist_scores: np.ndarray | None = None,
    shortlist_passes: int = 0,
    cascade: CascadeConfig = CascadeConfig(),
) -> list[Classification]:
    """Classify images among `labels`; each (label, template) prompt is one candidate.

    strategy "stages": fixed `stages`; "race": the paired race (`race`, over a `timesteps` grid or `profile`);
    "cascade": the race among each image's shortlist (`cascade`) of its row of `shortlist_scores` (images, labels),
    higher = better, from a shortlister that cost `shortlist_passes` UNet passes per image (e.g.
    reference.heads.head_logits_reference)."""
    prompts = [tmpl.format(label) for label in labels for tmpl in templates]
    candidate_class = np.repeat(np.arange(len(labels)), len(templates))
    conditioning = encode_conditioning(components, prompts)  # (P, L, D) states (+ SDXL's), once per label set
    pixels = preprocess_batch(images, components.image_size, components.image_channels)
    x0s = encode_images(components, torch.from_numpy(pixels))
    abar = components.alphas_cumprod
    results = []
    for x0 in x0s:
        if strategy == "cascade":
            run = cascade_run(shortlist_scores[len(results)], len(templates), components.num_train_timesteps, cascade,
                              race, timesteps, profile)
        else:
            run = new_run(strategy, len(prompts), components.num_train_timesteps, stages=stages, race=race,
                          grid_size=timesteps, profile=profile)
        eps = torch.from_numpy(shared_noise(seed, len(run.timesteps), tuple(x0.shape)))
        t_all = torch.from_numpy(run.timesteps)
        while (req := run.request()) is not None:
            cand, pos = req
            x_t = add_noise(x0, eps[pos], abar, t_all[pos])  # (K, C, H, W): once per timestep, shared by candidates
            # pairs in (candidate, timestep) order
            ci = torch.from_numpy(np.repeat(cand, len(pos)))
            ki = torch.arange(len(pos)).repeat(len(cand))
            errors = torch.empty(len(ci))
            for lo in range(0, len(ci), batch_size):
                c, k = ci[lo : lo + batch_size], ki[lo : lo + batch_size]
                out = unet_output(components, x_t[k], t_all[pos][k], take(conditioning, c))
                eps_hat = epsilon_hat(components, out, x_t[k], t_all[pos][k])
                errors[lo : lo + batch_size] = torch_error(eps[pos][k], eps_hat, loss)
            run.submit(errors.view(len(cand), len(pos)).double().numpy())
        results.append(classification(run, labels, candidate_class) if strategy != "cascade" else
                       cascade_result(run, labels, candidate_class, shortlist_scores[len(results)], shortlist_passes,
                                      cascade.by, cascade))
        if progress is not None:
            progress(1)
    return results
