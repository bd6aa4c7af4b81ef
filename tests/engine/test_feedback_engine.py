"""DifFeed heads on the shipped demo model, end to end: export records them (one graph holding both UNet
passes, the feedback modules and the head), the engine equals torch (tensors and decisions),
Engine.classify(method="head") counts 2 passes per step, and the CLI (`train-head --feedback`, `info`)
works with one-line mistakes."""

import pytest

import diffscore
from diffscore.app.digits import CLASS_NAMES
from diffscore.engine.manifest import Manifest
from diffscore.export.onnx_export import export_engine
from diffscore.export.parity import available_backends, head_decision_parity, head_parity
from diffscore.reference.features import FeatureSpec
from diffscore.reference.head_training import TrainOptions, train_head_on_images
from diffscore.reference.heads import head_logits_reference, load_head, save_head
from diffscore.reference.loading import load_components

N_TRAIN, N_TEST = 120, 24
MIRROR = [["up_blocks.0", "down_blocks.1"], ["up_blocks.1", "down_blocks.0"]]


@pytest.fixture(scope="module")
def fed(demo_model, digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    head, config = train_head_on_images(demo_model, list(digits.train_images[:N_TRAIN]), digits.train_labels[:N_TRAIN],
                                        list(CLASS_NAMES), "difformer",
                                        FeatureSpec(["down_blocks.1", "mid_block"], [50, 200]),
                                        TrainOptions(epochs=2), feedback=[], dim=16, heads=2)
    save_head(head, config, root / "fed")
    return root / "fed"


@pytest.fixture(scope="module")
def engine_dir(demo_model, fed, tmp_path_factory):
    return export_engine(demo_model, tmp_path_factory.mktemp("eng") / "engine", heads=[fed], show_progress=False)


def test_export_records_the_feedback_head(engine_dir):
    import onnx

    m = Manifest.load(engine_dir)
    spec = m.heads["fed"]
    assert spec.feedback == MIRROR and spec.passes_per_step == 2 and spec.steps == [50, 200]
    graph = m.graphs["head.fed"]  # both passes + modules + head: x_t at each step -> logits
    assert [(t.name, t.shape) for t in graph.inputs] == [("sample", ["batch", 2, 1, 8, 8])]
    assert [(t.name, t.shape) for t in graph.outputs] == [("logits", ["batch", 10])]
    model = onnx.load(str(engine_dir / graph.file))
    names = [i.name for i in model.graph.initializer]
    assert len(names) == len(set(names)) and not any("conv_out" in n for n in names)  # pass 1 stops at up_blocks.1
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Relu") == 2  # the two feedback modules (their BatchNorm folded into the 1×1 conv)
    weights = lambda path: sum(t.ByteSize() for t in onnx.load(str(path)).graph.initializer)
    unet = engine_dir / m.graphs["unet"].file
    assert weights(engine_dir / graph.file) < 1.3 * weights(unet)  # both passes share one copy of the UNet weights


def test_feedback_head_graph_ops_are_supported_by_tensorrt(engine_dir):
    from diffscore.export.tensorrt_ops import unsupported_ops

    assert unsupported_ops(engine_dir / Manifest.load(engine_dir).graphs["head.fed"].file) == {}


def test_feedback_head_parity(engine_dir, demo_model, digits):
    m = Manifest.load(engine_dir)
    comp = load_components(demo_model)
    verdicts = head_parity(engine_dir, m, comp)
    backends = len(available_backends(m))
    assert len(verdicts) == 2 * backends and all(v.passed for v in verdicts), [str(v) for v in verdicts]
    decisions = head_decision_parity(engine_dir, m, comp, list(digits.test_images[:N_TEST]))
    assert [v.measured for v in decisions] == [1.0] * backends, [str(v) for v in decisions]


def test_classify_counts_two_passes_per_step(engine_dir, demo_model, fed, digits):
    eng = diffscore.load(engine_dir, backend="ort-cpu")
    images = list(digits.test_images[:N_TEST])
    got = eng.classify(images, method="head")
    head, config = load_head(fed)
    want = head_logits_reference(load_components(demo_model), head, config, images).numpy()
    assert [r.label for r in got] == [CLASS_NAMES[i] for i in want.argmax(1)]
    assert all(r.passes == 4 for r in got)  # 2 noise steps × 2 UNet passes


def test_cli_train_feedback_head_and_info(demo_model, digit_folder, engine_dir, tmp_path, monkeypatch, run_cli_out):
    monkeypatch.setenv("DIFFSCORE_CACHE", str(tmp_path))
    code, out, err = run_cli_out("train-head", demo_model, "--data", digit_folder, "--kind", "linear", "--blocks",
                                 "mid_block", "--noise-steps", "100", "--epochs", "1", "--feedback", "--feedback-pairs",
                                 "up_blocks.1:down_blocks.0", "--out", tmp_path / "h")
    assert code == 0, err
    assert "DifFeed: up_blocks.1:down_blocks.0 fed back" in out
    config = load_head(tmp_path / "h")[1]
    assert config.feedback.pairs == [["up_blocks.1", "down_blocks.0"]] and config.feedback.channels == [[32, 32]]
    code, out, err = run_cli_out("info", engine_dir)
    assert code == 0, err
    assert "DifFeed feedback up_blocks.0:down_blocks.1, up_blocks.1:down_blocks.0, 2 UNet passes per step" in out


@pytest.mark.parametrize("args,exit_code,message", [
    (["--feedback-pairs", "up_blocks.0:down_blocks.1"], 2, "--feedback-pairs needs --feedback"),
    (["--feedback", "--feedback-pairs", "up_blocks.0"], 1, "is not SOURCE:TARGET"),
    (["--feedback", "--feedback-pairs", "down_blocks.0:up_blocks.0"], 1, "from a later block to an earlier one"),
    (["--feedback", "--blocks", "down_blocks.0", "--feedback-pairs", "up_blocks.0:down_blocks.1"], 1, "cannot reach"),
])
def test_cli_feedback_mistakes_are_one_line(demo_model, tmp_path, monkeypatch, run_cli, args, exit_code, message):
    monkeypatch.setenv("DIFFSCORE_CACHE", str(tmp_path))
    code, stderr = run_cli("train-head", demo_model, "--demo", *args, "--out", tmp_path / "h")
    assert code == exit_code and "Traceback" not in stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "h").exists()
