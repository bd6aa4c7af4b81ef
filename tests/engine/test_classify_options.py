"""One typed, frozen options record per classify method: flat keywords pack into it, resolve fills the engine's
defaults once, the result carries the resolved record, and its JSON keeps the layout results have always had."""

import dataclasses
import json

import pytest

import diffscore
from diffscore.engine.classify_options import DcOptions, DiffDisOptions, HeadOptions, pack
from diffscore.engine.manifest import Manifest
from diffscore.errors import EngineError, UsageMistake
from diffscore.kernels import RaceConfig

LABELS = ["cat", "dog"]
LEGACY_KEYS = ["method", "labels", "templates", "stages", "loss", "seed", "strategy", "race", "head", "backend",
               "precision"]


def test_pack_refuses_what_another_method_owns():
    assert pack(None, None, {"z": 2.0, "template": "a {}"}) == DcOptions(z=2.0, templates=("a {}",))
    assert pack("head", None, {"head": "probe", "seed": 0, "stages": None}) == HeadOptions(head="probe")  # unset
    with pytest.raises(UsageMistake, match="stages is not an option of method head"):
        pack("head", None, {"stages": [(2, 1)]})
    with pytest.raises(UsageMistake, match="unknown classify option 'temperature'"):
        pack("dc", None, {"temperature": 2})
    with pytest.raises(UsageMistake, match="both given"):
        pack("head", DcOptions(), {})
    with pytest.raises(EngineError, match="unknown method 'nope'"):
        pack("nope", None, {})
    assert hash(pack("dc", None, {"labels": ["a", "b"], "stages": [(2, 1)]}))  # hashable: Serve batches by it


def test_resolve_fills_the_engine_defaults_once(engines):
    path = engines["pixel"]
    d = Manifest.load(path).defaults
    with diffscore.load(path, backend="ort-cpu") as eng:
        got = eng.classify_options(LABELS, z=2.5)
        assert got.templates == (d.template,) and got.loss == d.loss and got.strategy == d.strategy
        assert got.race == dataclasses.replace(d.race, z=2.5)  # call > engine default, field by field
        assert got.stages == tuple(tuple(s) for s in d.stages) and (got.backend, got.precision) == ("ort-cpu", "fp32")
        assert eng.classify_options(options=got) == got  # resolving a resolved record changes nothing
        staged = eng.classify_options(LABELS, stages=[(2, 1)])
        assert staged.strategy == "stages" and staged.stages == ((2, 1),)
        with pytest.raises(EngineError, match="z must be > 0"):
            eng.classify_options(LABELS, z=-1.0)
        with pytest.raises(EngineError, match="needs labels"):
            eng.classify_options()


def test_the_result_carries_the_record_and_the_old_json(engines, images_for):
    from diffscore.reference.loading import load_components

    path = engines["pixel"]
    with diffscore.load(path, backend="ort-cpu") as eng:
        images = images_for(load_components(eng.manifest.source_path), 1)
        record = DcOptions(labels=tuple(LABELS), stages=((2, 1),), loss="l1", seed=4)
        by_record = eng.classify(images, options=record)[0]
        by_keywords = eng.classify(images, LABELS, stages=[(2, 1)], loss="l1", seed=4)[0]
        assert by_record.options == by_keywords.options == eng.classify_options(options=record)
        assert by_record.ranking == by_keywords.ranking
        record_json = by_record.to_dict()["options"]
        assert list(record_json) == LEGACY_KEYS and json.loads(json.dumps(record_json)) == {
            "method": "dc", "labels": LABELS, "templates": ["{}"], "stages": [[2, 1]], "loss": "l1", "seed": 4,
            "strategy": "stages", "race": None, "head": "", "backend": "ort-cpu", "precision": "fp32"}
        raced = eng.classify(images, LABELS, strategy="race", z=3.0, timesteps=20)[0].to_dict()["options"]
        assert raced["stages"] == [] and raced["race"] == {**dataclasses.asdict(RaceConfig(
            **{**dataclasses.asdict(eng.defaults.race), "z": 3.0})), "timesteps": 20, "profile": False}


def test_a_manifest_race_with_nulls_reads_as_race_config(engines, tmp_path):
    """Engines exported before the manifest held a RaceConfig wrote null for fields left at RaceConfig's default."""
    import shutil

    engine = shutil.copytree(engines["pixel"], tmp_path / "engine")
    record = json.loads((engine / "manifest.json").read_text())
    record["defaults"]["race"] = {"z": 2.0, "min_rounds": None, "round_size": None, "budget": None}
    (engine / "manifest.json").write_text(json.dumps(record))
    assert Manifest.load(engine).defaults.race == RaceConfig(z=2.0)
    record["defaults"]["race"] = {"z": 0}
    (engine / "manifest.json").write_text(json.dumps(record))
    with pytest.raises(EngineError, match="defaults.race .* expected valid race settings"):
        Manifest.load(engine)


def test_diffdis_and_head_records_are_their_own():
    assert {f.name for f in dataclasses.fields(DiffDisOptions)} >= {"template", "diffdis_mode", "timesteps"}
    assert "stages" not in {f.name for f in dataclasses.fields(HeadOptions)}
