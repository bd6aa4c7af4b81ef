"""A careless or hostile user against the demo engine (issue 13): every case is one line on stderr, no
traceback, the right exit code, and nothing lost or half-written — no file outside the engine is read
or removed, no directory replaced without --overwrite on an engine, no temporary folder left."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import diffscore
from diffscore.errors import EngineError


@pytest.fixture
def engine(demo_engine, tmp_path) -> Path:
    """A private copy of the demo engine (cases edit it)."""
    return Path(shutil.copytree(demo_engine, tmp_path / "engine"))


@pytest.fixture
def victim(tmp_path) -> Path:
    """A user's file outside the engine that nothing may read or remove."""
    path = tmp_path / "precious.txt"
    path.write_text("user data")
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "d.png"
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(path)
    return path


def edit_manifest(engine: Path, change) -> None:
    raw = json.loads((engine / "manifest.json").read_text())
    change(raw)
    (engine / "manifest.json").write_text(json.dumps(raw))


def fill(args: list[str], **values) -> list[str]:
    """Put paths into {name} placeholders (str.replace: user text such as a template keeps its braces)."""
    out = []
    for a in args:
        for k, v in values.items():
            a = a.replace("{" + k + "}", str(v))
        out.append(a)
    return out


def one_line(err: str) -> bool:
    return "Traceback" not in err and len(err.strip().splitlines()) == 1 and err.startswith("error: ")


# (what the user did to the engine or passed, the CLI call, exit code, words of the message)
MANIFEST_CASES = {
    "plan with an absolute path (calibrate would delete it)": (
        lambda e, v: edit_manifest(e, lambda m: m["plans"].update({"x": {
            "file": str(v), "graph": "unet", "gpu": "g", "tensorrt_version": "10", "precision": "int8",
            "min_batch": 1, "opt_batch": 1, "max_batch": 1, "sha256": "0" * 64, "size": 1}})),
        ["calibrate", "{engine}", "--demo", "--samples", "16", "--validation", "0"], 1,
        "not inside the engine directory"),
    "graph file ../../x": (lambda e, v: edit_manifest(e, lambda m: m["graphs"]["unet"].update(file="../../x")),
                           ["info", "{engine}"], 1, "not inside the engine directory"),
    "graph file /etc/passwd": (lambda e, v: edit_manifest(e, lambda m: m["graphs"]["unet"].update(file="/etc/passwd")),
                               ["info", "{engine}", "--verify"], 1, "not inside the engine directory"),
    "external data outside": (lambda e, v: edit_manifest(e, lambda m: m["graphs"]["unet"].update(data_files=[str(v)])),
                              ["classify", "{engine}", "{image}", "--labels", "a,b"], 1,
                              "not inside the engine directory"),
    "tokenizer outside": (lambda e, v: edit_manifest(e, lambda m: m.update(tokenizer="../precious.txt")),
                          ["info", "{engine}"], 1, "not inside the engine directory"),
    "symlinked graph pointing outside": (
        lambda e, v: ((e / "unet.onnx").unlink(), os.symlink(v, e / "unet.onnx")),
        ["info", "{engine}"], 1, "not inside the engine directory"),
    "tampered tokenizer": (lambda e, v: (e / "tokenizer.json").write_text((e / "tokenizer.json").read_text()
                                                                          .replace("</w>", "</v>", 1)),
                           ["info", "{engine}", "--verify"], 1, "sha256 mismatch in tokenizer.json"),
    "manifest not UTF-8": (lambda e, v: (e / "manifest.json").write_bytes(b"\xff\xfe{}"),
                           ["info", "{engine}"], 1, "not UTF-8"),
    "manifest not an object": (lambda e, v: (e / "manifest.json").write_text("[1, 2]"),
                               ["info", "{engine}"], 1, "not an object"),
    "image_size 0": (lambda e, v: edit_manifest(e, lambda m: m.update(image_size=0)),
                     ["info", "{engine}"], 1, "image_size is 0"),
    "older format": (lambda e, v: edit_manifest(e, lambda m: m.update(format_version=1)),
                     ["info", "{engine}"], 1, "re-export it"),
    "corrupt tokenizer.json": (
        lambda e, v: ((e / "tokenizer.json").write_text("{not json"),
                      edit_manifest(e, lambda m: m["files"]["tokenizer.json"].update(size=9))),
        ["classify", "{engine}", "{image}", "--labels", "a,b"], 1, "not a tokenizer"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES), ids=list(MANIFEST_CASES))
