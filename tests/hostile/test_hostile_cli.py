"""A careless or hostile user against every command and the Python API (issue 26, issue 29 "runs lose
nothing"): each mistake is exactly one line on stderr ("error: ..."), no traceback, the documented exit code,
and nothing written outside the case's own folder (the shared demo engine, its parent and the working folder are
compared before and after). Results are never lost: an unreadable image is an error row, an output that cannot
be written is refused before scoring, and one that fails at the end is kept in a fallback file.

In-process on the session's demo engine (tests/conftest.py): no model is exported per case."""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import diffscore
from diffscore.errors import EngineError

LABELS = "zero,one,two"
EITHER = (1, 2)  # a flag combination that is a usage mistake: exit 2 where the CLI classes it so, else 1


def one_line(err: str) -> bool:
    return "Traceback" not in err and len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def snapshot(*folders: Path) -> dict:
    """Every path under the folders, files with their size and mtime: what 'nothing written' is checked against
    (a folder's own mtime may change: the lock and the writability probe come and go)."""
    seen = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            seen.update({str(Path(root) / name): "folder" for name in dirs})
            for name in files:
                st = (Path(root) / name).lstat()
                seen[str(Path(root) / name)] = (st.st_size, st.st_mtime_ns)
    return seen


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """The user cache (backend measurements, the demo engine) in a folder of this module, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFSCORE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory, demo_engine) -> dict:
    """The inputs of the cases: good and bad images, label files, odd paths (FIFO, symlink loop, device link)."""
    root = tmp_path_factory.mktemp("hostile")
    digits = root / "digits"
    digits.mkdir()
    from diffscore.app.digits import load_digits_split

    for i, image in enumerate(load_digits_split().test_images[:3]):
        Image.fromarray(image).save(digits / f"{i}.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("hello")
    (root / "bom.txt").write_bytes("\ufeffzero\none\n".encode("utf-8"))
    (root / "latin1.txt").write_bytes("café\nthé\n".encode("latin-1"))
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("\n  \n")
    (root / "dups.txt").write_text("a\na\n")
    (root / "a_file").write_text("x")
    (root / "a_dir.csv").mkdir()
    (root / "emptydir").mkdir()
    (root / "pairs.jsonl").write_text("not json\n")
    os.mkfifo(root / "fifo.png")
    os.mkfifo(root / "fifo.txt")
    os.mkfifo(root / "fifo.csv")
    os.symlink("loop.png", root / "loop.png")
    os.symlink("nowhere.png", root / "broken.png")
    os.symlink("/dev/full", root / "full.csv")
    return {"root": root, "image": digits / "0.png", "digits": digits, "engine": demo_engine}


def fill(args: list[str], values: dict) -> list[str]:
    """{e}, {i}, ... -> their paths; any other brace (a template's {}) stays as typed."""
    known = re.compile(r"\{(" + "|".join(values) + r")\}")
    return [known.sub(lambda m: str(values[m.group(1)]), a) for a in args]


def _cases():
    """(id, args, exit code(s), words in the message). {r} is the inputs' folder, {e} the engine, {i} an image."""
    c = "classify {e} {i} -l " + LABELS  # cases that load the engine add -b ort-cpu: no backend measurement
    m = "match {e} {i} -t a"
    rows = [
        # output paths: refused before any scoring
        ("-o to a folder", c + " -o {r}/a_dir.csv", 1, "is a folder"),
        ("-o under a file", c + " -o {r}/a_file/out.csv", 1, "is a file, not a folder"),
        ("-o in a missing folder", c + " -o {r}/nodir/out.csv", 1, "does not exist"),
        ("-o unknown extension", c + " -o {w}/out.txt", 1, "unknown extension"),
        ("-o no extension", c + " -o {w}/out", 1, "unknown extension"),
        ("-o a FIFO", c + " -o {r}/fifo.csv", 1, "FIFO"),
        ("-o a link to /dev/full", c + " -o {r}/full.csv", 1, "character device"),
        ("match -o to a folder", m + " -o {r}/a_dir.csv", 1, "is a folder"),
        ("match -o under a file", m + " -o {r}/a_file/x.json", 1, "is a file, not a folder"),
        ("match -o parquet", m + " -o {w}/x.parquet", 1, "unknown extension"),
        ("batch -o under a file", "batch {e} {i} -l a,b -o {r}/a_file/x.jsonl", 1, "is a file, not a folder"),
        ("batch -o to a folder", "batch {e} {i} -l a,b -o {r}/a_dir.csv", 1, "is a folder"),
        ("batch -o csv", "batch {e} {i} -l a,b -o {w}/x.csv", 1, ".parquet or .jsonl"),
        # images
        ("image missing", "classify {e} {r}/nosuch.png -l a,b", 1, "does not exist"),
        ("image a FIFO", "classify {e} {r}/fifo.png -l a,b", 1, "FIFO"),
        ("image a symlink loop", "classify {e} {r}/loop.png -l a,b", 1, "symlink loop"),
        ("image a broken link", "classify {e} {r}/broken.png -l a,b", 1, "broken symlink"),
        ("image a device", "classify {e} /dev/null -l a,b", 1, "character device"),
        ("empty folder", "classify {e} {r}/emptydir -l a,b", 1, "no image files"),
        ("glob matching nothing", "classify {e} {r}/*.nothing -l a,b", 1, "no image files match"),
        ("match image a FIFO", "match {e} {r}/fifo.png -t a", 1, "FIFO"),
        ("profile image a loop", "profile {e} {r}/loop.png -l a,b", 1, "symlink loop"),
        ("image corrupt", "classify {e} {r}/corrupt.png -l a,b", 1, "cannot read image"),
        ("image empty file", "classify {e} {r}/empty.png -l a,b", 1, "cannot read image"),
        ("image is text", "match {e} {r}/text.png -t a", 1, "cannot read image"),
        ("profile image corrupt", "profile {e} {r}/corrupt.png -l a,b", 1, "cannot read image"),
        ("all images unreadable", "classify {e} {r}/corrupt.png {r}/text.png -l a,b -o {w}/x.csv", 1, "none of the 2"),
        # labels and texts
        ("labels duplicate", "classify {e} {i} -b ort-cpu -l a,a", 1, "duplicates"),
        ("labels empty", "classify {e} {i} -b ort-cpu -l ,", 1, "non-empty"),
        ("labels and file", "classify {e} {i} -l a --labels-file {r}/bom.txt", EITHER, "exactly one"),
        ("labels missing", "classify {e} {i}", EITHER, "exactly one"),
        ("labels file latin-1", "classify {e} {i} --labels-file {r}/latin1.txt", 1, "not UTF-8"),
        ("labels file empty", "classify {e} {i} -b ort-cpu --labels-file {r}/empty.txt", 1, "non-empty"),
        ("labels file blank lines", "classify {e} {i} -b ort-cpu --labels-file {r}/blank.txt", 1, "non-empty"),
        ("labels file duplicates", "classify {e} {i} -b ort-cpu --labels-file {r}/dups.txt", 1, "duplicates"),
        ("labels file missing", "classify {e} {i} --labels-file {r}/nosuch.txt", 1, "does not exist"),
        ("labels file a folder", "classify {e} {i} --labels-file {r}/emptydir", 1, "is a folder"),
        ("labels file a FIFO", "classify {e} {i} --labels-file {r}/fifo.txt", 1, "FIFO"),
        ("labels file /dev/full", "classify {e} {i} --labels-file /dev/full", 1, "character device"),
        ("labels file a loop", "classify {e} {i} --labels-file {r}/loop.png", 1, "symlink loop"),
        ("texts none", "match {e} {i}", EITHER, "captions"),
        ("texts duplicate", "match {e} {i} -b ort-cpu -t a -t a", 1, "duplicates"),
        ("texts file latin-1", "match {e} {i} --texts-file {r}/latin1.txt", 1, "not UTF-8"),
        ("texts file a FIFO", "match {e} {i} --texts-file {r}/fifo.txt", 1, "FIFO"),
        ("texts and file", "match {e} {i} -t a --texts-file {r}/bom.txt", EITHER, "captions"),
        # templates, stages, numbers: refused, never replaced by a default
        ("template empty", c + " -b ort-cpu --template=", 1, "exactly one {}"),
        ("template two fields", c + " -b ort-cpu --template {}{}", 1, "exactly one {}"),
        ("template attribute", c + " -b ort-cpu --template {0.x}", 1, "exactly one {}"),
        ("template stray brace", c + " -b ort-cpu --template {", 1, "stray brace"),
        ("template no field", c + " -b ort-cpu --template nothing", 1, "exactly one {}"),
        ("stages empty", c + " --stages=", 2, "--stages"),
        ("stages keep 0", c + " --stages 5:0", 2, "--stages"),
        ("stages one number", c + " --stages 5", 2, "--stages"),
        ("stages words", c + " --stages a:b", 2, "--stages"),
        ("stages keep growing", c + " -b ort-cpu --stages 5:1,10:2", 2, "must not increase"),
        ("seed negative", c + " --seed -1", 2, "--seed"),
        ("seed too big", c + " --seed 99999999999", 2, "--seed"),
        ("seed a word", c + " --seed abc", 2, "--seed"),
        ("batch size 0", c + " --batch-size 0", 2, "--batch-size"),
        ("budget 0", c + " --budget 0", 2, "--budget"),
        ("z nan", c + " -b ort-cpu --strategy race --z nan", 2, "z must be"),
        ("z negative", c + " -b ort-cpu --strategy race --z -1", 2, "z must be"),
        ("z with stages", c + " -b ort-cpu --strategy stages --z 1", EITHER, "--z"),
        ("loss unknown", c + " --loss nope", 2, "--loss"),
        ("backend unknown", c + " -b nope", 2, "--backend"),
        ("format unknown", c + " -f nope", 2, "--format"),
        ("precision int8 missing", c + " -p int8 -b ort-cpu", 2, "no int8 UNet"),
        ("precision bf16 on ort", c + " -p bf16 -b ort-cpu", 2, "openvino"),
        ("timesteps without diffdis", c + " --timesteps 3", EITHER, "--method diffdis"),
        ("head without method head", c + " --head nope", EITHER, "--method head"),
        ("method head, no head", c + " --method head -b ort-cpu", 1, "no trained head"),
        ("method diffdis, none", c + " --method diffdis -b ort-cpu", 1, "no DiffDis"),
        ("match timesteps 10**9", m + " -t b --timesteps 1000000000 -b ort-cpu", 1, "choose 1 to 980"),
        ("match timesteps 981", m + " -t b --timesteps 981 -b ort-cpu", 1, "choose 1 to 980"),
        ("match timesteps 0", m + " --timesteps 0", 2, "--timesteps"),
        ("match bias nan", m + " --bias-weight nan -b ort-cpu", 1, "finite"),
        ("match bias inf", m + " --bias-weight inf -b ort-cpu", 1, "finite"),
        ("match itc none", m + " --method itc -b ort-cpu", 1, "no ITC"),
        ("match bias with itc", m + " --method itc --bias-weight 1", EITHER, "--bias-weight"),
        ("match diffdis mode with dsd", m + " --diffdis-mode denoise", EITHER, "--diffdis-mode"),
        # engines
        ("engine missing", "classify {r}/nosuch {i} -l a,b", 1, "does not exist"),
        ("engine a file", "classify {i} {i} -l a,b", 1, "engine"),
        ("engine no manifest", "info {r}/emptydir", 1, "no manifest.json"),
        ("info csv", "info {e} -f csv", 2, "'table', 'json'"),
        ("info missing", "info {r}/nosuch", 1, "does not exist"),
        ("build-trt no fp16", "build-trt {e} -p int8", 1, "int8"),
        # profile, calibrate, parity
        ("profile one label", "profile {e} {i} -b ort-cpu -l a", 1, "two labels"),
        ("profile grid 1", "profile {e} {i} -l a,b --grid 1", 2, "--grid"),
        ("profile grid 10**5", "profile {e} {i} -b ort-cpu -l a,b --grid 100000", 1, "choose 1 to 1000"),
        ("profile template empty", "profile {e} {i} -b ort-cpu -l a,b --template=", 1, "exactly one {}"),
        ("profile limit 0", "profile {e} {i} -l a,b --limit 0", 2, "--limit"),
        ("calibrate no images", "calibrate {e}", EITHER, "--demo"),
        ("calibrate images and demo", "calibrate {e} {i} --demo", EITHER, "--demo"),
        ("calibrate samples 1", "calibrate {e} --demo --samples 1", 1, "too few"),
        ("calibrate smoothquant 2", "calibrate {e} --demo --smoothquant 2", 1, "(0, 1)"),
        ("calibrate demo wrong labels", "calibrate {e} --demo -l a,b", 2, "does not match"),
        ("calibrate missing engine", "calibrate {r}/nosuch --demo", 1, "does not exist"),
        ("parity labels no images", "parity {e} -l a,b", EITHER, "needs images"),
        ("parity images no labels", "parity {e} {i}", EITHER, "exactly one"),
        # build commands
        ("export int8", "export {model} {w}/eng -p int8", 2, "'fp32', 'fp16'"),
        ("export unknown attention layer", "export {model} {w}/eng --attention-layers nope.attn", 1,
         "not a cross-attention layer"),
        ("export unknown feature block", "export {model} {w}/eng --feature-blocks nope", 1, "not a module"),
        ("export missing model", "export {r}/nosuch {w}/eng", 1, "does not exist"),
        ("export over an engine", "export {model} {e}", 1, "--overwrite"),
        ("export head missing", "export {model} {w}/eng --head-dir {r}/nosuch", 1, "not a trained head"),
        ("train-head no source", "train-head {model}", EITHER, "give exactly one"),
        ("train-head noise steps", "train-head {model} --demo --noise-steps x", EITHER, "--noise-steps"),
        ("train-head data missing", "train-head {model} --data {r}/nosuch --out {w}/h", 1, "does not exist"),
        ("train-head data empty", "train-head {model} --data {r}/emptydir --out {w}/h", 1, "no class subfolders"),
        ("train-prompts data bad", "train-prompts {model} -k 1 --out {w}/t --data {r}/pairs.jsonl", 1, "JSON object"),
        ("train-prompts no source", "train-prompts {model} -k 1 --out {w}/t", EITHER, "give exactly one"),
        ("train-diffdis lr 0", "train-diffdis {model} --out {w}/d --demo --lr 0", EITHER, "--lr"),
        ("finetune objective", "finetune {model} -k 1 --out {w}/f --demo --objectives nope", 1, "objective"),
        ("serve port 0", "serve {e} --port 0", 2, "--port"),
        ("unknown command", "nosuchcommand", 2, "No such command"),
        ("missing argument", "classify", 2, "Missing argument"),
    ]
    return rows


CASES = _cases()


@pytest.mark.parametrize("args,code,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line_and_writes_nothing(run_cli, files, demo_model, tmp_path, monkeypatch, args, code,
                                                  words):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(work))  # a fallback file would show up here
    engine, root = files["engine"], files["root"]
    watched = (engine.parent, root, work)
    before = snapshot(*watched)
    got, err = run_cli(*fill(args.split(), {"e": engine, "i": files["image"], "r": root, "w": work,
                                            "model": demo_model}))
    assert (got in code if isinstance(code, tuple) else got == code), (got, err)
    assert one_line(err) and words in err, err
    assert snapshot(*watched) == before, "something was written or changed"


