"""Heads trained without human labels: pseudo-label filtering against the engine's own decisions, the
training record from head folder to manifest to `info`, serving like any head, and one-line errors."""

import json

import numpy as np
import pytest
from PIL import Image

import diffscore
from diffscore.engine.manifest import HeadSpec, HeadTraining, Manifest
from diffscore.errors import EngineError
from diffscore.reference.pseudo_labels import pseudo_label

LABELS = ["cat", "dog", "car"]
STAGES = [(4, 2), (8, 1)]
HEAD = ["--kind", "linear", "--blocks", "mid_block", "--noise-steps", "50", "--epochs", "2"]


def random_images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unlabelled")
    for i, image in enumerate(random_images(6, seed=1)):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    return folder


def test_pseudo_labels_keep_the_confident_decisions(engines):
    images = random_images(8)
    with diffscore.load(engines["pixel"], backend="ort-cpu") as engine:
        results = engine.classify(images, LABELS, stages=STAGES)
    confidence = np.array([r.confidence for r in results])
    threshold = float(np.median(confidence))
    expected = [i for i, c in enumerate(confidence) if c >= threshold]
    got = pseudo_label(engines["pixel"], images, LABELS, threshold, backend="ort-cpu", stages=STAGES)
    assert [id(x) for x in got.images] == [id(images[i]) for i in expected]
    assert list(got.labels) == [LABELS.index(results[i].label) for i in expected]
    np.testing.assert_allclose(got.confidence, confidence)
    r = got.record
    assert ((r.source, r.images, r.candidates, r.threshold, r.strategy)
            == ("pseudo-labels", len(expected), 8, threshold, "stages"))
    assert r.engine == str(engines["pixel"])


@pytest.mark.parametrize("threshold, message", [(1e9, "none of the 3 decisions reached confidence"),
                                                (-1.0, "--min-confidence must be"),
                                                (float("nan"), "--min-confidence must be")])
def test_pseudo_label_refusals_are_one_line(engines, threshold, message):
    with pytest.raises(EngineError, match=message) as e:
        pseudo_label(engines["pixel"], random_images(3), LABELS, threshold, backend="ort-cpu", stages=STAGES)
    assert "\n" not in str(e.value)


def test_old_records_still_load():
    from diffscore.reference.heads import HeadConfig

    spec = dict(graph="head.h", kind="linear", labels=["a", "b"], blocks=["mid_block"], steps=[50], seed=0, prompt="",
                weights="w", config="c")
    assert HeadSpec(**spec).training is None  # engines exported before the record
    assert (HeadSpec(**spec, training={"source": "synthetic", "per_class": 3}).training
            == HeadTraining("synthetic", per_class=3))
    config = HeadConfig(kind="linear", labels=["a", "b"], features={"blocks": ["mid_block"], "steps": [50]},
                        shapes=[[32, 4, 4]])
    assert config.origin == HeadTraining(source="labels")  # head folders before the record were trained on labels


def test_sampler_choices_match_the_reference():
    from diffscore.app import cli
    from diffscore.reference.sampling import SAMPLERS

    assert tuple(s.value for s in cli.Sampler) == tuple(SAMPLERS)


