"""Labels without people: the engine's Diffusion Classifier labels unlabelled images once, its confident
decisions become a head's training labels (`train-head --pseudo-label ENGINE`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffscore.engine.manifest import HeadTraining
from diffscore.errors import EngineError


@dataclass
class PseudoLabels:
    images: list  # the kept images, in input order
    labels: np.ndarray  # their label indices (into the labels given)
    confidence: np.ndarray  # every offered image's decision confidence (inf: one class)
    decided: np.ndarray  # every offered image's label index
    passes: np.ndarray  # UNet passes each decision took
    kept: np.ndarray  # indices of the kept images among those offered
    record: HeadTraining


def pseudo_label(engine_dir: str | Path, images: list, labels: list[str], threshold: float = 1.0,
                 backend: str = "auto", progress: bool = False, **classify_options) -> PseudoLabels:
    """Classify `images` with the engine's Diffusion Classifier (classify_options: template, strategy, stages,
    z, budget, seed ...: any of Engine.classify's) and keep the decisions with confidence ≥ threshold."""
    import diffscore

    if not math.isfinite(threshold) or threshold < 0:
        raise EngineError(f"--min-confidence must be a finite number ≥ 0 (standard errors), got {threshold}")
    if not images:
        raise EngineError("no unlabelled images given")
    with diffscore.load(engine_dir, backend=backend) as engine:
        results = engine.classify(images, labels, progress=progress, **classify_options)
    decided = np.array([labels.index(r.label) for r in results])
    confidence = np.array([r.confidence for r in results], dtype=np.float64)
    kept = np.flatnonzero(confidence >= threshold)  # at least `threshold` standard errors ahead of the best rival
    if not len(kept):
        raise EngineError(f"none of the {len(images)} decisions reached confidence {threshold} (highest "
                          f"{np.max(confidence):.2f}); lower --min-confidence")
    options = results[0].options
    record = HeadTraining(source="pseudo-labels", images=len(kept), engine=str(engine_dir), strategy=options.strategy,
                          template=options.templates[0] if len(options.templates) == 1
                          else " | ".join(options.templates), threshold=float(threshold), candidates=len(images))
    passes = np.array([r.passes for r in results])
    return PseudoLabels([images[i] for i in kept], decided[kept], confidence, decided, passes, kept, record)
