"""strategy="cascade" on a tiny pixel-space model with a linear head: the engine equals the torch reference
(decisions, passes, shortlists), its race equals a plain race over the shortlisted labels, and the CLI runs it."""

import json

import numpy as np
import pytest
from PIL import Image

import diffscore
from diffscore.errors import EngineError
from diffscore.export.onnx_export import export_engine
from diffscore.kernels import RaceConfig
from diffscore.kernels.cascade import CascadeConfig
from diffscore.reference.classifier import classify_reference
from diffscore.reference.features import FeatureSpec
from diffscore.reference.head_training import TrainOptions, train_head_on_images
from diffscore.reference.heads import head_logits_reference, load_head, save_head
from diffscore.reference.loading import load_components

LABELS = ["cat", "dog", "bird", "fish", "frog"]
RACE = dict(z=1.0, min_rounds=1, round_size=5, timesteps=20)


@pytest.fixture(scope="module")
def setup(tiny_models, images_for, tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    comp = load_components(tiny_models["pixel"])
    train = images_for(comp, 30, seed=1)
    head, config = train_head_on_images(tiny_models["pixel"], train, np.arange(30) % len(LABELS), LABELS, "linear",
                                        FeatureSpec(["mid_block"], [50]), TrainOptions(epochs=3, val_fraction=0.0),
                                        root / "cache", comp=comp)
    save_head(head, config, root / "probe")
    engine_dir = export_engine(tiny_models["pixel"], root / "engine", heads=[root / "probe"], show_progress=False)
    return comp, engine_dir, root / "probe", images_for(comp, 6, seed=2)


def test_engine_equals_reference(setup):
    comp, engine_dir, head_dir, images = setup
    head, config = load_head(head_dir)
    logits = head_logits_reference(comp, head, config, images).double().numpy()
    for cascade in (CascadeConfig(k=2), CascadeConfig(k=4, mass=0.5)):
        with diffscore.load(engine_dir, backend="ort-cpu") as eng:
            got = eng.classify(images, LABELS, strategy="cascade", k=cascade.k, mass=cascade.mass, **RACE)
        ref = classify_reference(comp, images, LABELS, strategy="cascade", race=RaceConfig(1.0, 1, 5), timesteps=20,
                                 shortlist_scores=logits, shortlist_passes=1, cascade=cascade)
        assert [r.label for r in got] == [r.label for r in ref]
        assert [r.passes for r in got] == [r.passes for r in ref]
        assert [r.cascade["shortlist"] for r in got] == [r.cascade["shortlist"] for r in ref]
        for r in got:
            assert r.passes == 1 + r.cascade["race_passes"] and r.cascade["shortlist_passes"] == 1
            assert len(r.cascade["shortlist"]) <= cascade.k and r.label in r.cascade["shortlist"]
            assert r.to_dict()["cascade"] == r.cascade


def test_race_stage_is_a_plain_race_over_the_shortlist(setup):
    _, engine_dir, _, images = setup
    with diffscore.load(engine_dir, backend="ort-cpu") as eng:
        cascade = eng.classify(images, LABELS, strategy="cascade", k=3, **RACE)
        for image, r in zip(images, cascade):
            plain = eng.classify([image], r.cascade["shortlist"], strategy="race", **RACE)[0]
            assert (plain.label, plain.passes) == (r.label, r.cascade["race_passes"])
            assert r.confidence == pytest.approx(plain.confidence)


def test_tiny_mass_keeps_the_heads_pick_at_head_cost(setup):
    _, engine_dir, _, images = setup
    with diffscore.load(engine_dir, backend="ort-cpu") as eng:
        cascade = eng.classify(images, LABELS, strategy="cascade", mass=1e-9)
        head = eng.classify(images, method="head")
        alone = eng.classify(images[0], LABELS, strategy="cascade", mass=1e-9)  # one image given alone
    assert [r.label for r in cascade] == [r.label for r in head] and [r.label for r in alone] == [head[0].label]
    assert all(r.passes == 1 and r.confidence is None and r.cascade["race_passes"] == 0 for r in cascade)


def test_mistakes_are_one_line_errors(setup):
    _, engine_dir, _, images = setup
    with diffscore.load(engine_dir, backend="ort-cpu") as eng:
        with pytest.raises(EngineError, match="use them with strategy cascade"):
            eng.classify(images, LABELS, strategy="race", k=2)
        with pytest.raises(EngineError, match="k must be an integer"):
            eng.classify(images, LABELS, strategy="cascade", k=0)
        with pytest.raises(EngineError, match="a head shortlists its own labels"):
            eng.classify(images, LABELS[:3], strategy="cascade")
        with pytest.raises(EngineError, match="has no DiffDis model"):
            eng.classify(images, LABELS, strategy="cascade", shortlist="diffdis")


def test_cli_cascade(setup, run_cli_out, tmp_path):
    _, engine_dir, _, images = setup
    for i, im in enumerate(images[:3]):
        Image.fromarray(im).save(tmp_path / f"im{i}.png")
    code, out, err = run_cli_out("classify", engine_dir, *sorted(tmp_path.glob("*.png")), "--labels", ",".join(LABELS),
                                 "--strategy", "cascade", "--k", "2", "--z", "1", "--format", "json")
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 3
    for r in rows:
        assert len(r["cascade"]["shortlist"]) == 2 and r["passes"] == 1 + r["cascade"]["race_passes"]
        assert r["options"]["strategy"] == "cascade" and r["options"]["race"]["cascade"]["k"] == 2
    code, _, err = run_cli_out("classify", engine_dir, tmp_path / "im0.png", "--labels", ",".join(LABELS), "--k", "2")
    assert code == 1 and "use them with strategy cascade" in err and len(err.strip().splitlines()) == 1, err


def test_diffdis_shortlists_its_best_k(tiny_models, images_for, tmp_path):
    from diffscore.reference.diffdis import DiffDisTrainOptions, train_diffdis_run

    comp = load_components(tiny_models["pixel"])
    train = images_for(comp, 8, seed=3)
    train_diffdis_run(tiny_models["pixel"], train, [f"a photo of a {LABELS[i % 5]}" for i in range(8)],
                      tmp_path / "run",
                      options=DiffDisTrainOptions(epochs=1, batch_size=4), progress=False, dim=16, heads=2, timesteps=3,
                      generate_steps=2)
    engine_dir = export_engine(tiny_models["pixel"], tmp_path / "engine", diffdis=tmp_path / "run", show_progress=False)
    images = images_for(comp, 4, seed=4)
    with diffscore.load(engine_dir, backend="ort-cpu") as eng:
        got = eng.classify(images, LABELS, strategy="cascade", shortlist="diffdis", k=2, **RACE)
        alone = eng.classify(images, LABELS, method="diffdis")
        for image, r, d in zip(images, got, alone):
            assert r.cascade["shortlist"] == [c for c, _ in d.ranking[:2]] and r.cascade["by"] == "diffdis-denoise"
            plain = eng.classify([image], r.cascade["shortlist"], strategy="race", **RACE)[0]
            assert (r.label, r.passes) == (plain.label, 1 + plain.passes)
