"""Calibration and INT8: the calibration set is the scoring workload's own UNet inputs, the Q/DQ graph
quantizes what it should (and nothing TensorRT cannot parse), the decision gate holds and catches a
broken UNet, and bad input is one line. Small on purpose: 32 samples, a dozen validation digits."""


import numpy as np
import onnx
import pytest

import diffscore
from diffscore.calibration import dataset, quantize, sensitivity
from diffscore.calibration.pipeline import calibrate
from diffscore.app.demo import DEMO_LOSS, DEMO_STAGES
from diffscore.app.digits import CLASS_NAMES, DEFAULT_TEMPLATE, load_digits_split, training_images
from diffscore.engine.manifest import Manifest, sha256_files
from diffscore.export.onnx_export import export_engine
from diffscore.kernels import add_noise, dsd_timesteps, shared_noise, stage_timesteps

SAMPLES, VALIDATION = 32, 10
LABELS = list(CLASS_NAMES)


@pytest.fixture(scope="module")
def engine_dir(demo_model, tmp_path_factory):
    return export_engine(demo_model, tmp_path_factory.mktemp("cal") / "engine", show_progress=False,
                         defaults={"template": DEFAULT_TEMPLATE, "stages": [list(s) for s in DEMO_STAGES],
                                   "loss": DEMO_LOSS})


@pytest.fixture(scope="module")
def calibrated(engine_dir):
    return calibrate(engine_dir, images=training_images(), labels=list(CLASS_NAMES), source="demo training digits",
                     samples=SAMPLES, validation=VALIDATION, seed=0)


@pytest.fixture(scope="module")
def train_digits():
    return list(load_digits_split().train_images[:8])


def test_calibration_set_is_the_workloads_inputs(engine_dir, train_digits):
    engine = diffscore.load(engine_dir, backend="ort-cpu")
    cal = dataset.collect(engine, train_digits, LABELS, SAMPLES, seed=3)
    assert cal.sample.shape == (SAMPLES, 1, 8, 8) and cal.sample.dtype == np.float32
    assert cal.embeddings.shape == (10, 16, 32) and cal.timestep.shape == (SAMPLES,)
    np.testing.assert_array_equal(cal.embeddings, engine.encode_text([DEFAULT_TEMPLATE.format(x) for x in LABELS]))
    # timesteps come from the classifier's staged grid (or DSD's), with that timestep's shared noise row
    grid = [t for ts in stage_timesteps(DEMO_STAGES) for t in ts]
    dsd = dsd_timesteps(engine.defaults.dsd_steps)  # the export records its DSD preset's S
    for i in range(SAMPLES):
        order = grid if cal.workload[i] == 0 else dsd
        assert order[cal.noise_row[i]] == cal.timestep[i]
    assert set(cal.timestep[cal.workload == 0].astype(int)) <= set(grid)
    x0 = engine.encode_images(train_digits)
    noise = shared_noise(3, len(grid), (1, 8, 8))
    i = 5
    want = add_noise(x0[cal.image_row[i]], noise[cal.noise_row[i]][None], engine.alphas_cumprod, [int(cal.timestep[i])])
    np.testing.assert_allclose(cal.sample[i], want[0], rtol=1e-6)
    # seeded: the same seed gives the same set, another seed another one
    again = dataset.collect(engine, train_digits, LABELS, SAMPLES, seed=3)
    for name in ("sample", "timestep", "prompt_row", "noise_row", "image_row"):
        np.testing.assert_array_equal(getattr(again, name), getattr(cal, name))
    assert not np.array_equal(dataset.collect(engine, train_digits, LABELS, SAMPLES, seed=4).sample, cal.sample)


