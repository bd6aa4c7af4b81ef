"""Fast defaults on every export (issue 29): the race in spread order unless told otherwise, `export` records the
scoring defaults it is given, `diffscore defaults` shows and changes them atomically, and `classify` says what a
long run costs before it starts."""

from __future__ import annotations

import json

import pytest

from diffscore.app.defaults import expected_passes
from diffscore.engine.manifest import MANIFEST_NAME, Manifest
from diffscore.kernels import RaceConfig


@pytest.fixture(scope="module")
def exported(demo_model, tmp_path_factory):
    """The demo model exported twice through the CLI: with no options, and with every scoring default set."""
    from diffscore.app import cli

    root = tmp_path_factory.mktemp("defaults")
    cli.main(["export", str(demo_model), str(root / "plain")])
    cli.main(["export", str(demo_model), str(root / "set"), "--template", "a handwritten digit {}", "--strategy",
              "stages", "--stages", "10:3,40:1", "--loss", "l1", "--z", "2", "--min-rounds", "2", "--round-size", "4",
              "--budget", "300", "--timesteps", "5"])
    return root / "plain", root / "set"


def test_a_plain_export_races_in_spread_order(exported):
    m = Manifest.load(exported[0])
    assert m.defaults.strategy == "race" and m.timestep_profile is None and m.defaults.template == "{}"
    assert m.defaults.race == RaceConfig(z=1.0, min_rounds=1, round_size=5, budget=None)


def test_export_records_the_defaults_it_is_given(exported):
    d = Manifest.load(exported[1]).defaults
    assert (d.template, d.strategy, d.stages, d.loss, d.dsd_steps) == ("a handwritten digit {}", "stages",
                                                                        [[10, 3], [40, 1]], "l1", 5)
    assert d.race == RaceConfig(z=2.0, min_rounds=2, round_size=4, budget=300)


def test_defaults_shows_and_changes_them(run_cli_out, exported, tmp_path):
    import shutil

    engine = shutil.copytree(exported[0], tmp_path / "engine")
    code, out, err = run_cli_out("defaults", engine)
    assert code == 0 and "strategy  race (spread order over 100 timesteps)" in out and "z 1, min rounds 1" in out, err
    code, out, err = run_cli_out("defaults", engine, "--strategy", "stages", "--stages", "20:3,100:1", "--z", "1.5")
    assert code == 0, err
    d = Manifest.load(engine).defaults
    assert d.strategy == "stages" and d.stages == [[20, 3], [100, 1]] and d.race.z == 1.5 and d.template == "{}"
    assert not [p.name for p in engine.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]  # no leftovers
    code, out, err = run_cli_out("defaults", engine, "--reset")
    reset = Manifest.load(engine).defaults
    assert code == 0 and reset.strategy == "race" and reset.race == RaceConfig()
    before = (engine / MANIFEST_NAME).read_bytes()
    code, _, err = run_cli_out("defaults", engine, "--stages", "5", "--loss", "l1")  # one bad value: nothing written
    assert code == 2 and (engine / MANIFEST_NAME).read_bytes() == before, err
    json.loads(before)


def test_defaults_waits_for_no_other_writer(run_cli_out, exported, tmp_path):
    import shutil

    from diffscore.export.atomic import exclusive

    engine = shutil.copytree(exported[0], tmp_path / "engine")
    with exclusive(engine):  # another process is writing the engine (an export, calibrate, profile)
        code, _, err = run_cli_out("defaults", engine, "--z", "2")
    assert code == 1 and "another diffscore process is writing" in err
    assert Manifest.load(engine).defaults.race == RaceConfig()


def test_expected_passes_by_hand():
    # the seed's CIFAR-10 stages, 10 labels: 50 timesteps x 10, then 450 new x 5 survivors
    assert expected_passes("stages", 10, stages=[(50, 5), (500, 1)]) == (2750, 2750)
    assert expected_passes("stages", 10, stages=[(10, 3), (40, 1)]) == (10 * 10 + 30 * 3, 190)
    # the race: one round of 5 timesteps for all 10 at least; the whole 100-point grid at most, or the budget
    assert expected_passes("race", 10, race=RaceConfig()) == (50, 1000)
    assert expected_passes("race", 10, race=RaceConfig(min_rounds=2, budget=300)) == (100, 300)
    assert expected_passes("race", 4, race=RaceConfig(), grid=40) == (20, 160)


def test_classify_says_what_a_long_run_costs(run_cli_out, exported, tmp_path):
    from PIL import Image

    from diffscore.app.digits import CLASS_NAMES, load_digits_split

    for i, image in enumerate(load_digits_split().test_images[:3]):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    labels = ",".join(CLASS_NAMES)
    code, out, err = run_cli_out("classify", exported[0], tmp_path, "--labels", labels, "-b", "ort-cpu", "-f", "json")
    assert code == 0 and err.startswith("race: 50 to 1,000 UNet passes per image (the race stops when one label is "
                                        "left), 3 images"), err
    assert all(r["passes"] <= 1000 and r["options"]["strategy"] == "race" for r in json.loads(out))
    code, out, err = run_cli_out("classify", exported[1], tmp_path / "0.png", "--labels", labels, "-b", "ort-cpu",
                                 "--stages", "2:1")
    assert code == 0 and "UNet passes" not in err, err  # 20 passes: no note for a short run
