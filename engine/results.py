"""What the scorers return: plain dataclasses, identical for the torch reference and the runtime."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Classification:
    label: str  # the predicted class
    # best first: (class, mean denoising error of its best prompt) for the Diffusion Classifier,
    # (class, softmax probability) for a trained head
    ranking: list[tuple[str, float]]
    passes: int  # UNet evaluations used for this image (a head: one per noise step)
    evaluated: dict[str, int] = field(default_factory=dict)  # class -> timesteps its best prompt saw
    # Diffusion Classifier: the winner's lead over the best prompt of another class, in standard errors of their
    # paired error differences on the timesteps both saw (kernels.ranking.confidence); ~3 and above: more
    # timesteps would rarely flip the decision. inf with one class; None for a trained head.
    confidence: float | None = None

    @property
    def scores(self) -> dict[str, float]:
        return dict(self.ranking)


def classification(run, labels: list[str], candidate_class) -> Classification:
    """A finished StagedPruning or PairedRace run as a result: class ranking, passes, confidence."""
    from diffscore.kernels import class_ranking, confidence

    ranking = class_ranking(run, candidate_class)
    return Classification(label=labels[ranking[0][0]], ranking=[(labels[c], m) for c, m, _ in ranking],
                          passes=run.passes, evaluated={labels[c]: n for c, _, n in ranking},
                          confidence=confidence(run, candidate_class))