def test_synthetic_head_end_to_end(tiny_models, run_cli_out, tmp_path):
    model = tiny_models["pixel"]
    code, out, err = run_cli_out("train-head", model, "--synthesize", 2, "--labels", "cat,dog", "--template", "a {}",
                                 "--sampling-steps", 2, *HEAD, "--out", tmp_path / "synth", "--save-samples",
                                 tmp_path / "samples")
    assert code == 0, err
    assert "4 synthetic images" in out
    record = HeadTraining(source="synthetic", images=4, sampler="dpm-solver", sampling_steps=2, guidance=2.0,
                          per_class=2, template="a {}", sample_seed=0)
    assert HeadTraining(**json.loads((tmp_path / "synth" / "head.json").read_text())["origin"]) == record
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["cat", "dog", "synthesis.json"]
    assert len(list((tmp_path / "samples" / "dog").glob("*.png"))) == 2
    # the saved samples train again through --data, and the head still says where they came from
    code, _, err = run_cli_out("train-head", model, "--data", tmp_path / "samples", *HEAD, "--out", tmp_path / "again")
    assert code == 0, err
    assert json.loads((tmp_path / "again" / "head.json").read_text())["origin"]["source"] == "synthetic"

    code, _, err = run_cli_out("export", model, tmp_path / "engine", "--head-dir", tmp_path / "synth")
    assert code == 0, err
    assert Manifest.load(tmp_path / "engine").heads["synth"].training == record
    code, out, err = run_cli_out("info", tmp_path / "engine")
    assert code == 0 and "trained on 4 synthetic images (2 per label, dpm-solver 2 steps" in out, err
    code, out, err = run_cli_out("classify", tmp_path / "engine", tmp_path / "samples" / "cat", "--method", "head",
                                 "--format", "json")
    assert code == 0, err
    assert {r["label"] for r in json.loads(out)} <= {"cat", "dog"}


def test_pseudo_label_head_records_the_engine(tiny_models, engines, unlabelled, run_cli_out, tmp_path):
    with diffscore.load(engines["pixel"], backend="ort-cpu") as engine:
        confidence = [r.confidence for r in engine.classify(sorted(unlabelled.iterdir()), LABELS, strategy="race")]
    kept = sum(c >= 0.5 for c in confidence)
    assert kept, confidence
    code, out, err = run_cli_out("train-head", tiny_models["pixel"], "--pseudo-label", engines["pixel"], "--data",
                                 unlabelled,
                                 "--labels", ",".join(LABELS), "--strategy", "race", "--min-confidence", 0.5,
                                 "--backend", "ort-cpu", *HEAD, "--out", tmp_path / "pl")
    assert code == 0, err
    assert f"kept {kept} of 6 images" in out
    origin = HeadTraining(**json.loads((tmp_path / "pl" / "head.json").read_text())["origin"])
    assert (origin.source, origin.images, origin.candidates, origin.threshold, origin.strategy, origin.engine) == \
        ("pseudo-labels", kept, 6, 0.5, "race", str(engines["pixel"]))


MISTAKES = [
    (["--synthesize", "0", "--labels", "a,b"], 2, "--synthesize"),
    (["--synthesize", "2"], 2, "exactly one of --labels"),
    (["--synthesize", "2", "--labels", "a,b", "--demo"], 2, "drop --data/--demo"),
    (["--synthesize", "2", "--labels", "a,b", "--template", "no braces"], 1, "{}"),
    (["--synthesize", "2", "--labels", "a", "--sampling-steps", "1"], 1, "at least two labels"),
    (["--synthesize", "2", "--labels", "a,b", "--pseudo-label", "{engine}"], 2, "pick one"),
    (["--synthesize", "2", "--labels", "a,b", "--sampler", "euler"], 2, "--sampler"),
    (["--pseudo-label", "{engine}", "--data", "{empty}", "--labels", "a,b"], 1, "has no image files"),
    (["--pseudo-label", "{engine}", "--labels", "a,b"], 2, "exactly one of --data"),
    (["--demo", "--save-samples", "{tmp}/s"], 2, "use it with --synthesize"),
    (["--demo", "--min-confidence", "2"], 2, "use them with --pseudo-label"),
    (["--demo", "--labels", "a,b"], 2, "go with --synthesize or --pseudo-label"),
]


@pytest.mark.parametrize("args, code, message", MISTAKES, ids=lambda a: " ".join(a) if isinstance(a, list) else str(a))
def test_mistakes_are_one_line(tiny_models, engines, run_cli, tmp_path, args, code, message):
    (tmp_path / "empty").mkdir()
    args = [a.format(engine=engines["pixel"], empty=tmp_path / "empty", tmp=tmp_path) for a in args]
    got, err = run_cli("train-head", tiny_models["pixel"], *args, "--out", tmp_path / "head")
    assert got == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "head").exists() and not (tmp_path / "s").exists()
