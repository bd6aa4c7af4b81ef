"""The cascade (strategy "cascade"): a one-pass scorer shortlists, the race decides among few.

A trained head or DiffDis scores every class in one or two UNet passes but is a point or two less accurate;
the race's first round alone costs classes × round_size passes. The cascade keeps the k best classes of the
cheap scorer (k fixed, or per image the fewest whose softmax mass reaches `mass`) and races only their
candidates, on the same shared (t, ε) grid as a plain race, so its errors equal the race's on those pairs.
With one class left there is nothing to race: the scorer's pick stands at no extra pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffscore.kernels.racing import PairedRace, RaceConfig, race_plan

SHORTLISTERS = ("head", "diffdis")
# A trained head's shortlist stops at the classes holding this much of its softmax probability (a confident head: one
# class, at head cost). DiffDis scores are not calibrated logits: with DiffDis the default is a fixed k.
HEAD_MASS = 0.99999


@dataclass(frozen=True)
class CascadeConfig:
    """k: shortlist size (with mass: the largest allowed); mass: confidence-based k, the fewest best classes whose
    softmax probability sums to at least `mass` (None or 1: always k); by: the shortlister, "head" or "diffdis".
    Defaults: k = 3, mass = HEAD_MASS, the cheapest (k, mass) with >= 99.5 % agreement with the exhaustive decision
    on the digits' validation slice (bench/cascade.py); the race stage keeps the race's own validated settings."""

    k: int = 3
    mass: float | None = "auto"  # HEAD_MASS with a head, None (k fixed) with DiffDis
    by: str = "head"

    def __post_init__(self):
        if self.mass == "auto":
            object.__setattr__(self, "mass", HEAD_MASS if self.by == "head" else None)
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"the shortlist size k must be an integer ≥ 1, got {self.k!r}")
        if self.mass is not None and not 0 < self.mass <= 1:
            raise ValueError(f"the shortlist mass must be in (0, 1], got {self.mass}")
        if self.by not in SHORTLISTERS:
            raise ValueError(f"unknown shortlister {self.by!r}; choose {' or '.join(SHORTLISTERS)}")


def softmax(scores: np.ndarray) -> np.ndarray:
    z = np.asarray(scores, dtype=np.float64)
    p = np.exp(z - z.max())
    return p / p.sum()


def shortlist(scores: np.ndarray, k: int, mass: float | None = None) -> np.ndarray:
    """Class indices best first (higher score = better; ties: lower index first): the k best, or with `mass`
    the fewest best whose softmax probability sums to ≥ mass, at most k (mass 1: all of it, so always k)."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    k = min(k, len(order))
    if mass is not None and mass < 1:
        reached = np.cumsum(softmax(scores)[order]) >= mass * (1 - 1e-12)  # float sums
        k = min(k, int(np.argmax(reached)) + 1 if reached.any() else len(order))
    return order[:k]


class ShortlistRace:
    """A PairedRace over the shortlisted classes' candidates, seen from outside with every candidate's index
    (the interface of PairedRace, so the engine's and the reference's drivers run it unchanged).

    class_order: all classes, the shortlister's best first; chosen: how many of them are raced;
    n_templates: candidates per class (candidate = class * n_templates + template, label-major)."""

    def __init__(self, class_order: np.ndarray, chosen: int, n_templates: int, grid: np.ndarray, order: np.ndarray,
                 config: RaceConfig = RaceConfig()):
        class_order = np.asarray(class_order, dtype=np.int64)
        self.n_candidates = len(class_order) * n_templates
        per_class = class_order[:, None] * n_templates + np.arange(n_templates)
        self.order_all = per_class.ravel()  # every candidate, the shortlister's order
        self.chosen = per_class[:chosen].ravel()  # the raced candidates
        self.timesteps = np.asarray(grid, dtype=np.int64)
        self.shortlist = class_order[:chosen]
        # one class left: decided without a race
        self.race = PairedRace(len(self.chosen), grid, order, config) if chosen > 1 else None

    def request(self) -> tuple[np.ndarray, np.ndarray] | None:
        req = None if self.race is None else self.race.request()
        return None if req is None else (self.chosen[req[0]], req[1])

    def submit(self, errors: np.ndarray) -> None:
        self.race.submit(errors)

    @property
    def done(self) -> bool:
        return self.race is None or self.race.done

    @property
    def passes(self) -> int:
        """UNet passes of the race (the shortlister's are counted by whoever ran it)."""
        return 0 if self.race is None else self.race.passes

    def _spread(self, values: np.ndarray, fill) -> np.ndarray:
        out = np.full((self.n_candidates, *values.shape[1:]), fill, dtype=values.dtype)
        out[self.chosen] = values
        return out

    @property
    def errors(self) -> np.ndarray:
        return self._spread(self.race.errors if self.race else np.zeros((len(self.chosen), len(self.timesteps))), 0.0)

    @property
    def counts(self) -> np.ndarray:
        return self._spread(self.race.counts if self.race else np.zeros(len(self.chosen), np.int64), 0)

    @property
    def mean_errors(self) -> np.ndarray:
        """Raced candidates' mean errors; inf for the rest (never scored by the denoising error)."""
        return self._spread(self.race.mean_errors if self.race else np.full(len(self.chosen), np.inf), np.inf)

    def ranking(self) -> np.ndarray:
        """The raced candidates in the race's order, then the others in the shortlister's order."""
        raced = self.chosen if self.race is None else self.chosen[self.race.ranking()]
        return np.concatenate([raced, self.order_all[len(self.chosen):]])

    @property
    def best(self) -> int:
        return int(self.ranking()[0])


def cascade_run(scores: np.ndarray, n_templates: int, num_train_timesteps: int, config: CascadeConfig,
                race: RaceConfig = RaceConfig(), grid_size: int | None = None, profile: list[int] | None = None):
    """One image's driver: shortlist on the shortlister's (classes,) scores, then a race over the shortlist."""
    chosen = len(shortlist(scores, config.k, config.mass))
    class_order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    grid, order = race_plan(num_train_timesteps, grid_size, profile)
    return ShortlistRace(class_order, chosen, n_templates, grid, order, race)


def cascade_config(strategy: str, by: str | None, k: int | None, mass: float | None) -> CascadeConfig | None:
    """The CascadeConfig of strategy "cascade" from the caller's options (None: CascadeConfig's default); None
    for the other strategies, which refuse the cascade's options."""
    given = {name: v for name, v in dict(by=by, k=k, mass=mass).items() if v is not None}
    if strategy != "cascade":
        if given:
            raise ValueError(f"{', '.join(given)} shape the cascade's shortlist; use them with strategy cascade")
        return None
    return CascadeConfig(**given)
