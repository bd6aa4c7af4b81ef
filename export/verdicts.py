"""One pass/fail type for every check (parity tensors, parity decisions, the INT8 decision gate).

Polygraphy's shape: small factories, results that are truthy, one greppable line per verdict. The
bounds of DESIGN.md §4 are defined here once. numpy only: calibration uses it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# per-precision tolerance on every output's relative error. int8 is judged by decisions, not tensors;
# bf16 too: its bound only catches gross failures (random-weight tiny UNets reach 7e-2 on random inputs,
# the demo UNet 7e-3), the decision check is its gate
RTOL = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}
# a compiled variant that flips more than 1% of decisions fails
MIN_AGREEMENT = 0.99


@dataclass
class Verdict:
    """A tensor check (measured = max relative error, passes at ≤ bound) or a decision check
    (measured = top-1 agreement, passes at ≥ bound). bound None: reported, judged only on NaN/Inf."""

    name: str
    measured: float
    bound: float | None
    decisions: bool = False
    max_abs: float = 0.0  # tensors: max |got − want|
    nonfinite: int = 0  # tensors: NaN/Inf in the output under test
    images: int = 0  # decisions: how many images
    against: str = ""  # decisions: the reference, e.g. "torch fp32"
    source: str = ""  # decisions: what the images are, e.g. "held-out digits"

    @property
    def passed(self) -> bool:
        if self.decisions:
            return self.measured >= self.bound
        return self.nonfinite == 0 and (self.bound is None or self.measured <= self.bound)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def agreement(self) -> float:
        """Decisions: the top-1 agreement measured."""
        return self.measured

    @property
    def max_rel(self) -> float:
        """Tensors: max|got − want| / max|want|, the measured value."""
        return self.measured

    def __str__(self) -> str:
        status = "PASSED" if self.passed else "FAILED"
        if self.decisions:
            return (f"{status} | {self.name} decisions | top-1 agreement with {self.against} = {self.measured:.2%} on "
                    f"{self.images} {self.source} (≥ {self.bound:.0%})")
        bound = f"rtol={self.bound:g}" if self.bound is not None else "decisions only"
        return (f"{status} | {self.name} | max_abs={self.max_abs:.3g} max_rel={self.measured:.3g} "
                f"nonfinite={self.nonfinite} ({bound})")


def compare(name: str, got, want, rtol: float | None) -> Verdict:
    """Tensor verdict: relative error = max|got − want| / max|want| (elementwise ratios are meaningless
    where the reference is ~0)."""
    got, want = np.asarray(got), np.asarray(want)  # a MatchResult is its score matrix
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = max_abs / max(float(np.abs(want).max()), 1e-12) if diff.size else 0.0
    return Verdict(name, max_rel, rtol, max_abs=max_abs, nonfinite=int((~np.isfinite(got)).sum()))


def agreement(name: str, got: list, want: list, against: str, source: str,
              min_agreement: float = MIN_AGREEMENT) -> Verdict:
    """Decision verdict: the fraction of images whose top-1 label is the reference's."""
    if len(got) != len(want):
        raise ValueError(f"{name}: {len(got)} decisions against {len(want)} reference decisions")
    measured = float(np.mean([a == b for a, b in zip(got, want)])) if want else 1.0
    return Verdict(name, measured, min_agreement, decisions=True, images=len(want), against=against, source=source)