def test_calibration_set_round_trips(engine_dir, train_digits, tmp_path):
    cal = dataset.collect(diffscore.load(engine_dir, backend="ort-cpu"), train_digits, LABELS, 16, seed=0)
    cal.save(tmp_path / "c.npz")
    again = dataset.collect(diffscore.load(engine_dir, backend="ort-cpu"), train_digits, LABELS, 16, seed=0)
    again.save(tmp_path / "d.npz")
    assert sha256_files([tmp_path / "c.npz"]) == sha256_files([tmp_path / "d.npz"])  # byte-for-byte reproducible
    back = dataset.CalibrationSet.load(tmp_path / "c.npz")
    np.testing.assert_array_equal(back.sample, cal.sample)
    assert back.meta == cal.meta and [f["sample"].shape[0] for f in back.feeds(10)] == [10, 6]


def test_calibrate_records_int8_in_engine(engine_dir, calibrated):
    manifest = Manifest.load(engine_dir)
    graph = manifest.graphs["unet.int8"]
    assert graph.file == "unet.int8.onnx" and graph.precision == "int8"
    assert [t.name for t in graph.inputs] == [t.name for t in manifest.graphs["unet"].inputs]
    record = manifest.calibration
    assert record.samples == SAMPLES and record.source == "demo training digits" and record.method == "minmax"
    assert sha256_files([engine_dir / record.file]) == record.sha256
    assert manifest.defaults.stages == [list(s) for s in DEMO_STAGES]  # the scoring defaults are untouched
    cal = dataset.CalibrationSet.load(engine_dir / record.file)
    train = load_digits_split().train_images
    assert len(cal) == SAMPLES and cal.image_row.max() < len(train)  # ids into the TRAINING digits
    # the runtime picks the INT8 UNet up by precision alone
    got = diffscore.load(engine_dir, backend="ort-cpu", precision="int8").classify(list(train[-2:]), LABELS)
    assert len(got) == 2 and all(r.passes > 0 for r in got)


def test_qdq_structure(engine_dir, calibrated):
    from diffscore.export.tensorrt_ops import unsupported_ops

    model = onnx.load(str(engine_dir / "unet.int8.onnx"))
    layers = quantize.quantizable_layers(onnx.load(str(engine_dir / "unet.onnx")))
    kept = set(calibrated.float_layers)
    assert kept == set(quantize.select_float(layers))
    assert {"conv_in", "conv_out", "time_embedding.linear_1"} <= kept and any("conv_shortcut" in k for k in kept)
    assert set(quantize.quantized_layers(model)) == set(layers) - kept  # every other weight layer is int8
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in quantize.quantized_layers(model)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    zero_points = [inits[n.input[2]] for n in qdq]
    assert qdq and not any(z.any() for z in zero_points)  # symmetric: every zero point is 0
    assert {z.dtype for z in zero_points} == {np.dtype(np.int8)}  # no int32 bias DequantizeLinear: TensorRT rejects it
    conv1 = next(n for n in model.graph.node if n.name.endswith("down_blocks.0/resnets.0/conv1/Conv"))
    weight_dq = next(n for n in model.graph.node if n.output[0] == conv1.input[1])
    assert weight_dq.op_type == "DequantizeLinear" and inits[weight_dq.input[1]].shape == (32,)  # per output channel
    # attention matmuls (two activations) stay float: no DequantizeLinear feeds them
    dq_out = {n.output[0] for n in qdq if n.op_type == "DequantizeLinear"}
    bmm = [n for n in model.graph.node if n.op_type == "MatMul" and n.name.endswith("attn1/MatMul")]
    assert bmm and not any(i in dq_out for n in bmm for i in n.input)
    assert unsupported_ops(model) == {}  # TensorRT parses Q/DQ: `build-trt --precision int8` can take it