# --- silently wrong before: now refused, or right ------------------------------------------------------
@pytest.mark.parametrize("kwargs,words", [
    ({"labels": [None, "a"]}, "must be strings"),
    ({"labels": [1, 2]}, "must be strings"),
    ({"template": ""}, "exactly one {}"),
    ({"templates": []}, "non-empty list"),
    ({"templates": "a {}"}, "non-empty list"),
    ({"stages": []}, "stages is empty"),
    ({"seed": 1.0}, "seed"),
    ({"seed": np.float64(2)}, "seed"),
    ({"seed": -1}, "seed"),
    ({"batch_size": np.int64(0)}, "batch_size"),
    ({"strategy": "race", "timesteps": 10**9}, "choose 1 to 1000"),
    ({"images": [np.zeros((8, 8, 5), np.uint8)]}, "C 1 to 4"),
    ({"images": [np.zeros((0, 0), np.uint8)]}, "H, W >= 1"),
    ({"images": [np.zeros((0, 8, 3), np.uint8)]}, "H, W >= 1"),
    ({"images": [Image.new("L", (0, 4))]}, "nothing to score"),
    ({"images": [np.zeros((8, 8), np.float32)]}, "uint8"),
    ({"images": [object()]}, "unsupported image type"),
    ({"images": []}, "no images given"),
], ids=lambda v: repr(v)[:40] if isinstance(v, dict) else None)
def test_api_mistakes_are_one_error(demo_engine, files, kwargs, words):
    kwargs = dict(kwargs)
    images = kwargs.pop("images", [files["image"]])
    labels = kwargs.pop("labels", ["zero", "one"])
    with diffscore.load(demo_engine, backend="ort-cpu") as eng:
        with pytest.raises(EngineError, match=words.replace("(", r"\(").replace(")", r"\)")):
            eng.classify(images, labels, **{"stages": [(2, 1)], **kwargs})


