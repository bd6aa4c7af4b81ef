"""Adaptive racing (DESIGN.md §3): the Diffusion Classifier's decision for a fraction of the UNet passes.

Every candidate of an image is scored on the same (t, ε) pairs, so the *paired* difference between two
candidates' errors varies far less than either error. The race visits the grid's timesteps a round at a
time; after each round a candidate leaves once its mean paired difference to the current leader exceeds
``z`` standard errors. The image stops at one survivor, at the end of the grid or at its pass budget; the
lowest mean error wins.

Like StagedPruning, the driver only says what to evaluate next and who survives; the caller supplies the
errors, so the torch reference and every runtime backend share it and the runtime batches many images.
ε goes with the grid *position* (row j of the shared noise for grid point j), whatever the visiting order,
so a race in any order, and the exhaustive decision, see the same (t, ε) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffscore.kernels.timesteps import timestep_grid

DEFAULT_GRID = 100  # timesteps in the race's grid when the engine has no profile
STRATEGIES = ("stages", "race", "cascade")  # cascade: kernels/cascade.py
DEFAULT_STRATEGY = "race"  # every engine races until told otherwise (bench/default_race.py)


@dataclass(frozen=True)
class RaceConfig:
    """z: standard errors of paired difference that drop a candidate; min_rounds: rounds before the first
    drop; round_size: timesteps per round; budget: UNet passes per image at most (None: the whole grid)."""

    # every engine's race unless told otherwise: on an engine exported with no options (template "{}", spread
    # order), the cheapest setting that kept 100 % agreement with the exhaustive decision on the demo's validation
    # digits (bench/default_race.py); more cautious settings cost 1.4x (z 1.5) to 4.5x (z 3) the passes there
    z: float = 1.0
    min_rounds: int = 1
    round_size: int = 5
    budget: int | None = None

    def __post_init__(self):
        if not self.z > 0:
            raise ValueError(f"z must be > 0, got {self.z}")
        if self.min_rounds < 1 or self.round_size < 1:
            raise ValueError(f"min_rounds and round_size must be ≥ 1, got {self.min_rounds} and {self.round_size}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"the pass budget must be ≥ 1, got {self.budget}")


def spread_order(m: int) -> np.ndarray:
    """A low-discrepancy visiting order of grid positions 0..m-1 (van der Corput, base 2): every prefix
    spreads over the whole grid, so the first rounds already see low, middle and high noise."""
    bits = max(1, int(np.ceil(np.log2(m))))
    seen, order = set(), []
    for i in range(2**bits):
        rev = int(format(i, f"0{bits}b")[::-1], 2)  # bit-reversed i: the van der Corput point rev / 2**bits
        j = int((rev + 0.5) * m / 2**bits)
        if j not in seen:
            seen.add(j)
            order.append(j)
    order += [j for j in range(m) if j not in seen]  # none for m ≤ 2**bits, kept for safety
    return np.array(order, dtype=np.int64)


def race_plan(num_train_timesteps: int, grid_size: int | None = None, profile: list[int] | None = None):
    """(grid timesteps, visiting order as grid positions): the profile's order when there is a profile of
    the asked size, else the spread-out order over a `grid_size` grid (default DEFAULT_GRID)."""
    if profile and grid_size in (None, len(profile)):
        grid = timestep_grid(len(profile), num_train_timesteps)
        index = {t: j for j, t in enumerate(grid)}
        if sorted(profile) != grid:
            raise ValueError(f"the timestep profile is not a permutation of the {len(profile)}-point grid; remake it")
        return np.array(grid, dtype=np.int64), np.array([index[t] for t in profile], dtype=np.int64)
    m = grid_size or DEFAULT_GRID
    return np.array(timestep_grid(m, num_train_timesteps), dtype=np.int64), spread_order(m)


class PairedRace:
    """Per-image state of the race; the same interface as StagedPruning.

    Usage::

        run = PairedRace(n_candidates, grid, order, RaceConfig(z=3))
        while (req := run.request()) is not None:
            cand, pos = req                  # candidate indices, positions in run.timesteps (= noise rows)
            run.submit(errors)               # (len(cand), len(pos)) errors
        run.best, run.mean_errors
    """

    def __init__(self, n_candidates: int, grid: np.ndarray, order: np.ndarray, config: RaceConfig = RaceConfig()):
        if n_candidates < 1:
            raise ValueError("need at least one candidate")
        if config.budget is not None and config.budget < n_candidates:
            raise ValueError(f"a budget of {config.budget} passes cannot score {n_candidates} candidates even once")
        self.timesteps = np.asarray(grid, dtype=np.int64)
        self.order = np.asarray(order, dtype=np.int64)
        self.config = config
        self.errors = np.zeros((n_candidates, len(self.order)), dtype=np.float64)  # columns in visiting order
        self.counts = np.zeros(n_candidates, dtype=np.int64)
        self.alive = np.arange(n_candidates)
        self.dropped_at = np.full(n_candidates, -1)  # round after which a candidate left
        self.passes = 0
        self.rounds = 0
        self._visited = 0  # timesteps evaluated so far (a prefix of `order`)
        self._stopped = False

    def request(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(candidates, grid positions) of the next round, or None when the race is over."""
        if self.done:
            return None
        k = min(self.config.round_size, len(self.order) - self._visited)
        if self.config.budget is not None:
            k = min(k, (self.config.budget - self.passes) // len(self.alive))
        if k <= 0:
            self._stopped = True
            return None
        return self.alive, self.order[self._visited : self._visited + k]

    def submit(self, errors: np.ndarray) -> None:
        errors = np.asarray(errors, dtype=np.float64)
        k = errors.shape[1] if errors.ndim == 2 else -1
        assert errors.shape == (len(self.alive), k) and k > 0, f"errors {errors.shape} for {len(self.alive)} candidates"
        self.errors[self.alive, self._visited : self._visited + k] = errors
        self._visited += k
        self.counts[self.alive] = self._visited
        self.passes += errors.size
        self.rounds += 1
        if self.rounds >= self.config.min_rounds and len(self.alive) > 1:
            self._eliminate()

    def _eliminate(self) -> None:
        n = self._visited
        if n < 2 or self.config.z == np.inf:
            return  # no standard error from one timestep; z = inf: nobody leaves (inf * a zero se would be NaN)
        e = self.errors[self.alive, :n]
        d = e - e[np.argmin(e.mean(axis=1))]  # paired differences to the leader (ties: lower index leads)
        se = d.std(axis=1, ddof=1) / np.sqrt(n)
        out = d.mean(axis=1) > self.config.z * se  # the leader's own row is 0 > 0: never
        self.dropped_at[self.alive[out]] = self.rounds
        self.alive = self.alive[~out]

    @property
    def done(self) -> bool:
        one_left = len(self.alive) == 1 and self.rounds >= self.config.min_rounds
        return self._stopped or one_left or self._visited >= len(self.order)

    @property
    def mean_errors(self) -> np.ndarray:
        """Each candidate's mean error over the timesteps it was evaluated at (inf if none)."""
        sums = np.where(np.arange(self.errors.shape[1]) < self.counts[:, None], self.errors, 0.0).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, sums / np.maximum(self.counts, 1), np.inf)

    @property
    def best(self) -> int:
        """The surviving candidate with the lowest mean error."""
        assert self.done, "the race is not finished"
        return int(self.alive[np.argmin(self.mean_errors[self.alive])])

    def ranking(self) -> np.ndarray:
        """All candidates, best first: survivors, then later-dropped candidates, then lower mean error."""
        survived = np.where(self.dropped_at < 0, self.rounds + 1, self.dropped_at)
        return np.lexsort((np.arange(len(self.counts)), self.mean_errors, -survived))


