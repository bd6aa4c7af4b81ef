"""Batch scoring with Ray Data (diffscore.app.scale, `diffscore batch`): the same answers as the
in-process Engine on the same images and seed, nothing lost when an actor dies, one line per mistake."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

import diffscore
from diffscore.app.digits import CLASS_NAMES

LABELS = list(CLASS_NAMES)
STAGES = [(4, 2), (8, 1)]  # cheap: 10·4 + 2·4 = 48 UNet passes per image
SEED = 3
# Scores are compared exactly, so both sides run one backend: auto measures per thread count, and an actor
# with fewer threads than this process may pick another runtime (equal only within the parity bound).
BACKEND = "ort-cpu"


@pytest.fixture(scope="module")
def engine(scale_engine):
    return diffscore.load(scale_engine, backend=BACKEND)


@pytest.fixture(scope="module")
def expected(engine, digit_files):
    return engine.classify(digit_files[1], LABELS, stages=STAGES, seed=SEED)


def assert_same(rows: list[dict], results) -> None:
    """Rows from Ray equal Engine.classify's results: label, the whole ranking (scores exactly), passes."""
    assert len(rows) == len(results)
    for i, (row, r) in enumerate(zip(rows, results)):
        ranking = [(x["label"], x["score"]) for x in row["ranking"]]
        assert (row["label"], ranking, row["passes"]) == (r.label, [(c, float(s)) for c, s in r.ranking], r.passes), i


def test_cli_batch_equals_engine(ray_session, run_cli, scale_engine, digit_files, expected, tmp_path):
    """A folder through 2 actors (batches of 5) into Parquet; an unreadable file is a row with an error."""
    import pyarrow.parquet as pq

    folder = tmp_path / "images"
    shutil.copytree(digit_files[0], folder)
    (folder / "zz-broken.png").write_bytes(b"not a png")
    output = tmp_path / "results.parquet"
    code, err = run_cli("batch", scale_engine, folder, "--labels", ",".join(LABELS), "--stages", "4:2,8:1",
                        "--seed", SEED, "-o", output, "--backend", BACKEND, "--actors", 2, "--cpus-per-actor", 0.5,
                        "--batch-images", 5)
    assert code == 0, err
    rows = pq.read_table(output).to_pylist()
    assert [r["path"] for r in rows] == sorted(str(p) for p in folder.iterdir())  # input order kept
    broken = rows.pop()
    assert broken["label"] is None and broken["ranking"] is None and "cannot read image" in broken["error"]
    assert all(r["error"] is None for r in rows)
    assert_same(rows, expected)
    assert not list(tmp_path.glob(".*partial"))


def test_head_and_match_on_a_ray_dataset(ray_session, engine, scale_engine, digit_files):
    """A Ray Dataset with an image column (uint8 arrays) and an id column, which the rows keep."""
    from diffscore.app.scale import classify_dataset, match_dataset

    images = digit_files[1]
    dataset = ray_session.data.from_items([{"id": i, "image": im} for i, im in enumerate(images)])
    rows = classify_dataset(dataset, scale_engine, method="head", batch_images=5, num_cpus=0.5,
                            backend=BACKEND).take_all()
    assert [r["id"] for r in rows] == list(range(len(images)))
    assert_same(rows, engine.classify(images, method="head"))

    texts = ["a handwritten digit one", "a handwritten digit seven", "a cat"]
    rows = match_dataset(dataset, scale_engine, texts, steps=2, seed=SEED, batch_images=5, num_cpus=0.5,
                         backend=BACKEND).take_all()
    scores = np.asarray(engine.match(images, texts, steps=2, seed=SEED))
    np.testing.assert_array_equal(np.array([r["scores"] for r in rows]), scores)
    assert [r["best"] for r in rows] == [texts[j] for j in scores.argmax(axis=1)]


def test_a_killed_actor_is_restarted_and_nothing_is_lost(ray_session, scale_engine, digit_files, expected, tmp_path):
    """The first batch's actor ends its process (os._exit, via the test hook); Ray restarts the actor,
    retries the batch, and the JSONL file has every image, each equal to the in-process answer."""
    from diffscore.app.scale import CRASH_ONCE_ENV, classify_dataset, write_results

    marker = tmp_path / "crashed"
    dataset = classify_dataset(digit_files[0], scale_engine, LABELS, stages=STAGES, seed=SEED, batch_images=4,
                               backend=BACKEND,
                               num_cpus=0.5, ray_options={"runtime_env": {"env_vars": {CRASH_ONCE_ENV: str(marker)}}})
    assert write_results(dataset, tmp_path / "results.jsonl") == (len(expected), 0)
    assert marker.exists(), "no actor crashed: the test hook did not fire"
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert_same(rows, expected)


def test_an_engine_error_in_an_actor_is_one_line(ray_session, run_cli, scale_engine, digit_files, tmp_path):
    """Options the engine refuses fail inside the actors; the CLI still shows one line, writes nothing."""
    code, err = run_cli("batch", scale_engine, digit_files[0], "--labels", "a,b", "--template", "{} {}",
                        "--batch-images", 12, "--cpus-per-actor", 0.5, "-o", tmp_path / "r.parquet")
    assert code == 1 and "exactly one {}" in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_batch_mistakes_are_one_line(run_cli, scale_engine, digit_files, tmp_path, monkeypatch):
    """Checked before Ray starts (no Ray needed), and a missing Ray says how to install it."""
    folder = digit_files[0]
    cases = [
        ((scale_engine, tmp_path / "nowhere", "--labels", "a,b", "-o", tmp_path / "r.parquet"), "does not exist"),
        ((scale_engine, folder, "--labels", "a,b", "-o", tmp_path / "r.csv"), "must end in .parquet or .jsonl"),
        ((scale_engine, folder, "--labels", "a,a", "-o", tmp_path / "r.parquet"), "duplicates"),
        ((tmp_path, folder, "--labels", "a,b", "-o", tmp_path / "r.parquet"), "not an engine directory"),
        ((scale_engine, folder, "--labels", "a,b", "--actors", 0, "-o", tmp_path / "r.parquet"), "must be ≥ 1"),
    ]
    for args, message in cases:
        code, err = run_cli("batch", *args)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the ray extra were not installed
    for command in (("batch", scale_engine, folder, "--labels", "a,b", "-o", tmp_path / "r.parquet"),
                    ("serve", scale_engine)):
        code, err = run_cli(*command)
        assert code == 1 and "pip install 'diffscore[ray]'" in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("r.*"))


def test_encoded_bytes_get_the_checks_of_a_file():
    """A dataset's encoded bytes are read like a file given to the CLI: a decompression bomb and a format outside
    the image suffixes (an EPS, whose Pillow decoder runs Ghostscript) are error rows, a PNG is read as itself."""
    import io

    from PIL import Image

    from diffscore.app.scale import _read_images

    def encoded(im, fmt: str) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        return buf.getvalue()

    digit = np.arange(64, dtype=np.uint8).reshape(8, 8)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    images, errors = _read_images({"bytes": [encoded(Image.fromarray(digit), "PNG"),
                                             encoded(Image.new("1", (12_000, 12_000)), "PNG"), eps, b"junk"]})
    assert np.array_equal(np.asarray(images[0]), digit) and errors[0] is None
    assert images[1:] == [None] * 3
    assert "more pixels than the limit of 89,478,485" in errors[1]
    assert all("cannot read image bytes: not an image in a known format (PNG, JPEG, BMP, GIF, WEBP, TIFF)" in e
               for e in errors[2:]), errors