def test_api_paths_closed_engines_and_numpy_integers(demo_engine, files):
    for bad in (None, 5, ["x"]):
        with pytest.raises(EngineError, match="must be the path"):
            diffscore.load(bad)
    eng = diffscore.load(demo_engine, backend="ort-cpu")
    a = eng.classify([files["image"]], ["zero", "one"], stages=[(2, 1)], seed=np.int64(3), batch_size=np.int32(4))
    b = eng.classify([files["image"]], ["zero", "one"], stages=[(2, 1)], seed=3, batch_size=4)
    assert a[0].ranking == b[0].ranking and a[0].options.seed == 3 and type(a[0].options.seed) is int
    from diffscore.kernels.timesteps import dsd_timesteps

    assert len(dsd_timesteps(980)) == 980  # the most DSD's range holds: accepted
    with pytest.raises(EngineError, match="choose 1 to 980"):
        eng.match([files["image"]], ["a", "b"], steps=981)
    eng.close()
    for call in (lambda: eng.classify([files["image"]], ["a", "b"]), lambda: eng.match([files["image"]], ["a"]),
                 lambda: eng.runner("unet")):
        with pytest.raises(EngineError, match="closed"):
            call()


def test_a_byte_order_mark_is_not_part_of_the_first_label(run_cli_out, files):
    code, out, err = run_cli_out("classify", files["engine"], files["image"], "--labels-file",
                                 files["root"] / "bom.txt", "--stages", "2:1", "-b", "ort-cpu", "-f", "json")
    assert code == 0, err
    assert sorted(r[0] for r in json.loads(out)[0]["ranking"]) == ["one", "zero"]


