"""strategy="cascade" in the runtime: the shortlister's one pass over every image, then the race among each
image's shortlist (kernels/cascade.py has the method). The race runs through the engine's own batched driver
(engine/scorers/dc.py `score_runs`), so its (t, ε) pairs and errors are the plain race's."""

from __future__ import annotations

import numpy as np

from diffscore.engine.images import IMAGE_WINDOW, image_windows
from diffscore.engine.results import classification
from diffscore.engine.scorers.dc import score_runs
from diffscore.errors import EngineError
from diffscore.kernels.cascade import CascadeConfig, cascade_run, softmax


def shortlister_scores(engine, images, labels: list[str], options, batch_size: int | None, progress: bool):
    """((images, labels) scores, higher = better, columns in `labels` order; UNet passes per image; name), by the
    resolved DcOptions' shortlister."""
    if options.shortlist == "diffdis":
        from diffscore.engine.scorers.diffdis import diffdis_scores

        scores, used = diffdis_scores(engine, images, [options.templates[0].format(x) for x in labels],
                                      mode=options.diffdis_mode, seed=options.seed, batch_size=batch_size,
                                      progress=progress)
        return scores, 1, f"diffdis-{used['mode']}"
    name = options.head
    spec = engine.manifest.heads[name]
    if set(spec.labels) != set(labels):
        raise EngineError(f"head {name} was trained on the labels {spec.labels}, not {labels}; a head shortlists its "
                          "own labels: pass those")
    logits = engine.head_logits(images, name, batch_size=batch_size, progress=progress).astype(np.float64)
    return logits[:, [spec.labels.index(x) for x in labels]], len(spec.steps) * spec.passes_per_step, f"head {name}"


def cascade_record(run, labels: list[str], scores: np.ndarray, passes: int, by: str, config: CascadeConfig) -> dict:
    """What the result keeps of the first stage: shortlist, its scores and probability, passes of each stage."""
    p = softmax(scores)
    return {"by": by, "k": config.k, "mass": config.mass, "shortlist": [labels[c] for c in run.shortlist],
            "shortlist_scores": [float(scores[c]) for c in run.shortlist],
            "shortlist_confidence": float(p[run.shortlist].sum()), "top_probability": float(p.max()),
            "shortlist_passes": passes, "race_passes": run.passes}


def classify_cascade(engine, images, options, batch_size: int | None, progress: bool):
    """Classifications of `images` (materialised: the shortlister sees them all first) by the cascade of the
    resolved DcOptions."""
    images = [im for window in image_windows(images, IMAGE_WINDOW) for im in window]  # one image alone, too
    if not images:
        raise EngineError("no images given")
    labels, templates, config = list(options.labels), list(options.templates), options.cascade
    scores, passes, by = shortlister_scores(engine, images, labels, options, batch_size, progress)
    profile = engine.manifest.timestep_profile if options.use_profile else None
    T = len(engine.alphas_cumprod)
    rows = iter(scores)
    make = lambda n: cascade_run(next(rows), len(templates), T, config, options.race,  # noqa: E731
                                 options.timesteps, profile)
    for row, (run, candidate_class) in zip(scores, score_runs(engine, images, labels, templates, make, options.loss,
                                                                     options.seed, batch_size, progress)):
        yield cascade_result(run, labels, candidate_class, row, passes, by, config, options)


def cascade_result(run, labels, candidate_class, scores, passes: int, by: str, config: CascadeConfig, options=None):
    """A finished ShortlistRace as a Classification: passes of both stages, the race's confidence (None when one
    class was left and nothing was raced), the first stage in `cascade`."""
    result = classification(run, labels, candidate_class, options)
    result.passes = passes + run.passes
    result.confidence = None if run.race is None else result.confidence
    result.cascade = cascade_record(run, labels, scores, passes, by, config)
    return result
