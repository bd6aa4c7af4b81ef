"""kernels/racing.py: the paired race on constructed error matrices, checked against hand computations."""

import warnings

import numpy as np
import pytest

from diffscore.kernels import PairedRace, RaceConfig, confidence, race_plan, spread_order, timestep_profile
from diffscore.kernels.racing import decision_margin


def drive(run: PairedRace, errors: np.ndarray) -> list[tuple[list[int], list[int]]]:
    """Feed a full (candidates, grid) error matrix to a race; returns each round's request."""
    asked = []
    while (req := run.request()) is not None:
        cand, pos = req
        asked.append((cand.tolist(), pos.tolist()))
        run.submit(errors[np.ix_(cand, pos)])
    return asked


def three_candidates(m: int = 12) -> np.ndarray:
    """Candidate 0: a wildly varying base error; 1 = base + 0.2, 0, 0.2, 0, ... (paired mean 0.1);
    2 = base exactly (a tie with 0: paired differences all 0, never dropped)."""
    base = np.random.default_rng(0).uniform(0.0, 5.0, m)  # spread far above the 0.1 gap: only pairing sees it
    return np.stack([base, base + np.tile([0.2, 0.0], m // 2), base])


@pytest.mark.parametrize("z, dropped_after", [(1.5, 1), (2.0, 2)])
def test_candidate_leaves_when_its_paired_mean_exceeds_z_standard_errors(z, dropped_after):
    # By hand, d = (.2, 0, .2, 0, ...): after 4 timesteps mean .1, sd sqrt(4 * .01 / 3) -> t = 1.732;
    # after 8: sd sqrt(8 * .01 / 7) -> t = 2.646. So z = 1.5 drops it after round 1, z = 2 after round 2.
    errors = three_candidates()
    run = PairedRace(3, np.arange(12), np.arange(12), RaceConfig(z=z, min_rounds=1, round_size=4))
    asked = drive(run, errors)
    assert run.dropped_at.tolist() == [-1, dropped_after, -1]
    assert [cand for cand, _ in asked] == [[0, 1, 2]] * dropped_after + [[0, 2]] * (3 - dropped_after)
    assert run.passes == 3 * 4 * dropped_after + 2 * 4 * (3 - dropped_after)
    assert run.best == 0  # ties go to the lower index
    assert run.ranking().tolist() == [0, 2, 1]
    np.testing.assert_allclose(run.mean_errors[[0, 2]], errors[0].mean())
    np.testing.assert_allclose(run.mean_errors[1], errors[1, : 4 * dropped_after].mean())


def test_min_rounds_holds_back_elimination():
    run = PairedRace(3, np.arange(12), np.arange(12), RaceConfig(z=1.5, min_rounds=2, round_size=4))
    drive(run, three_candidates())
    assert run.dropped_at.tolist() == [-1, 2, -1]


def test_race_stops_at_one_survivor_in_visiting_order():
    errors = np.array([[1.0, 1.1, 0.9, 1.0, 1.2, 0.8], [2.0, 2.1, 1.9, 2.0, 2.2, 1.8]])
    order = np.array([5, 0, 3, 1, 4, 2])
    run = PairedRace(2, np.arange(6) * 10, order, RaceConfig(z=3.0, min_rounds=1, round_size=2))
    asked = drive(run, errors)
    assert asked == [([0, 1], [5, 0])]  # d = (1, 1): sd 0, mean 1 > 0, gone after the first round
    assert run.best == 0 and run.passes == 4
    assert run.mean_errors[0] == pytest.approx((0.8 + 1.0) / 2)


def test_budget_caps_passes_and_shrinks_the_last_round():
    errors = three_candidates()
    run = PairedRace(3, np.arange(12), np.arange(12), RaceConfig(z=100.0, min_rounds=1, round_size=4, budget=20))
    asked = drive(run, errors)
    assert [len(pos) for _, pos in asked] == [4, 2]  # 12 passes, then (20 - 12) // 3 = 2 timesteps
    assert run.passes == 18 and run.done
    with pytest.raises(ValueError):
        PairedRace(3, np.arange(12), np.arange(12), RaceConfig(budget=2))  # cannot score 3 candidates once


def test_huge_z_is_the_exhaustive_decision():
    errors = np.random.default_rng(1).normal(1.0, 0.3, (7, 40))
    run = PairedRace(7, np.arange(40), spread_order(40), RaceConfig(z=1e9, round_size=7))
    drive(run, errors)
    assert run.passes == 7 * 40 and run.best == int(np.argmin(errors.mean(axis=1)))
    np.testing.assert_allclose(run.mean_errors, errors.mean(axis=1))


def test_infinite_z_keeps_everyone_without_a_warning():
    """z = inf (grid_errors' one round of everything): nobody leaves, and no NaN warning reaches the user's output
    from inf x the leader's zero standard error (make demo printed one)."""
    errors = np.random.default_rng(2).normal(1.0, 0.3, (4, 10))
    run = PairedRace(4, np.arange(10), spread_order(10), RaceConfig(z=float("inf"), round_size=10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drive(run, errors)
    assert run.passes == 40 and run.alive.tolist() == [0, 1, 2, 3] and run.best == int(np.argmin(errors.mean(1)))


def test_spread_order_is_a_permutation_that_spreads_every_prefix():
    order = spread_order(100)
    assert sorted(order.tolist()) == list(range(100))
    assert order[:5].tolist() == [0, 50, 25, 75, 12]  # van der Corput 0, 1/2, 1/4, 3/4, 1/8 of the grid
    for k in (2, 4, 8, 16, 32, 64):  # the first k points leave no gap wider than a k-th of the grid (+ rounding)
        points = np.sort(order[:k])
        assert np.diff(np.r_[points, points[0] + 100]).max() <= 100 / k + 1


def test_race_plan_uses_the_profile_or_the_spread_order():
    grid, order = race_plan(1000)
    assert grid.tolist() == list(range(5, 1000, 10)) and order.tolist() == spread_order(100).tolist()
    profile = [25, 75, 5, 45, 65, 85, 15, 35, 55, 95]  # a permutation of the 10-point grid 5, 15, ..., 95
    grid, order = race_plan(100, None, profile)
    assert grid[order].tolist() == profile
    assert race_plan(100, 20, profile)[0].tolist() == list(range(2, 100, 5))  # another size: the spread order
    with pytest.raises(ValueError):
        race_plan(100, None, [5, 15])


def test_decision_margin_by_hand():
    errors = np.array([[1.0, 2.0, 3.0, 4.0], [1.5, 2.1, 3.3, 4.0]])
    d = np.array([0.5, 0.1, 0.3, 0.0])
    expected = d.mean() / (d.std(ddof=1) / 2)
    assert decision_margin(errors, np.array([4, 4]), 0, 1) == pytest.approx(expected)
    assert (decision_margin(errors, np.array([4, 3]), 0, 1)
            == pytest.approx(d[:3].mean() / (d[:3].std(ddof=1) / np.sqrt(3))))


def test_confidence_compares_with_the_best_rival_of_another_class():
    errors = three_candidates()
    run = PairedRace(3, np.arange(12), np.arange(12), RaceConfig(z=2.0, min_rounds=1, round_size=4))
    drive(run, errors)
    # candidates 0 and 2 tie; with both in one class the rival is candidate 1, dropped after 8 timesteps
    assert confidence(run, np.array([0, 1, 0])) == pytest.approx(0.1 / (np.sqrt(8 * 0.01 / 7) / np.sqrt(8)))
    assert confidence(run, np.array([0, 1, 2])) == 0.0  # a dead heat
    assert confidence(run, np.zeros(3, int)) == float("inf")


def test_profile_puts_separating_timesteps_first():
    rng = np.random.default_rng(0)
    images, cands, m = 20, 4, 10
    errors = rng.normal(1.0, 0.01, (images, cands, m))
    winners = rng.integers(0, cands, images)
    gap = np.zeros(m)
    gap[[7, 2, 4]] = [0.5, 0.3, 0.1]  # timestep 7 separates best, then 2, then 4; the rest not at all
    for i, w in enumerate(winners):
        errors[i] += gap  # every candidate worse at the separating timesteps ...
        errors[i, w] -= gap  # ... except the winner
    assert timestep_profile(errors, np.arange(cands))[:3].tolist() == [7, 2, 4]