def test_the_prompt_cache_is_bounded(demo_engine):
    """Least recently used prompts leave once the cache passes its byte bound; every answer stays right, even
    for a call with more prompts than fit."""
    from diffscore.engine.conditioning import PromptCache

    prompts = [f"a digit {i}" for i in range(20)]
    with diffscore.load(demo_engine, backend="ort-cpu") as eng:
        full = eng.encode_text(prompts)
        assert len(eng.prompt_cache) == 20  # the default bound (256 MB) holds them all
        eng.prompt_cache = PromptCache(max_bytes=5 * full[0].nbytes)
        calls, original = [], eng.runners["text_encoder"].infer
        eng.runners["text_encoder"].infer = lambda feed: calls.append(len(feed["input_ids"])) or original(feed)
        np.testing.assert_array_equal(eng.encode_text(prompts), full)
        assert len(eng.prompt_cache) == 5 and eng.prompt_cache.nbytes == 5 * full[0].nbytes
        eng.encode_text(["a digit 19"])  # among the 5 most recent: cached
        eng.encode_text(["a digit 0"])  # dropped: encoded again
        assert calls == [20, 1]


def test_the_prompt_cache_bound_comes_from_the_environment(demo_engine, monkeypatch):
    from diffscore.engine.conditioning import PROMPT_CACHE_ENV, PromptCache

    monkeypatch.setenv(PROMPT_CACHE_ENV, "1.5")
    assert PromptCache().max_bytes == int(1.5 * 2**20)
    monkeypatch.setenv(PROMPT_CACHE_ENV, "lots")
    with pytest.raises(EngineError, match=PROMPT_CACHE_ENV):
        diffscore.load(demo_engine, backend="ort-cpu")


