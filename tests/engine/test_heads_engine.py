"""Trained heads on the shipped demo model, end to end: export records them (one graph: the UNet layers
a head reads + the head), the engine's head path equals torch (tensors and decisions), Engine.classify(method="head") \
and the CLI
(`train-head`, `classify --method head`) work, and user mistakes are one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import diffscore
from diffscore.app.digits import CLASS_NAMES, load_digits_split
from diffscore.errors import EngineError
from diffscore.engine.manifest import Manifest
from diffscore.export.onnx_export import export_engine
from diffscore.export.parity import available_backends, head_decision_parity, head_parity
from diffscore.reference.features import FeatureSpec
from diffscore.reference.head_training import TrainOptions, train_head_on_images
from diffscore.reference.heads import head_logits_reference, load_head, save_head
from diffscore.reference.loading import load_components

N_TRAIN, N_TEST = 300, 60  # a slice of the demo's training split; the first held-out digits
SPEC = FeatureSpec(["mid_block", "up_blocks.0"], [50, 200])


@pytest.fixture(scope="module")
def heads(demo_model, digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    images, labels = list(digits.train_images[:N_TRAIN]), digits.train_labels[:N_TRAIN]
    for name, kind, epochs in (("probe", "linear", 30), ("fusion", "difformer", 2)):
        head, config = train_head_on_images(demo_model, images, labels, list(CLASS_NAMES), kind, SPEC,
                                            TrainOptions(epochs=epochs), cache_dir=root / "cache", dim=16, heads=2)
        save_head(head, config, root / name)
    return root


@pytest.fixture(scope="module")
def engine_dir(demo_model, heads, tmp_path_factory):
    return export_engine(demo_model, tmp_path_factory.mktemp("eng") / "engine",
                         heads=[heads / "probe", heads / "fusion"], show_progress=False)


def test_features_are_cached(heads):
    assert len(list((heads / "cache").glob("*.safetensors"))) == 1  # extracted once for both heads


def test_export_records_heads(engine_dir):
    m = Manifest.load(engine_dir)
    assert set(m.heads) == {"probe", "fusion"}
    probe = m.heads["probe"]
    assert probe.labels == list(CLASS_NAMES) and probe.steps == [50, 200] and probe.kind == "linear"
    graph = m.graphs["head.probe"]  # the UNet layers the head reads + the head: x_t at each step -> logits
    assert [(t.name, t.shape) for t in graph.inputs] == [("sample", ["batch", 2, 1, 8, 8])]
    assert [(t.name, t.shape) for t in graph.outputs] == [("logits", ["batch", 10])]
    assert m.feature_blocks == [] and (engine_dir / "head.probe.safetensors").is_file() and m.verify(engine_dir) == []


def test_head_graph_skips_the_unet_layers_after_the_blocks_it_reads(engine_dir):
    import onnx

    names = lambda g: {i.name
                       for i in onnx.load(str(engine_dir / Manifest.load(engine_dir).graphs[g].file)).graph.initializer}
    head, unet = names("head.probe"), names("unet")
    assert any("down_blocks" in n for n in head) and not any("up_blocks.1" in n or "conv_out" in n for n in head)
    assert any("up_blocks.1" in n for n in unet)


def test_head_graph_ops_are_supported_by_tensorrt(engine_dir):
    from diffscore.export.tensorrt_ops import unsupported_ops

    m = Manifest.load(engine_dir)
    for name in m.heads:
        assert unsupported_ops(engine_dir / m.graphs[f"head.{name}"].file) == {}, name


def test_head_parity(engine_dir, demo_model):
    m = Manifest.load(engine_dir)
    comp = load_components(demo_model)
    verdicts = head_parity(engine_dir, m, comp)
    backends = len(available_backends(m))  # ort-cpu, and openvino where it is installed
    # per head and backend: its graph on random x_t, the whole path on real digits
    assert len(verdicts) == 2 * 2 * backends
    assert all(v.passed for v in verdicts), [str(v) for v in verdicts if not v.passed]
    decisions = head_decision_parity(engine_dir, m, comp, list(load_digits_split().test_images[:N_TEST]))
    assert [v.measured for v in decisions] == [1.0, 1.0] * backends and all(decisions), [str(v) for v in decisions]


def test_classify_with_a_head(engine_dir, demo_model, digits, heads):
    eng = diffscore.load(engine_dir, backend="ort-cpu")
    images, truth = list(digits.test_images[:N_TEST]), digits.test_labels[:N_TEST]
    got = eng.classify(images, method="head", head="probe")
    head, config = load_head(heads / "probe")
    want = head_logits_reference(load_components(demo_model), head, config, images).numpy()
    assert [r.label for r in got] == [CLASS_NAMES[i] for i in want.argmax(1)]
    assert all(r.passes == 2 and len(r.ranking) == 10 for r in got)
    assert all(abs(sum(p for _, p in r.ranking) - 1) < 1e-6 and r.ranking[0][1] >= r.ranking[1][1] for r in got)
    assert np.mean([CLASS_NAMES.index(r.label) == t for r, t in zip(got, truth)]) >= 0.9
    # a real confidence: the winner's logit lead over the runner-up, log(p1 / p2) of torch's own logits
    lead = [np.sort(row)[-1] - np.sort(row)[-2] for row in want]
    np.testing.assert_allclose([r.confidence for r in got], lead, rtol=1e-3, atol=1e-4)
    same = eng.classify(images[:3], list(reversed(CLASS_NAMES)), method="head", head="probe")  # same set: fine
    assert [r.label for r in same] == [r.label for r in got[:3]]


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="head"), "several heads"),
    (dict(method="head", head="nope"), "no head 'nope'"),
    (dict(method="head", head="probe", labels=["cat", "dog"]), "was trained on the labels"),
    (dict(method="knn"), "unknown method"),
    (dict(), "needs labels"),
])
def test_head_mistakes(engine_dir, digits, kwargs, message):
    eng = diffscore.load(engine_dir, backend="ort-cpu")
    with pytest.raises(EngineError, match=message):
        eng.classify(list(digits.test_images[:1]), **kwargs)


def test_engine_without_heads_says_how_to_make_one(demo_model, tmp_path, digits):
    eng = diffscore.load(export_engine(demo_model, tmp_path / "plain", show_progress=False), backend="ort-cpu")
    with pytest.raises(EngineError, match="train-head"):
        eng.classify(list(digits.test_images[:1]), method="head")


def test_export_refuses_a_head_of_another_model(demo_model, heads, tmp_path):
    import shutil

    other = shutil.copytree(heads / "probe", tmp_path / "other")
    raw = json.loads((other / "head.json").read_text())
    (other / "head.json").write_text(json.dumps({**raw, "source_sha256": "0" * 64}))
    with pytest.raises(EngineError, match="trained on another model"):
        export_engine(demo_model, tmp_path / "e", heads=[other], show_progress=False)


def test_export_refuses_heads_with_adapters(demo_model, heads, tmp_path):
    with pytest.raises(EngineError, match="without --adapters"):
        export_engine(demo_model, tmp_path / "e", heads=[heads / "probe"], adapters=tmp_path, show_progress=False)


def run_cli_process(*args, env=None):
    return subprocess.run([sys.executable, "-m", "diffscore.app.cli", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})


def test_cli_train_head_and_classify(demo_model, digit_folder, engine_dir, tmp_path):
    proc = run_cli_process("train-head", demo_model, "--data", digit_folder, "--kind", "linear", "--blocks",
                           "mid_block", "--noise-steps", "100", "--epochs", "3", "--out", tmp_path / "h",
                           env={"DIFFSCORE_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "h" / "head.json").read_text())
    assert config["labels"] == sorted(CLASS_NAMES) and config["features"]["steps"] == [100]
    assert (tmp_path / "h" / "head.safetensors").is_file() and list((tmp_path / "features").glob("*.safetensors"))
    files = sorted(digit_folder.rglob("*.png"))[:2]
    proc = run_cli_process("classify", engine_dir, *files, "--method", "head", "--head", "probe", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["passes"] for r in rows] == [2, 2] and all(r["label"] in CLASS_NAMES and "probability" in r for r in rows)


@pytest.mark.parametrize("args,exit_code,message", [
    (["--data", "{empty}"], 1, "no class subfolders"),
    (["--data", "{folder}", "--blocks", "middle"], 1, "unknown block 'middle'"),
    (["--data", "{folder}", "--noise-steps", "fifty"], 2, "not like '50,200'"),
    (["--data", "{folder}", "--noise-steps", "5000"], 1, "outside [0, 1000)"),
    (["--data", "{folder}", "--kind", "knn"], 2, "'knn' is not one of"),
    (["--data", "{folder}", "--kind", "attention", "--blocks", "mid_block,up_blocks.0", "--noise-steps", "50"], 1,
     "one block at one step"),
    ([], 2, "exactly one of --data FOLDER, --demo, --synthesize N or --pseudo-label ENGINE --data FOLDER"),
])
def test_cli_train_head_mistakes_are_one_line(demo_model, digit_folder, tmp_path, monkeypatch, run_cli, args, exit_code,
                                              message):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("DIFFSCORE_CACHE", str(tmp_path))
    code, stderr = run_cli("train-head", demo_model,
                           *[a.format(empty=tmp_path / "empty", folder=digit_folder) for a in args],
                           "--out", tmp_path / "h")
    assert code == exit_code and "Traceback" not in stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
