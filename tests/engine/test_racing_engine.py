"""The race on the runtime against the torch reference on tiny models; budget, seed and the profile."""

import numpy as np
import pytest

import diffscore
from diffscore.engine.manifest import Manifest
from diffscore.engine.profiling import make_profile, save_profile
from diffscore.errors import EngineError
from diffscore.kernels import RaceConfig
from diffscore.reference.classifier import classify_reference
from diffscore.reference.loading import load_components

LABELS = ["cat", "dog", "bird", "car"]
RACE = dict(z=1.0, min_rounds=1, round_size=3, timesteps=20)  # a low z: candidates do leave on a tiny model






def reference_race(comp, imgs, templates, loss, seed, profile=None, **race):
    cfg = RaceConfig(**{k: race[k] for k in ("z", "min_rounds", "round_size", "budget") if k in race})
    return classify_reference(comp, imgs, LABELS, templates=templates, loss=loss, seed=seed, strategy="race",
                              race=cfg, timesteps=race.get("timesteps"), profile=profile)


def assert_same(got, want):
    for g, w in zip(got, want):
        assert g.label == w.label and g.passes == w.passes and g.evaluated == w.evaluated
        for (lg, sg), (lw, sw) in zip(g.ranking, w.ranking):
            assert lg == lw and sg == pytest.approx(sw, rel=1e-4)
        assert g.confidence == pytest.approx(w.confidence, rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("kind, templates, loss",
                         [("pixel", ["a {}"], "l2"), ("sd1", ["a {}", "a photo of a {}"], "huber")])
def test_race_equals_reference(engines, tiny_models, kind, templates, loss, images_for):
    comp = load_components(tiny_models[kind])
    imgs = images_for(comp, 4)
    eng = diffscore.load(engines[kind], backend="ort-cpu")
    got = eng.classify(imgs, LABELS, templates=templates, loss=loss, seed=3, strategy="race", batch_size=7, **RACE)
    want = reference_race(comp, imgs, templates, loss, 3, **RACE)
    assert_same(got, want)
    full = len(LABELS) * len(templates) * RACE["timesteps"]
    assert any(r.passes < full for r in got), "nobody left the race: the test does not exercise elimination"


def test_race_is_deterministic_under_a_seed_and_respects_the_budget(engines, tiny_models, images_for):
    eng = diffscore.load(engines["pixel"], backend="ort-cpu")
    imgs = images_for(load_components(tiny_models["pixel"]), 4, seed=1)
    a, b = (eng.classify(imgs, LABELS, strategy="race", seed=5, **RACE) for _ in range(2))
    assert [(r.label, r.ranking, r.passes) for r in a] == [(r.label, r.ranking, r.passes) for r in b]
    c = eng.classify(imgs, LABELS, strategy="race", seed=6, **RACE)
    assert [r.ranking for r in a] != [r.ranking for r in c]
    capped = eng.classify(imgs, LABELS, strategy="race", seed=5, budget=30, **{**RACE, "z": 50.0})
    assert all(r.passes == 4 * 3 + 4 * 3 + 4 * 1 for r in capped)  # rounds of 3 timesteps, then (30 - 24) // 4
    with pytest.raises(EngineError, match="budget"):
        eng.classify(imgs, LABELS, strategy="race", budget=3)


def test_exhaustive_grid_errors_give_the_race_without_elimination(engines, tiny_models, images_for):
    eng = diffscore.load(engines["pixel"], backend="ort-cpu")
    imgs = images_for(load_components(tiny_models["pixel"]), 3, seed=2)
    errors = eng.grid_errors(imgs, LABELS, timesteps=10, seed=4)
    assert errors.shape == (3, 4, 10)
    everything = eng.classify(imgs, LABELS, strategy="race", seed=4, timesteps=10, z=1e9, use_profile=False)
    for e, r in zip(errors, everything):
        assert r.passes == 40 and r.label == LABELS[int(np.argmin(e.mean(axis=1)))]
        np.testing.assert_allclose(sorted(s for _, s in r.ranking), np.sort(e.mean(axis=1)), rtol=1e-6)


def test_profile_round_trip_through_the_manifest(engines, tiny_models, tmp_path, images_for):
    import shutil

    engine_dir = shutil.copytree(engines["pixel"], tmp_path / "engine")
    comp = load_components(tiny_models["pixel"])
    eng = diffscore.load(engine_dir, backend="ort-cpu")
    profile = make_profile(eng, images_for(comp, 3, seed=7), LABELS, timesteps=20)
    assert sorted(profile) == list(range(25, 1000, 50))  # a permutation of the 20-point grid
    save_profile(engine_dir, profile)
    assert Manifest.load(engine_dir).timestep_profile == profile
    eng = diffscore.load(engine_dir, backend="ort-cpu")
    imgs = images_for(comp, 3)
    race = {k: v for k, v in RACE.items() if k != "timesteps"}  # the profile's grid
    got = eng.classify(imgs, LABELS, strategy="race", seed=1, **race)
    assert_same(got, reference_race(comp, imgs, ["{}"], "l2", 1, profile=profile, **race))
    spread = eng.classify(imgs, LABELS, strategy="race", seed=1, use_profile=False, timesteps=20, **race)
    assert [r.ranking for r in got] != [r.ranking for r in spread]  # the order matters