# --- runs lose nothing --------------------------------------------------------------------------------
@pytest.fixture
def twenty_and_one(files, tmp_path) -> Path:
    """21 images: 20 readable digits and one corrupt file sorted among them (position 10)."""
    from diffscore.app.digits import load_digits_split

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(load_digits_split().test_images[:20]):
        Image.fromarray(image).save(folder / f"{i + (i >= 10):02d}.png")
    shutil.copyfile(files["root"] / "corrupt.png", folder / "10.png")
    return folder


def test_one_unreadable_image_among_many_is_a_row_not_a_lost_run(run_cli_out, files, twenty_and_one, tmp_path):
    out = tmp_path / "out.csv"
    code, stdout, err = run_cli_out("classify", files["engine"], twenty_and_one, "-l", "zero,one,two,three",
                                    "--stages", "2:1", "-b", "ort-cpu", "-o", out)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: 1 of 21 images could not be read"), err
    rows = list(csv.DictReader(out.open(encoding="utf-8-sig")))
    assert len(rows) == 21 and [r["image"] for r in rows] == [str(twenty_and_one / f"{i:02d}.png") for i in range(21)]
    assert "cannot read image" in rows[10]["error"] and rows[10]["label"] == ""
    assert all(r["error"] == "" and r["label"] in ("zero", "one", "two", "three") for r in rows[:10] + rows[11:])
    # the same labels as a run without the bad file: nothing shifted
    good = sorted(twenty_and_one.glob("*.png"))
    good = [p for p in good if p.name != "10.png"]
    code2, stdout2, _ = run_cli_out("classify", files["engine"], *good, "-l", "zero,one,two,three", "--stages", "2:1",
                                    "-b", "ort-cpu", "-f", "json")
    assert code2 == 0 and [r["label"] for r in json.loads(stdout2)] == [r["label"] for r in rows[:10] + rows[11:]]


