"""The shipped demo model end to end: engine decisions equal the torch reference's, FP16 agrees,
and the CLI works the way a user would run it (output formats, one-line errors)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import diffscore
from diffscore.app.demo import DEMO_LOSS, DEMO_STAGES
from diffscore.app.digits import CLASS_NAMES, DEFAULT_TEMPLATE, load_digits_split

N_HELD_OUT = 120  # the first 120 held-out digits: enough to see a 1% flip rate, quick on 2 cores
OPTS = dict(stages=DEMO_STAGES, loss=DEMO_LOSS, seed=0)


@pytest.fixture(scope="module")
def held_out():
    split = load_digits_split()
    return list(split.test_images[:N_HELD_OUT]), split.test_labels[:N_HELD_OUT]


@pytest.fixture(scope="module")
def reference_results(demo_model, held_out):
    from diffscore.reference.classifier import classify_reference
    from diffscore.reference.loading import load_components

    return classify_reference(load_components(demo_model), held_out[0], list(CLASS_NAMES),
                              templates=[DEFAULT_TEMPLATE], **OPTS)


def test_engine_decisions_equal_reference(demo_engine, held_out, reference_results):
    got = diffscore.load(demo_engine, backend="ort-cpu").classify(held_out[0], list(CLASS_NAMES), **OPTS)
    assert [r.label for r in got] == [r.label for r in reference_results]  # 100% top-1 agreement
    worst = max(abs(sg - sw) / abs(sw) for g, w in zip(got, reference_results)
                for (_, sg), (_, sw) in zip(g.ranking, w.ranking))
    assert worst <= 1e-4
    accuracy = np.mean([CLASS_NAMES.index(r.label) == t for r, t in zip(got, held_out[1])])
    assert accuracy >= 0.95, accuracy


def test_fp16_agrees_with_fp32_reference(demo_engine, held_out, reference_results):
    got = diffscore.load(demo_engine, backend="ort-cpu", precision="fp16").classify(
        held_out[0], list(CLASS_NAMES), **OPTS)
    agreement = np.mean([a.label == b.label for a, b in zip(got, reference_results)])
    assert agreement >= 0.99, agreement


def test_fp16_tensors_within_bound(demo_engine, demo_model):
    from diffscore.engine.manifest import Manifest
    from diffscore.export.parity import tensor_parity
    from diffscore.reference.loading import load_components

    verdicts = tensor_parity(demo_engine, Manifest.load(demo_engine), load_components(demo_model))
    assert all(v.passed for v in verdicts), [str(v) for v in verdicts if not v.passed]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "diffscore.app.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory, held_out):
    folder = tmp_path_factory.mktemp("digits")
    paths = []
    for i, img in enumerate(held_out[0][:3]):
        paths.append(folder / f"digit{i}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


def test_cli_classify_formats(demo_engine, digit_files, reference_results):
    # the reference is compared on ort-cpu (auto may measure openvino faster here: equal only within the parity bound)
    proc = run_cli("classify", demo_engine, *digit_files, "--labels", ",".join(CLASS_NAMES), "--format", "json",
                   "--backend", "ort-cpu")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["label"] for r in rows] == [r.label for r in reference_results[:3]]
    assert all(r["passes"] > 0 and len(r["ranking"]) == 10 for r in rows)
    # each ranking entry says how many timesteps its mean is over (pruned classes saw fewer)
    assert all(len(entry) == 3 and entry[2] >= 1 for r in rows for entry in r["ranking"])
    assert rows[0]["options"]["stages"] == [list(s) for s in DEMO_STAGES] and rows[0]["options"]["seed"] == 0
    proc = run_cli("classify", demo_engine, *digit_files, "--labels", ",".join(CLASS_NAMES), "--format", "csv")
    assert proc.returncode == 0 and proc.stdout.splitlines()[0] == ",".join(
        ["image", "label", "mean_error", "runner_up", "passes", "confidence"]
        + [f"rank{i}{s}" for i in range(1, 11) for s in ("", " score")] + ["options"])


def test_cli_match(demo_engine, digit_files):
    proc = run_cli("match", demo_engine, digit_files[0], "--text", "a handwritten digit one",
                   "--text", "a handwritten digit two", "--timesteps", "3", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)[0]
    # the discffusion preset: 999 - idx, idx in range(10, 990, 1000 // 3)
    assert set(row) == {"image", "best", "scores", "options"} and row["options"]["timesteps"] == [323, 656, 989]
    assert set(row["scores"]) == {"a handwritten digit one", "a handwritten digit two"}


@pytest.mark.parametrize("args,message", [
    (["classify", "{engine}", "missing.png", "--labels", "a,b"], "does not exist"),
    (["classify", "{engine}", "{image}", "--labels", ","], "non-empty"),
    (["classify", "{engine}", "{image}"], "exactly one of --labels"),
    (["classify", "{engine}", "{bad}", "--labels", "a,b"], "cannot read image"),
    (["classify", "{engine}", "{image}", "--labels", "a,b", "--backend", "gpu9"], "'gpu9' is not one of"),
    (["classify", "{engine}", "{image}", "--labels", "a,b", "--stages", "ten"], "not like '50:5,500:1'"),
    (["info", "{old}"], "engine format 0"),
    (["info", "/nonexistent"], "does not exist"),
    (["build-trt", "{engine}"], "TensorRT is not installed"),
])
def test_cli_user_mistakes_are_one_line(demo_engine, digit_files, tmp_path, args, message):
    import shutil

    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    old = shutil.copytree(demo_engine, tmp_path / "old")
    raw = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**raw, "format_version": 0}))
    fill = {"engine": demo_engine, "image": digit_files[0], "bad": bad, "old": old}
    proc = run_cli(*[a.format(**fill) for a in args])
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_cli_demo_runs(tmp_path):
    import os

    proc = subprocess.run([sys.executable, "-m", "diffscore.app.cli", "demo", "--limit", "20"], capture_output=True,
                          text=True, env={**os.environ, "DIFFSCORE_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "Diffusion Classifier" in proc.stdout and "logistic regression" in proc.stdout