def test_damaged_or_hostile_engines(run_cli, engine, victim, image, case):
    damage, args, code, words = MANIFEST_CASES[case]
    damage(engine, victim)
    got, err = run_cli(*fill(args, engine=engine, image=image))
    assert got == code and one_line(err) and words in err, err
    assert victim.read_text() == "user data", "a file outside the engine was touched"
    assert not list(engine.glob(".calibrate-*")) and not list(engine.parent.glob(".engine.*"))


def test_a_swapped_graph_is_refused_at_load(engine, image):
    """Another valid ONNX (the text encoder) in the UNet's place, sizes and hashes made to match: its
    signature differs from the manifest's, so loading refuses it instead of broadcasting wrong outputs."""
    shutil.copyfile(engine / "text_encoder.onnx", engine / "unet.onnx")
    edit_manifest(engine, lambda m: m["graphs"]["unet"].update(size=(engine / "unet.onnx").stat().st_size))
    with pytest.raises(EngineError, match="not the graph this engine was exported with"):
        diffscore.load(engine, backend="ort-cpu")


def test_output_shapes_are_checked_on_first_use(engine):
    from diffscore.engine.backends.base import check_outputs
    from diffscore.engine.manifest import Manifest

    spec = Manifest.load(engine).graphs["unet"]
    good = {t.name: np.zeros([2 if d == "batch" else d for d in t.shape], t.dtype) for t in spec.outputs}
    assert set(good) == {"eps", "attn_scores"}
    check_outputs(good, spec.outputs, "unet", 2)
    with pytest.raises(EngineError, match="output attn_scores"):
        check_outputs({**good, "attn_scores": np.zeros((2, 1), np.float32)}, spec.outputs, "unet", 2)


USER_MISTAKES = [
    (["classify", "{engine}", "{image}", "--labels", "a,b", "--batch-size", "-1"], 2, "--batch-size"),
    (["match", "{engine}", "{image}", "--text", "a", "--bias-weight", "nan"], 1, "bias_weight must be a finite"),
    (["classify", "{engine}", "{image}", "--labels", "cat,cat "], 1, "duplicates"),
    (["classify", "{engine}", "{image}", "--labels", "a b c d e f g h i j k l m n o p q r x,"
      "a b c d e f g h i j k l m n o p q r y"], 1, "give the same tokens"),
    (["calibrate", "{engine}", "--demo", "--validation", "-5"], 2, "--validation"),
    (["demo", "--limit", "-1"], 2, "--limit"),
    (["match", "{engine}", "{image}", "--text", "a", "--timesteps", "0"], 2, "--timesteps"),
    (["classify", "{engine}", "{image}", "--labels", "a,b", "--template", "{"], 1, "stray brace"),
    (["classify", "{engine}", "{image}", "--labels", "a,b", "--template", "{x}"], 1, "exactly one {}"),
    (["classify", "{engine}", "{image}", "--labels", "a,b", "--template", "{0} {1}"], 1, "exactly one {}"),
    (["classify", "{engine}", "{image}", "--labels", "a,b", "--template", "no field"], 1, "exactly one {}"),
    (["classify", "{engine}", "{image}", "--labels", "a,b", "--seed", "-3"], 2, "--seed"),
    (["classify", "{engine}", "{image}", "--labels-file", "{latin1}"], 1, "not UTF-8"),
    (["train-prompts", "{engine}", "--demo", "--shots", "1", "--out", "{tmp}/run", "--batch-size", "0"], 2,
     "--batch-size"),
]