def test_match_keeps_every_row_and_a_run_of_only_bad_images_is_one_line(run_cli_out, files, twenty_and_one, tmp_path):
    out = tmp_path / "m.jsonl"
    code, _, err = run_cli_out("match", files["engine"], twenty_and_one, "-t", "a zero", "-t", "a one", "--timesteps",
                               "2", "-b", "ort-cpu", "-f", "json", "-o", out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert code == 1 and len(rows) == 21 and rows[10]["scores"] is None and "cannot read" in rows[10]["error"]
    assert all(r["error"] is None and set(r["scores"]) == {"a zero", "a one"} for r in rows[:10] + rows[11:])
    # nothing readable: nothing to score, one line before the engine is even loaded
    code, stdout, err = run_cli_out("classify", files["engine"], files["root"] / "corrupt.png",
                                    files["root"] / "text.png", "-l", "a,b", "-o", tmp_path / "none.csv")
    assert code == 1 and one_line(err) and "none of the 2 images could be read" in err, err
    assert stdout == "" and not (tmp_path / "none.csv").exists()


def test_profile_learns_from_the_readable_images_and_takes_the_writer_lock(run_cli, files, tmp_path, twenty_and_one):
    from diffscore.engine.manifest import Manifest
    from diffscore.export.atomic import exclusive

    engine = Path(shutil.copytree(files["engine"], tmp_path / "engine"))
    args = ("profile", engine, twenty_and_one, "-l", "zero,one", "--grid", "4", "-b", "ort-cpu")
    with exclusive(engine, "writing"):  # another writer (calibrate, export) holds the engine
        code, err = run_cli(*args)
    assert code == 1 and one_line(err) and "another diffscore process" in err, err
    assert Manifest.load(engine).timestep_profile is None
    code, err = run_cli(*args)
    assert code == 1 and "1 of 21 images could not be read" in err and "learned from the other 20" in err
    assert sorted(Manifest.load(engine).timestep_profile) == [125, 375, 625, 875]
    assert not list(engine.parent.glob(".engine.lock"))


def test_output_that_fails_at_the_end_is_kept_in_a_fallback(run_cli_out, files, tmp_path, monkeypatch):
    """The disk fills up while scoring: the results go to a file beside the asked one, or to stdout."""
    from diffscore.app import runs

    def full(rows, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runs, "write_rows", full)
    out = tmp_path / "r.json"
    args = ("classify", files["engine"], files["digits"], "-l", "zero,one", "--stages", "2:1", "-b", "ort-cpu", "-o",
            out)
    code, _, err = run_cli_out(*args)
    last = err.strip().splitlines()[-1]
    assert code == 1 and "No space left on device" in last and "the 3 rows were written to" in last, err
    kept = Path(last.split("written to ")[1].split(" instead")[0])
    assert kept.parent == tmp_path and [r["image"] for r in json.loads(kept.read_text())] == \
        [str(files["digits"] / f"{i}.png") for i in range(3)]
    kept.unlink()
    monkeypatch.setattr(runs, "fallback_folders", lambda path: [tmp_path / "gone"])
    code, stdout, err = run_cli_out(*args, "-f", "jsonl")
    assert code == 1 and "rows are on stdout" in err.strip().splitlines()[-1]
    assert stdout.count('"image"') == 6 and not list(tmp_path.glob("r.*"))  # printed twice: as asked, then the file


@pytest.fixture
def small_mount(tmp_path):
    """mount(options) -> a tmpfs folder (root with mount rights only: CI runners without them skip)."""
    mounted = []

    def make(options: str) -> Path:
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                                               capture_output=True).returncode:
            pytest.skip("needs root and mount rights for a read-only or full file system")
        mounted.append(target)
        return target

    yield make
    for target in mounted:
        subprocess.run(["umount", str(target)], check=False)