def decision_margin(errors: np.ndarray, counts: np.ndarray, winner: int, rival: int) -> float:
    """The winner's lead over a rival in standard errors of their paired differences, on the timesteps both
    were scored at (a prefix of the evaluation order: columns 0..n-1 of `errors`). inf when the rival was
    never scored or never differs; 0 with fewer than two shared timesteps."""
    n = int(min(counts[winner], counts[rival]))
    if counts[rival] == 0:
        return float("inf")
    if n < 2:
        return 0.0
    d = errors[rival, :n] - errors[winner, :n]
    se = d.std(ddof=1) / np.sqrt(n)
    mean = d.mean()
    return float(mean / se) if se > 0 else (float("inf") if mean > 0 else 0.0)


def timestep_profile(errors: np.ndarray, candidate_class: np.ndarray) -> np.ndarray:
    """Grid positions ordered by how well each timestep separates the exhaustive winner from its rivals.

    errors: (images, candidates, grid) from scoring every candidate at every grid timestep. For each image,
    the winner is its lowest-mean candidate; each rival of another class gives paired differences
    d_j = e_rival,j − e_winner,j, standardised by their spread over the grid so every (image, rival) counts
    alike; a timestep's score is the mean standardised d_j over all of them. Highest score first.
    No ground-truth labels: the exhaustive decision is the reference.
    """
    errors = np.asarray(errors, dtype=np.float64)
    candidate_class = np.asarray(candidate_class)
    score = np.zeros(errors.shape[2])
    total = 0
    for e in errors:
        winner = int(np.argmin(e.mean(axis=1)))
        rivals = candidate_class != candidate_class[winner]
        d = e[rivals] - e[winner]
        sd = d.std(axis=1, keepdims=True)
        score += (d / np.where(sd > 0, sd, 1.0)).sum(axis=0)
        total += len(d)
    return np.argsort(-score / max(total, 1), kind="stable")


def new_run(strategy: str, n_candidates: int, num_train_timesteps: int, *, stages=None, race: RaceConfig = RaceConfig(),
            grid_size: int | None = None, profile: list[int] | None = None):
    """One image's driver: StagedPruning for strategy "stages", PairedRace for "race" (ValueError on bad input)."""
    if strategy == "stages":
        from diffscore.kernels.pruning import StagedPruning

        return StagedPruning(n_candidates, list(stages), num_train_timesteps)
    if strategy == "race":
        grid, order = race_plan(num_train_timesteps, grid_size, profile)
        return PairedRace(n_candidates, grid, order, race)
    if strategy == "cascade":
        raise ValueError("strategy cascade starts from a shortlister's scores: kernels.cascade.cascade_run")
    raise ValueError(f"unknown strategy {strategy!r}; choose {' or '.join(STRATEGIES)}")
