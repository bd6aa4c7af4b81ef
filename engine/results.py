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

    @property
    def scores(self) -> dict[str, float]:
        return dict(self.ranking)