def test_smoothquant_keeps_the_function_and_balances_ranges(engine_dir, calibrated):
    import onnxruntime as ort

    from diffscore.calibration import smoothquant

    cal = dataset.CalibrationSet.load(engine_dir / "calibration.npz")
    model = onnx.load(str(engine_dir / "unet.onnx"))
    smoothed, norms = smoothquant.smooth(model, cal, alpha=0.5)
    assert len(norms) == sum(n.op_type == "LayerNormalization" for n in model.graph.node)  # every block norm
    feed = next(cal.feeds(8))
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)  # noqa: E731
    for want, got in zip(run(model), run(smoothed)):  # the same function (ε̂ and the attention scores)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    # α = 0.5 sets s = sqrt(max|X| / max|W|) per channel, so afterwards each input channel's activation
    # range equals the largest weight it meets: measured again on the smoothed graph
    groups = smoothquant.smoothable_groups(smoothed)
    amax = smoothquant.activation_channel_max(smoothed, cal, [norm.output[0] for norm, _ in groups])
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in smoothed.graph.initializer}
    for norm, matmuls in groups:
        wmax = np.max([np.abs(inits[m.input[1]]).max(axis=1) for m in matmuls], axis=0)
        np.testing.assert_allclose(amax[norm.output[0]], wmax, rtol=1e-4)


def test_calibrate_with_smoothquant(engine_dir, calibrated, tmp_path):
    import shutil

    engine = shutil.copytree(engine_dir, tmp_path / "engine")
    result = calibrate(engine, images=training_images(), labels=list(CLASS_NAMES), source="demo training digits",
                       samples=SAMPLES, validation=VALIDATION, seed=0, smoothquant_alpha=0.5)
    record = Manifest.load(engine).calibration
    assert record.smoothquant["alpha"] == 0.5 and len(record.smoothquant["norms"]) > 0
    assert result.gate.passed and set(result.quantized) == set(calibrated.quantized)
    assert Manifest.load(engine_dir).calibration.smoothquant is None  # off by default
    got = diffscore.load(engine, backend="ort-cpu", precision="int8").classify(
        list(load_digits_split().train_images[-2:]), LABELS)
    assert len(got) == 2


def test_int8_on_an_fp16_base(engine_dir, calibrated):
    """TensorRT's INT8 is built from the Q/DQ graph with its float part in fp16 (issue 27); calibrate gates it too."""
    from diffscore.export.fp16 import on_fp16_base

    model = onnx.load(str(engine_dir / "unet.int8.onnx"))
    fp16 = on_fp16_base(model)
    assert max(o.version for o in fp16.opset_import if o.domain in ("", "ai.onnx")) >= 19  # fp16 DQ scales
    inits = {t.name: t for t in fp16.graph.initializer}
    dq = [n for n in fp16.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and {inits[n.input[1]].data_type for n in dq if n.input[1] in inits} == {onnx.TensorProto.FLOAT16}
    assert quantize.quantized_layers(fp16) == quantize.quantized_layers(model)  # the same int8 weights
    assert sum(n.op_type == "QuantizeLinear" for n in fp16.graph.node) == sum(
        n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert all(o.version < 19 for o in model.opset_import if o.domain in ("", "ai.onnx"))  # the CPU graph untouched
    gate = Manifest.load(engine_dir).calibration.gate
    assert gate["fp16_base_passed"] and gate["fp16_base_agreement"] >= 0.99


def test_decision_gate(engine_dir, calibrated):
    assert calibrated.gate.passed and calibrated.gate.images == VALIDATION
    assert Manifest.load(engine_dir).calibration.gate["agreement"] >= 0.99
    gate = lambda n_same, n: sensitivity.gate_verdict(["a"] * n_same + ["b"] * (n - n_same), ["a"] * n)
    assert not gate(197, 200).passed and gate(99, 100).passed and gate(99, 100).images == 100
    # a UNet that predicts -ε̂ flips decisions: the gate must catch it
    model = onnx.load(str(engine_dir / "unet.onnx"))
    conv_out = next(n for n in model.graph.node if n.name.endswith("conv_out/Conv"))
    for init in model.graph.initializer:
        if init.name in conv_out.input[1:]:
            init.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(init), init.name))
    swap = sensitivity.UnetSwap(engine_dir)
    try:
        images = list(load_digits_split().train_images[:4])
        assert not sensitivity.decision_gate(swap, model, images, LABELS).passed
    finally:
        swap.close()


