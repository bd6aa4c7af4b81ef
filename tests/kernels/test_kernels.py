"""kernels/: timestep grid, noising, error reductions and staged pruning against direct computations."""

import numpy as np
import pytest

from diffscore.kernels import (StagedPruning, add_noise, class_ranking, denoising_error, pool_layer_scores,
                               shared_noise, stage_timesteps)
from diffscore.kernels.timesteps import dsd_timesteps


def test_stage_grid_matches_design_worked_example():
    s1, s2 = stage_timesteps([(50, 5), (500, 1)], 1000)
    assert s1 == list(range(11, 1000, 20))
    assert len(s2) == 450 and set(s1).isdisjoint(s2)
    assert sorted(s1 + s2) == list(range(1, 1000, 2))


@pytest.mark.parametrize("bad", [[], [(0, 1)], [(10, 1), (20, 3)]])
def test_bad_stages_are_refused(bad):
    with pytest.raises(ValueError):
        stage_timesteps(bad)


def test_dsd_timesteps():
    assert dsd_timesteps(10) == list(range(10, 990, 100))


def test_noise_is_seeded_and_noising_is_the_closed_form():
    a, b = shared_noise(3, 4, (1, 2, 2)), shared_noise(3, 4, (1, 2, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, shared_noise(4, 4, (1, 2, 2)))
    abar = np.linspace(0.99, 0.01, 1000)
    x0 = np.random.default_rng(0).standard_normal((1, 2, 2)).astype(np.float32)
    xt = add_noise(x0, a, abar, [0, 10, 500, 999])
    for k, t in enumerate([0, 10, 500, 999]):
        np.testing.assert_allclose(xt[k], np.sqrt(abar[t]) * x0 + np.sqrt(1 - abar[t]) * a[k], rtol=1e-6)


def test_error_reductions_match_torch():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    e, h = rng.standard_normal((5, 3, 4, 4), dtype=np.float32) * 2, rng.standard_normal((5, 3, 4, 4), dtype=np.float32)
    for loss, fn in [("l2", F.mse_loss), ("l1", F.l1_loss), ("huber", F.huber_loss)]:
        want = fn(torch.from_numpy(h), torch.from_numpy(e), reduction="none").flatten(1).mean(1).numpy()
        np.testing.assert_allclose(denoising_error(e, h, loss), want, rtol=1e-6)
    with pytest.raises(ValueError):
        denoising_error(e, h, "l3")


def test_layer_pooling_is_the_mean_or_the_weighted_sum():
    scores = np.random.default_rng(0).standard_normal((4, 6, 3), dtype=np.float32)  # (..., layers)
    np.testing.assert_allclose(pool_layer_scores(scores), scores.mean(-1), rtol=1e-6)
    np.testing.assert_allclose(pool_layer_scores(scores, np.full(3, 1 / 3)), scores.mean(-1), rtol=1e-6)
    w = np.array([0.5, 0.3, 0.2])
    want = 0.5 * scores[..., 0] + 0.3 * scores[..., 1] + 0.2 * scores[..., 2]
    np.testing.assert_allclose(pool_layer_scores(scores, w), want, rtol=1e-6)


def test_pruning_keeps_the_right_candidates():
    """Stage 1 ranks candidates 3 < 2 < 1 < 0 and keeps two; stage 2 makes 0 best, but it is already out."""
    run = StagedPruning(4, [(2, 2), (4, 1)], 1000)
    cand, pos = run.request()
    assert list(cand) == [0, 1, 2, 3] and len(pos) == 2
    run.submit(np.array([[4.0, 4.0], [3.0, 3.0], [2.0, 2.0], [1.0, 1.0]]))
    cand, pos = run.request()
    assert sorted(cand) == [2, 3] and len(pos) == 2  # 4 grid points, 2 already evaluated
    run.submit(np.array([[0.0, 0.0], [5.0, 5.0]]) if cand[0] == 2 else np.array([[5.0, 5.0], [0.0, 0.0]]))
    assert run.request() is None and run.done
    assert run.best == 2  # (2+2+0+0)/4 = 1 < (1+1+5+5)/4 = 3
    assert run.passes == 4 * 2 + 2 * 2
    assert list(run.ranking()[:2]) == [2, 3] and run.pruned_at[0] == 0 and run.pruned_at[1] == 0
    # two prompts per class: a class scores as its best prompt
    ranking = class_ranking(run, np.array([0, 0, 1, 1]))
    assert [c for c, _, _ in ranking] == [1, 0]
    assert ranking[0][1] == pytest.approx(1.0) and ranking[0][2] == 4
