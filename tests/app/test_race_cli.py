"""The race and the timestep profile from the command line, on a tiny pixel-space model."""

import json

import numpy as np
import pytest
from PIL import Image

from diffscore.engine.manifest import Manifest
from diffscore.export.onnx_export import export_engine


@pytest.fixture
def run_cli(run_cli_out):
    return run_cli_out


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory):
    return export_engine(tiny_models["pixel"], tmp_path_factory.mktemp("race-cli") / "engine", show_progress=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_classify_race_prints_passes_and_confidence(run_cli, engine, images):
    code, out, err = run_cli("classify", engine, *sorted(images.glob("*.png")), "--labels", "cat,dog,bird",
                             "--strategy", "race",
                        "--z", "1.5", "--budget", "200", "--format", "json")
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 3 and all(0 < r["passes"] <= 200 and "confidence" in r for r in rows)


def test_profile_command_records_the_order(run_cli, engine, images, tmp_path):
    import shutil

    target = shutil.copytree(engine, tmp_path / "engine")
    code, out, err = run_cli("profile", target, str(images / "*.png"), "--labels", "cat,dog,bird", "--grid", "10")
    assert code == 0, err
    profile = Manifest.load(target).timestep_profile
    assert sorted(profile) == list(range(50, 1000, 100))
    assert ", ".join(map(str, profile[:10])) in out.replace("\n", " ")


@pytest.mark.parametrize("args, exit_code, message", [
    (["--strategy", "stages", "--z", "2"], 2, "use them with --strategy race"),
    (["--strategy", "fastest"], 2, "'fastest' is not one of"),
    (["--strategy", "race", "--budget", "2"], 1, "cannot score 3 candidates"),
    (["--strategy", "race", "--z", "-1"], 2, "z must be > 0"),
])
def test_race_mistakes_are_one_line(run_cli, engine, images, args, exit_code, message):
    code, _, err = run_cli("classify", engine, images / "im0.png", "--labels", "cat,dog,bird", *args)
    assert code == exit_code and message in err and len(err.strip().splitlines()) == 1, err


def test_profile_needs_two_labels(run_cli, engine, images):
    code, _, err = run_cli("profile", engine, images / "im0.png", "--labels", "cat")
    assert code == 1 and "at least two labels" in err