def test_layer_sensitivity_ranks_layers(engine_dir, calibrated, tmp_path):
    cal = dataset.CalibrationSet.load(engine_dir / "calibration.npz")
    swap = sensitivity.UnetSwap(engine_dir)
    try:
        images = list(load_digits_split().train_images[:2])
        rows = sensitivity.layer_sensitivity(swap, engine_dir / "unet.onnx", cal, images, LABELS, method="minmax",
                                             ranges_cache=tmp_path / "ranges.json",
                                             layers=["mid_block.resnets.0.conv1", "conv_out"])
    finally:
        swap.close()
    assert {r.layer for r in rows} == {"conv_out", "mid_block.resnets.0.conv1"}
    assert all(r.score_error > 0 for r in rows) and rows == sorted(rows, key=lambda r: (-r.flips, -r.score_error))


def test_score_error_is_relative_to_the_margin():
    want = np.array([[1.0, 2.0, 3.0], [2.0, 1.0, 3.0]])
    assert sensitivity.score_error(want, want) == (0.0, 0.0)
    err, flips = sensitivity.score_error(want + [[1.5, 0.0, 0.0], [0.0, 0.0, 0.0]], want)
    assert flips == 0.5 and err == pytest.approx(np.sqrt(1.5**2 / 6))  # margins are 1


def test_auto_keeps_most_sensitive_layers_until_gate_holds(monkeypatch):
    tried = []
    monkeypatch.setattr(sensitivity, "quantize_unet", lambda *a, keep_float, **k: list(keep_float))
    monkeypatch.setattr(sensitivity, "decision_gate",
                        lambda swap, model, *a: tried.append(model) or sensitivity.gate_verdict(
                            ["a"] * (100 if "b" in model else 90) + ["b"] * (0 if "b" in model else 10), ["a"] * 100))
    ranking = [sensitivity.LayerSensitivity(x, e, 0.0)
               for x, e in (("a", 3.0), ("conv_in", 2.0), ("b", 1.0), ("c", 0.5))]
    keep, _, gate, steps = sensitivity.auto_keep_float(None, None, None, [], LABELS, method="minmax", ranges_cache=None,
                                                       start=["conv_in"], ranking=ranking, reference=[])
    assert keep == ["conv_in", "a", "b"] and gate.passed and len(steps) == 2 and tried[-1] == keep



@pytest.mark.parametrize("args,exit_code,message", [
    (["{empty}", "--labels", "a,b"], 1, "has no image files"),
    (["{missing}", "--labels", "a,b"], 1, "does not exist"),
    (["{folder}", "--labels", ","], 1, "non-empty"),
    (["{folder}"], 1, "--labels"),
    (["--demo", "--labels", "cat,dog"], 2, "does not match"),
    (["--demo", "--samples", "4"], 1, "too few"),
    (["--demo", "--ranges", "kl"], 2, "'kl' is not one of"),
    (["--demo", "--smoothquant", "1.5"], 1, "--smoothquant takes α in (0, 1)"),
    (["{folder}", "--demo", "--labels", "a"], 2, "give images (files, folders or globs) or --demo, not both"),
    (["{one}", "--labels", "a,b"], 1, "too few to hold some out"),
])
def test_bad_input_is_one_line(engine_dir, tmp_path, run_cli, args, exit_code, message):
    from PIL import Image

    (tmp_path / "empty").mkdir()
    for name, n in (("folder", 3), ("one", 1)):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / name / f"{i}.png")
    fill = {k: tmp_path / k for k in ("empty", "missing", "folder", "one")}
    code, err = run_cli("calibrate", engine_dir, *[a.format(**fill) for a in args])
    assert code == exit_code and "Traceback" not in err
    assert message in err and len(err.strip().splitlines()) == 1, err
