"""method "dc": the Diffusion Classifier (DESIGN §3) by fixed stages or the race, and the exhaustive grid errors
`diffscore profile` reads. Work is batched over (candidate × timestep) pairs across a window of images, so each
UNet call is full; x_t is computed once per (image, timestep) and shared by all candidates. The cascade
(engine/scorers/cascade.py) drives its race through `score_runs` too."""

from __future__ import annotations

import numpy as np

from diffscore.engine.options import check_labels, check_seed, check_templates
from diffscore.engine.results import classification
from diffscore.engine.scorers import Pairs
from diffscore.errors import EngineError
from diffscore.kernels import LOSSES, PairedRace, RaceConfig, add_noise, race_plan, shared_noise
from diffscore.kernels.racing import DEFAULT_GRID


def classify_dc(engine, images, options, batch_size: int | None, progress: bool):
    """Classifications by the resolved DcOptions: one StagedPruning/PairedRace per image."""
    if options.cascade is not None:
        from diffscore.engine.scorers.cascade import classify_cascade

        yield from classify_cascade(engine, images, options, batch_size, progress)
        return
    labels, templates = list(options.labels), list(options.templates)
    for run, candidate_class in score_runs(engine, images, labels, templates, options.runs(engine), options.loss,
                                           options.seed, batch_size, progress):
        yield classification(run, labels, candidate_class, options)


def grid_errors(engine, images, labels: list[str], *, templates: list[str] | None = None, timesteps: int | None = None,
                loss: str | None = None, seed: int = 0, batch_size: int | None = None,
                progress: bool = False) -> np.ndarray:
    """(images, candidates, grid) errors of every candidate at every timestep of the race's grid
    (`timesteps` points, default 100), with the race's (t, ε) pairs: the exhaustive decision is the
    lowest row mean. Candidates are labels × templates, label-major. What `diffscore profile` scores."""
    labels = check_labels(labels)
    templates = check_templates(None, templates, engine.defaults.template)
    loss = loss or engine.defaults.loss
    if loss not in LOSSES:
        raise EngineError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
    seed = check_seed(seed)
    try:
        grid, _ = race_plan(len(engine.alphas_cumprod), timesteps or DEFAULT_GRID)
    except ValueError as e:
        raise EngineError(str(e)) from None
    every = RaceConfig(z=float("inf"), round_size=len(grid))  # one round of everything, nobody leaves
    make = lambda n: PairedRace(n, grid, np.arange(len(grid)), every)  # noqa: E731
    runs = [run for run, _ in score_runs(engine, images, labels, templates, make, loss, seed, batch_size, progress)]
    return np.stack([run.errors for run in runs])



def score_runs(engine, images, labels, templates, make_run, loss, seed, batch_size, progress):
    """Yields (finished run, candidate classes) per image, in order: one StagedPruning/PairedRace per
    image, IMAGE_WINDOW images read, encoded and driven to the end together (full UNet batches,
    bounded memory)."""
    batch_size = batch_size or engine.default_batch_size()
    prompts = [t.format(label) for label in labels for t in templates]
    engine.check_prompts(prompts, "prompts")
    candidate_class = np.repeat(np.arange(len(labels)), len(templates))
    emb = engine.text_conditioning(prompts)
    noise = ts = None
    for x0 in engine.encoded_windows(images, "classify", progress):
        runs = [make_run(len(prompts)) for _ in x0]
        if noise is None:
            ts = runs[0].timesteps
            noise = shared_noise(seed, len(ts), tuple(x0.shape[1:]))
        window = list(range(len(x0)))
        while jobs := [(i, *req) for i in window if (req := runs[i].request()) is not None]:
            pairs = classify_pairs(engine, x0, jobs, noise, ts)
            errors, _ = engine._run_pairs(pairs, emb, noise, loss, batch_size, scores_read=False)
            done = 0
            for i, cand, pos in jobs:
                size = len(cand) * len(pos)
                runs[i].submit(errors[done : done + size].reshape(len(cand), len(pos)))
                done += size
        for run in runs:
            yield run, candidate_class



def classify_pairs(engine, x0, jobs, noise, ts) -> Pairs:
    """Pairs in (candidate, timestep) order per job; x_t once per (image, timestep)."""
    blocks, xt_row, emb_row, eps_row = [], [], [], []
    offset = 0
    for i, cand, pos in jobs:
        blocks.append(add_noise(x0[i], noise[pos], engine.alphas_cumprod, ts[pos]))
        xt_row.append(offset + np.tile(np.arange(len(pos)), len(cand)))
        emb_row.append(np.repeat(cand, len(pos)))
        eps_row.append(np.tile(pos, len(cand)))
        offset += len(pos)
    eps_row = np.concatenate(eps_row)
    return Pairs(np.concatenate(blocks), np.concatenate(xt_row), ts[eps_row].astype(np.float32),
                  np.concatenate(emb_row), eps_row)

