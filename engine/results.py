"""What the scorers return: plain dataclasses, identical for the torch reference and the runtime."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Classification:
    label: str  # the predicted class
    ranking: list[tuple[str, float]]  # (class, mean denoising error of its best prompt), best first
    passes: int  # UNet evaluations used for this image
    evaluated: dict[str, int] = field(default_factory=dict)  # class -> timesteps its best prompt saw

    @property
    def scores(self) -> dict[str, float]:
        return dict(self.ranking)