def fill_up(folder: Path) -> None:
    with open(folder / "filler", "wb", buffering=0) as f:
        with pytest.raises(OSError):
            while True:
                f.write(b"\0" * 4096)


@pytest.mark.parametrize("kind", ["read-only", "full"])
def test_read_only_and_full_disks_are_refused_before_the_work(run_cli, files, small_mount, kind):
    """-o into them, and profile / calibrate on an engine in them: one line, before any scoring."""
    out, engine_folder = small_mount("size=64k"), small_mount("size=32m")
    engine = Path(shutil.copytree(files["engine"], engine_folder / "engine"))
    for folder in (out, engine_folder):
        if kind == "full":
            fill_up(folder)
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    words = "read-only file system" if kind == "read-only" else "No space left on device"
    for args in (("classify", files["engine"], files["image"], "-l", "a,b", "-o", out / "out.csv"),
                 ("match", files["engine"], files["image"], "-t", "a", "-o", out / "out.json"),
                 ("profile", engine, files["image"], "-l", "a,b", "--grid", "4", "-b", "ort-cpu"),
                 ("calibrate", engine, "--demo", "--samples", "16", "--validation", "0")):
        code, err = run_cli(*args)
        assert code == 1 and one_line(err) and words.lower() in err.lower(), (args[0], err)


def test_a_damaged_demo_cache_is_rebuilt(monkeypatch, tmp_path, demo_engine):
    """A cached demo engine without its manifest (a crash, a hand edit) is exported again, not an error forever."""
    from diffscore.app import demo
    from diffscore.engine.manifest import folder_sha256

    monkeypatch.setenv("DIFFSCORE_CACHE", str(tmp_path))
    cached = tmp_path / "engines" / f"demo-{folder_sha256(demo.DEMO_MODEL)[:12]}"
    shutil.copytree(demo_engine, cached)
    (cached / "manifest.json").unlink()
    rebuilt = []

    def export_engine(model, out, **options):  # the real export is tested elsewhere: a copy is enough here
        rebuilt.append(out)
        return Path(shutil.copytree(demo_engine, out))

    monkeypatch.setattr("diffscore.export.onnx_export.export_engine", export_engine)
    monkeypatch.setattr(demo, "add_demo_profile", lambda path: path)
    assert demo.demo_engine_dir() == cached and rebuilt == [cached]
    assert (cached / "manifest.json").is_file()
