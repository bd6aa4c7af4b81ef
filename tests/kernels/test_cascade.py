"""The cascade's shortlist and its race driver on constructed scores (hand-computed expectations)."""

import math

import numpy as np
import pytest

from diffscore.kernels import RaceConfig, class_ranking, confidence
from diffscore.kernels.cascade import HEAD_MASS, CascadeConfig, ShortlistRace, cascade_config, cascade_run, shortlist
from diffscore.kernels.racing import race_plan


def test_fixed_k_takes_the_best_in_order():
    assert shortlist([0.1, 3.0, -1.0, 2.0], 2).tolist() == [1, 3]
    assert shortlist([0.1, 3.0, -1.0, 2.0], 10).tolist() == [1, 3, 0, 2]  # k above the classes: all of them


def test_ties_go_to_the_lower_index():
    assert shortlist([1.0, 2.0, 2.0, 2.0], 2).tolist() == [1, 2]
    assert shortlist([5.0, 5.0], 1).tolist() == [0]


def test_mass_picks_the_fewest_classes_reaching_it():
    logits = np.log([0.7, 0.2, 0.06, 0.04])  # softmax = these probabilities
    assert shortlist(logits, 4, mass=0.5).tolist() == [0]  # 0.7 ≥ 0.5
    assert shortlist(logits, 4, mass=0.9).tolist() == [0, 1]  # 0.7 + 0.2 = 0.9 (reached exactly)
    assert shortlist(logits, 4, mass=0.95).tolist() == [0, 1, 2]  # 0.96
    assert shortlist(logits, 2, mass=0.99).tolist() == [0, 1]  # capped at k
    assert shortlist(logits, 4, mass=1.0).tolist() == [0, 1, 2, 3]
    # mass 1 keeps all k even where the rest hold less than float resolution (8e-18 here)
    assert shortlist([0.0, -40.0, -40.0], 3, mass=1.0).tolist() == [0, 1, 2]
    assert shortlist([0.0, -40.0, -40.0], 3, mass=0.99999).tolist() == [0]


def test_defaults_stop_a_heads_shortlist_at_its_mass_but_not_diffdis():
    assert CascadeConfig() == CascadeConfig(k=3, mass=HEAD_MASS, by="head")
    assert CascadeConfig(by="diffdis").mass is None  # DiffDis scores are not calibrated logits
    assert CascadeConfig(mass=None).mass is None


def test_config_refuses_bad_values():
    for bad in (dict(k=0), dict(k=2.5), dict(mass=0.0), dict(mass=1.5), dict(by="clip")):
        with pytest.raises(ValueError):
            CascadeConfig(**bad)
    assert cascade_config("race", None, None, None) is None
    with pytest.raises(ValueError, match="use them with strategy cascade"):
        cascade_config("race", None, 3, None)
    assert cascade_config("cascade", "diffdis", 5, None) == CascadeConfig(k=5, by="diffdis")


def drive(run, truth):
    """Feed a run the errors of a (candidates, grid) table."""
    while (req := run.request()) is not None:
        cand, pos = req
        run.submit(truth[np.ix_(cand, pos)])
    return run


def test_race_runs_on_the_shortlisted_candidates_only():
    rng = np.random.default_rng(0)
    grid, order = race_plan(1000, 20)
    truth = 1.0 + 0.05 * rng.standard_normal((6, 20))
    truth[4] -= 0.2  # class 4 is clearly best by denoising error
    scores = np.array([0.0, 1.0, 0.5, 2.0, 1.5, -1.0])  # shortlister: 3 > 4 > 1 > ...
    run = drive(cascade_run(scores, 1, 1000, CascadeConfig(k=3), RaceConfig(z=3.0), grid_size=20), truth)
    assert run.shortlist.tolist() == [3, 4, 1]
    assert set(np.flatnonzero(run.counts)) <= {1, 3, 4}  # no other candidate was scored
    ranking = class_ranking(run, np.arange(6))
    assert ranking[0][0] == 4
    assert [c for c, _, _ in ranking[3:]] == [2, 0, 5]  # unraced classes follow in the shortlister's order
    assert all(math.isinf(m) and n == 0 for _, m, n in ranking[3:])
    # the same decision and passes as a plain race over the three shortlisted candidates
    from diffscore.kernels.racing import PairedRace

    plain = drive(PairedRace(3, grid, order, RaceConfig(z=3.0)), truth[[3, 4, 1]])
    assert run.passes == plain.passes and [3, 4, 1][plain.best] == run.best == 4


def test_one_class_left_costs_no_pass():
    run = cascade_run(np.log([0.9, 0.05, 0.05]), 2, 1000, CascadeConfig(k=3, mass=0.8), grid_size=10)
    assert run.request() is None and run.done and run.passes == 0
    assert run.ranking().tolist() == [0, 1, 2, 3, 4, 5]  # 2 templates per class, label-major
    assert confidence(run, np.repeat(np.arange(3), 2)) == math.inf


def test_templates_expand_each_shortlisted_class():
    run = ShortlistRace(np.array([2, 0, 1]), 2, 2, *race_plan(1000, 10))
    cand, pos = run.request()
    assert cand.tolist() == [4, 5, 0, 1]