@pytest.mark.parametrize("args,code,words", USER_MISTAKES, ids=[" ".join(a[:1] + a[3:]) for a, *_ in USER_MISTAKES])
def test_user_mistakes(run_cli, demo_engine, image, tmp_path, args, code, words):
    (tmp_path / "latin1.txt").write_bytes("café\nthé\n".encode("latin-1"))
    got, err = run_cli(*fill(args, engine=demo_engine, image=image, latin1=tmp_path / "latin1.txt", tmp=tmp_path))
    assert got == code and one_line(err) and words in err, err


def test_api_validates_like_the_cli(demo_engine, image):
    with diffscore.load(demo_engine, backend="ort-cpu") as eng:
        for kwargs, words in [({"batch_size": 0}, "batch_size"), ({"seed": -1}, "seed"), ({"template": "{} {}"}, "{}"),
                              ({"seed": 2**40}, "seed")]:
            with pytest.raises(EngineError, match=words):
                eng.classify([image], ["a", "b"], stages=[(2, 1)], **kwargs)
        with pytest.raises(EngineError, match="finite"):
            eng.match([image], ["a"], bias_weight=float("inf"))
        with pytest.raises(EngineError, match="steps"):
            eng.match([image], ["a"], steps=0)


# --- writes that lose nothing ------------------------------------------------------------------------
def test_overwrite_replaces_only_engines(run_cli, demo_model, tmp_path, victim):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    code, err = run_cli("export", demo_model, folder, "--overwrite")
    assert code == 1 and one_line(err) and "not a diffscore engine directory" in err
    code, err = run_cli("export", demo_model, victim, "--overwrite")
    assert code == 1 and one_line(err) and victim.read_text() == "user data"
    code, err = run_cli("export", demo_model, folder)
    assert code == 1 and "--overwrite" in err and (folder / "notes.txt").read_text() == "keep me"


def test_one_writer_at_a_time_and_the_loser_replaces_nothing(tmp_path):
    from diffscore.export.atomic import build_dir, exclusive

    out = tmp_path / "eng"
    with exclusive(out):  # another process is writing OUT
        with pytest.raises(EngineError, match="another diffscore process is writing"):
            with build_dir(out):
                pass
    with pytest.raises(EngineError, match="written by another process meanwhile"):
        with build_dir(out) as tmp:
            (tmp / "manifest.json").write_text("{}")
            out.mkdir()  # the other writer finished first
            (out / "manifest.json").write_text('{"winner": true}')
    assert json.loads((out / "manifest.json").read_text()) == {"winner": True}
    assert [p.name for p in tmp_path.iterdir()] == ["eng"], "no temporary folder or lock file left"


def test_stale_temporary_folders_are_removed(tmp_path):
    from diffscore.export.atomic import build_dir

    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    stale = tmp_path / f".eng.partial-{dead}-abc"
    stale.mkdir()
    mine = tmp_path / f".eng.partial-{os.getpid()}-keep"  # a live process's: left alone
    mine.mkdir()
    with build_dir(tmp_path / "eng") as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert not stale.exists() and mine.exists() and (tmp_path / "eng" / "manifest.json").is_file()


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_export_cleans_up(demo_model, tmp_path, sig, code):
    out = tmp_path / "eng"
    # SIGINT at its default in the child: a suite started in the background (`make test &`) ignores SIGINT, and
    # Python then installs no Ctrl-C handler in the processes it starts (as a shell's background job would want)
    proc = subprocess.Popen([sys.executable, "-m", "diffscore.app.cli", "export", str(demo_model), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".eng.partial-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir()), list(tmp_path.iterdir())


def test_a_full_or_read_only_disk_is_one_line(run_cli, demo_model, tmp_path):
    if os.geteuid() == 0:  # root writes through permissions: use a path whose parent is a file instead
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = blocker / "eng"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "eng"
    code, err = run_cli("export", demo_model, out)
    assert code == 1 and one_line(err) and "nothing was written" in err, err
