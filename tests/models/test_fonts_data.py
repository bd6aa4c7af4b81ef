"""models/fonts_data.py: the shipped split's file list is reproduced from the installed font packages (a small
subset of them, rendered here), the splits share no typeface, and --fonts takes anyone's own font files."""

import importlib.util
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

MODELS = Path(__file__).resolve().parents[2] / "models"
SHIPPED = MODELS / "fonts62" / "split.json"
SUBSET = {"validation": ["fonts-crosextra-carlito"], "held_out": ["fonts-crosextra-caladea", "fonts-kaushanscript"]}


def load_module():
    spec = importlib.util.spec_from_file_location("fonts_data", MODELS / "fonts_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fonts_data"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fonts_data():
    for pkg in (p for ps in SUBSET.values() for p in ps):
        if subprocess.run(["dpkg", "-s", pkg], capture_output=True).returncode != 0:
            pytest.skip(f"font package {pkg} is not installed (apt-get install -y {pkg})")
    return load_module()


def test_shipped_split_is_reproduced(fonts_data):
    faces = fonts_data.build(SUBSET)
    shipped = [tf for tf in json.loads(SHIPPED.read_text())["typefaces"]
               if tf["package"] in {p for ps in SUBSET.values() for p in ps}]
    assert [asdict(tf) for tf, _ in faces] == shipped and len(shipped) == 9  # 4 Carlito + 4 Caladea + 1 Kaushan


def test_rendering_is_deterministic_and_labelled(fonts_data):
    faces = fonts_data.build({"held_out": ["fonts-kaushanscript"]})
    a, b = fonts_data.arrays(faces)["held_out"], fonts_data.arrays(faces)["held_out"]
    assert a["images"].shape == (62, 16, 16) and a["images"].dtype == np.uint8
    assert np.array_equal(a["images"], b["images"]) and a["labels"].tolist() == list(range(62))
    assert all(img.max() > 0 for img in a["images"])  # every character drew ink


def test_splits_share_no_typeface():
    faces = json.loads(SHIPPED.read_text())["typefaces"]
    family = {s: {tf["family"] for tf in faces if tf["split"] == s} for s in ("train", "validation", "held_out")}
    assert not family["train"] & family["validation"] and not family["train"] & family["held_out"]
    assert not family["validation"] & family["held_out"]


def test_own_fonts_make_a_custom_split(fonts_data):
    files = fonts_data.package_files("fonts-crosextra-carlito")
    faces = fonts_data.build(fonts=[str(Path(files[0]).parent)])
    assert faces and all(tf.split == "custom" and tf.package == "" for tf, _ in faces)
    with pytest.raises(SystemExit, match="neither a font file nor a folder"):
        fonts_data.build(fonts=["/no/such/font.ttf"])


def test_captions_name_character_and_style():
    fd = load_module()
    assert fd.caption("g", "bold serif") == "the small letter g in a bold serif typeface"
    assert fd.caption("7", "handwritten") == "the digit 7, handwritten"
    assert len(set(fd.CLASS_NAMES)) == 62


def test_shipped_glyph_clip_reads_a_held_out_typeface(fonts_data):
    """models/fonts62-clip (models/train_clip.py --data glyphs, for bench/finetune.py --clip --data glyphs) is a
    CLIPModel folder our loader takes, and it knows the 62 characters of a typeface it never saw (Caladea)."""
    from diffscore.reference.clip_finetune import clip_similarity

    held = fonts_data.arrays(fonts_data.build({"held_out": ["fonts-crosextra-caladea"]}))["held_out"]
    images, labels = list(held["images"][:124]), held["labels"][:124]  # 2 faces x 62 characters
    scores = clip_similarity(MODELS / "fonts62-clip", images, list(fonts_data.CLASS_NAMES))
    assert scores.shape == (124, 62) and (scores.argmax(axis=1) == labels).mean() >= 0.85  # 96 % when trained
