"""What the scorers return: plain dataclasses, identical for the torch reference and the runtime.

Each result carries the options that produced it, so a saved result says how it was made."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Classification:
    label: str  # the predicted class
    # best first: (class, mean denoising error of its best prompt) for the Diffusion Classifier,
    # (class, softmax probability) for a trained head
    ranking: list[tuple[str, float]]
    passes: int  # UNet evaluations used for this image (a head: one per noise step)
    # class -> timesteps its best prompt's mean is over: after pruning, classes are ranked first by how
    # far they got, then by mean error, so means over different counts are not compared directly
    evaluated: dict[str, int] = field(default_factory=dict)
    options: object = None  # the resolved DcOptions | HeadOptions | DiffDisOptions it ran with
    # Diffusion Classifier: the winner's lead over the best prompt of another class, in standard errors of their
    # paired error differences on the timesteps both saw (kernels.ranking.confidence); ~3 and above: more
    # timesteps would rarely flip the decision. A trained head: the winner's logit lead over the runner-up,
    # log(p_winner / p_runner_up). inf with one class.
    confidence: float | None = None
    image: str | None = None  # the image's path, when it was given as a path (not as pixels)
    # strategy "cascade": the first stage (kernels/cascade.py): shortlister, shortlist, its scores and softmax
    # mass, passes of each stage; None otherwise
    cascade: dict | None = None

    @property
    def scores(self) -> dict[str, float]:
        return dict(self.ranking)

    def to_dict(self) -> dict:
        """JSON-ready: label, ranking as [class, score, timesteps evaluated], passes, confidence (None when
        infinite: one class), options."""
        finite = self.confidence is not None and math.isfinite(self.confidence)
        return {**({"image": self.image} if self.image is not None else {}), "label": self.label,
                "passes": self.passes, "confidence": self.confidence if finite else None,
                "ranking": [[c, float(s), self.evaluated.get(c)] if self.evaluated else [c, float(s)]
                            for c, s in self.ranking],
                "options": self.options.to_dict() if self.options else None,
                **({"cascade": self.cascade} if self.cascade is not None else {})}


MATCH_METHODS = ("dsd", "diffdis", "itc")  # Engine.match's methods


@dataclass(frozen=True)
class MatchOptions:
    timesteps: tuple[int, ...]  # the DSD timesteps every pair was scored at
    bias_weight: float  # λ of the denoising bias
    seed: int
    layer_weights: tuple[float, ...] | None = None  # learned per-layer score weights; None = plain mean
    backend: str = ""
    precision: str = ""
    method: str = "dsd"  # dsd | diffdis-denoise | diffdis-generate | itc (a `diffscore finetune` run's embeddings)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MatchResult:
    """DSD scores of every (image, text) pair: higher = better match. Behaves as the (images, texts)
    array where one is expected (``np.asarray(result)``, ``result[i, j]``, ``result.shape``)."""

    scores: np.ndarray  # (images, texts) float64
    texts: list[str]
    options: MatchOptions

    def __array__(self, dtype=None, copy=None):
        return self.scores if dtype is None else self.scores.astype(dtype)

    def __getitem__(self, index):
        return self.scores[index]

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.scores.shape

    def best(self) -> list[str]:
        """The best-matching text of each image."""
        return [self.texts[j] for j in self.scores.argmax(axis=1)]


def named_images(images):
    """(the same images as an iterable, a deque that receives each one's path (None for pixels) as it is read):
    results come in input order, so the reader pops a name per result."""
    from collections import deque
    from pathlib import Path

    if isinstance(images, (str, Path)) or not hasattr(images, "__iter__") or hasattr(images, "shape"):
        images = [images]  # one image given alone
    names = deque()

    def reading():
        for image in images:
            names.append(str(image) if isinstance(image, (str, Path)) else None)
            yield image

    return reading(), names


def ranked(labels, scores, passes: int, options=None, confidence: float | None = None) -> Classification:
    """A Classification from one image's scores (higher = better) over `labels`: ranking best first, ties to
    the earlier label."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    return Classification(label=labels[order[0]], ranking=[(labels[c], float(scores[c])) for c in order],
                          passes=passes, options=options, confidence=confidence)


def classification(run, labels: list[str], candidate_class, options=None) -> Classification:
    """A finished StagedPruning or PairedRace run as a result: class ranking, passes, confidence."""
    from diffscore.kernels import class_ranking, confidence

    ranking = class_ranking(run, candidate_class)
    return Classification(label=labels[ranking[0][0]], ranking=[(labels[c], m) for c, m, _ in ranking],
                          passes=run.passes, evaluated={labels[c]: n for c, _, n in ranking},
                          confidence=confidence(run, candidate_class), options=options)
