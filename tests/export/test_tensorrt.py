"""TensorRT export: the operator check and the build plumbing run everywhere; building plans and
running them needs TensorRT and an NVIDIA GPU, and those tests skip with the reason otherwise."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from diffscore.engine.backends.tensorrt import TensorRTRunner
from diffscore.engine.backends.tensorrt_plans import matching_plan
from diffscore.errors import EngineError
from diffscore.engine.manifest import GraphSpec, Manifest, PlanSpec, sha256_file
from diffscore.export.tensorrt_build import build_plans, graphs_for, plan_file, tensorrt_available
from diffscore.export.tensorrt_ops import OPS_FILE, unsupported_ops

NO_TENSORRT = tensorrt_available()
needs_tensorrt = pytest.mark.skipif(NO_TENSORRT is not None, reason=f"needs TensorRT and a GPU: {NO_TENSORRT}")
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}  # relative, as in the parity contract (DESIGN.md §4)


# --- the operator check ------------------------------------------------------------------------


@pytest.mark.slow
def test_torch_export_of_conv_attention_block_is_supported(tmp_path):
    torch = pytest.importorskip("torch")

    class Block(torch.nn.Module):  # conv + group norm + a self-attention over the pixels, as in a UNet
        def __init__(self, c=8):
            super().__init__()
            self.conv, self.norm = torch.nn.Conv2d(4, c, 3, padding=1), torch.nn.GroupNorm(2, c)
            self.ln, self.qkv, self.out = torch.nn.LayerNorm(c), torch.nn.Linear(c, 3 * c), torch.nn.Conv2d(c, 4, 1)

        def forward(self, x):
            h = torch.nn.functional.silu(self.norm(self.conv(x)))  # (B, C, H, W)
            b, c, hh, ww = h.shape
            q, k, v = self.qkv(self.ln(h.flatten(2).transpose(1, 2))).chunk(3, dim=-1)  # (B, HW, C) each
            a = torch.softmax(q @ k.transpose(1, 2) / c**0.5, dim=-1) @ v  # (B, HW, C)
            return self.out(a.transpose(1, 2).reshape(b, c, hh, ww))

    path = tmp_path / "block.onnx"
    torch.onnx.export(
        Block().eval(), (torch.randn(2, 4, 8, 8),), str(path), input_names=["x"], output_names=["y"],
        dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True,
    )
    assert unsupported_ops(path) == {}


def test_unsupported_and_custom_ops_are_flagged_everywhere():
    """Top level, inside an If branch and inside a model-local function; other domains are unsupported."""
    branch = helper.make_graph([helper.make_node("Unique", ["x"], ["u"])], "branch", [], [_info("u", [None])])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Unique", ["r"], ["u0"]),
        helper.make_node("FusedMatMul", ["r", "r"], ["f"], domain="com.microsoft"),
        helper.make_node("If", ["c"], ["u1"], then_branch=branch, else_branch=branch),
        helper.make_node("MyNorm", ["r"], ["n"], domain="local"),
    ]
    function = helper.make_function(
        "local", "MyNorm", ["a"], ["b"], [helper.make_node("Det", ["a"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(nodes, "g", [_info("x", [4]), _info("c", [], TensorProto.BOOL)], [_info("n", [])])
    model = helper.make_model(
        graph, functions=[function], opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    )
    assert unsupported_ops(model) == {"Unique": 3, "com.microsoft.FusedMatMul": 1, "Det": 1}


def test_supported_ops_data_file_is_well_formed():
    data = json.loads(OPS_FILE.read_text())
    assert data["source"].startswith("https://github.com/onnx/onnx-tensorrt/")
    assert data["tensorrt_version"] and data["retrieved"]
    supported = data["supported"]
    assert len(supported) >= 100 and len(set(supported)) == len(supported)
    needed = {"Conv", "MatMul", "Softmax", "Einsum", "LayerNormalization", "GroupNormalization"}
    needed |= {"InstanceNormalization"}  # what torch exports GroupNorm as
    assert needed <= set(supported), needed - set(supported)
    assert {"Unique", "NonZero"} & set(data["notes"]) == {"Unique"}, "operators marked N are noted, not listed"
    assert "Unique" not in supported


# --- engine directories -------------------------------------------------------------------------


def _info(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _save(engine_dir, key, graph, precision, inputs, outputs) -> GraphSpec:
    path = engine_dir / f"{key}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return GraphSpec(path.name, sha256_file(path), path.stat().st_size, precision, inputs, outputs)


def _text_encoder(engine_dir) -> GraphSpec:
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["last_hidden_state"])], "text_encoder",
        [_info("input_ids", ["batch", 8], TensorProto.INT64)], [_info("last_hidden_state", ["batch", 8, 16])], [table],
    )
    return _save(
        engine_dir, "text_encoder", graph, "fp32",
        [dict(name="input_ids", dtype="int64", shape=["batch", 8])],
        [dict(name="last_hidden_state", dtype="float32", shape=["batch", 8, 16])],
    )


def _unet(engine_dir, precision: str) -> GraphSpec:
    """eps = conv(sample) + mean(text) + t/1000: fp32 in and out; fp16 inside for the fp16 variant."""
    half = precision == "fp16"
    dtype, np_dtype = (TensorProto.FLOAT16, np.float16) if half else (TensorProto.FLOAT, np.float32)
    weights = [
        numpy_helper.from_array(np.random.default_rng(1).standard_normal((1, 1, 3, 3)).astype(np_dtype), "w"),
        numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "to_4d"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
        numpy_helper.from_array(np.array(1e-3, np_dtype), "per_step"),
    ]
    names = ["sample", "timestep", "encoder_hidden_states"]
    cast_in = [helper.make_node("Cast", [n], [f"{n}_h"], to=dtype) for n in names] if half else []
    s, t, e = (f"{n}_h" for n in names) if half else names
    nodes = cast_in + [
        helper.make_node("Conv", [s, "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", [e, "axes"], ["text_mean"], keepdims=0),
        helper.make_node("Mul", [t, "per_step"], ["t_scaled"]),
        helper.make_node("Add", ["text_mean", "t_scaled"], ["bias"]),
        helper.make_node("Reshape", ["bias", "to_4d"], ["bias_4d"]),
        helper.make_node("Add", ["conv", "bias_4d"], ["eps_h" if half else "eps"]),
    ]
    nodes += [helper.make_node("Cast", ["eps_h"], ["eps"], to=TensorProto.FLOAT)] if half else []
    shapes = {"sample": ["batch", 1, 8, 8], "timestep": ["batch"], "encoder_hidden_states": ["batch", 8, 16]}
    graph = helper.make_graph(
        nodes, "unet", [_info(n, shapes[n]) for n in names], [_info("eps", ["batch", 1, 8, 8])], weights
    )
    key = "unet" if precision == "fp32" else f"unet.{precision}"
    return _save(
        engine_dir, key, graph, precision,
        [dict(name=n, dtype="float32", shape=shapes[n]) for n in names],
        [dict(name="eps", dtype="float32", shape=["batch", 1, 8, 8])],
    )


@pytest.fixture
def engine_dir(tmp_path):
    """A pixel-space engine directory: a text encoder, an fp32 and an fp16 UNet (no VAE, no int8)."""
    (tmp_path / "tokenizer.json").write_text("{}")
    graphs = {"text_encoder": _text_encoder(tmp_path), "unet": _unet(tmp_path, "fp32")}
    graphs["unet.fp16"] = _unet(tmp_path, "fp16")
    Manifest(
        diffscore_version="0.1.0", source_path="tiny", source_sha256="0" * 64, image_size=8, image_channels=1,
        latent_scaling=None, sample_shape=[1, 8, 8], alphas_cumprod=np.linspace(0.999, 0.01, 1000).tolist(),
        tokenizer="tokenizer.json", max_length=8,
        text_hidden_size=16, attention_layers=[], feature_blocks=[], graphs=graphs,
    ).save(tmp_path)
    return tmp_path


def _feed(spec: GraphSpec, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    return {
        t.name: rng.integers(0, 100, (batch, *t.shape[1:])) if t.dtype == "int64"
        else rng.standard_normal((batch, *t.shape[1:])).astype(t.dtype)
        for t in spec.inputs
    }


# --- plumbing that needs no GPU -----------------------------------------------------------------


def test_each_precision_runs_the_fp32_encoders_and_its_own_unet(engine_dir):
    manifest = Manifest.load(engine_dir)
    assert graphs_for(manifest, "fp32") == ["text_encoder", "unet"]
    assert graphs_for(manifest, "fp16") == ["text_encoder", "unet.fp16"]
    with pytest.raises(EngineError, match="no int8 UNet graph"):
        graphs_for(manifest, "int8")
    with pytest.raises(EngineError, match="precision must be one of"):
        graphs_for(manifest, "fp8")
    name = plan_file("unet.fp16", "nvidia-h100-80gb-hbm3", "10.8.0", "fp16")
    assert name == "unet.nvidia-h100-80gb-hbm3.trt10.8.0.fp16.plan"


def test_bad_batch_range_is_one_clear_line(engine_dir):
    with pytest.raises(EngineError, match="min_batch <= opt_batch <= max_batch, got 1, 8, 4"):
        build_plans(engine_dir, opt_batch=8, max_batch=4)


@pytest.mark.skipif(NO_TENSORRT is None, reason="TensorRT is installed here")
def test_without_tensorrt_the_error_says_what_to_install(engine_dir):
    with pytest.raises(EngineError, match=r"pip install 'diffscore\[tensorrt-cu12\]'") as error:
        build_plans(engine_dir)
    assert "\n" not in str(error.value)
    with pytest.raises(EngineError, match=r"pip install 'diffscore\[tensorrt-cu12\]'"):
        TensorRTRunner(engine_dir / "x.plan", None, None)
    assert matching_plan(Manifest.load(engine_dir), "unet") is None  # callers fall back to ONNX Runtime


# --- building and running plans (TensorRT + GPU) ------------------------------------------------


@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_plans_match_onnxruntime(engine_dir, precision):
    import onnxruntime as ort

    plans = build_plans(engine_dir, precision, opt_batch=2, max_batch=4)
    manifest = Manifest.load(engine_dir)
    assert [p.graph for p in plans] == graphs_for(manifest, precision)
    assert all(p in manifest.plans.values() and (engine_dir / p.file).is_file() for p in plans)
    for plan in plans:
        assert matching_plan(manifest, plan.graph) == plan
        spec = manifest.graphs[plan.graph]
        session = ort.InferenceSession(str(engine_dir / spec.file), providers=["CPUExecutionProvider"])
        with TensorRTRunner(engine_dir / plan.file, plan, spec) as runner:
            for batch in (1, 3, 4):
                feed = _feed(spec, batch)
                expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
                got = runner.infer(feed)
                for name, value in expected.items():
                    assert got[name].shape == value.shape and np.isfinite(got[name]).all()
                    scale = np.abs(value).max()
                    np.testing.assert_allclose(got[name], value, rtol=0, atol=TOLERANCE[plan.precision] * scale)


@needs_tensorrt
def test_second_build_reuses_plans_and_timing_cache(engine_dir):
    first = build_plans(engine_dir, "fp16", opt_batch=2, max_batch=4)
    mtimes = [(engine_dir / p.file).stat().st_mtime_ns for p in first]
    assert list(engine_dir.glob("timing.*.cache"))
    again = build_plans(engine_dir, "fp32", opt_batch=2, max_batch=4)  # the text encoder plan is shared
    assert again[0] == first[0] and (engine_dir / first[0].file).stat().st_mtime_ns == mtimes[0]
    assert build_plans(engine_dir, "fp16", opt_batch=2, max_batch=4) == first
    assert [(engine_dir / p.file).stat().st_mtime_ns for p in first] == mtimes


@needs_tensorrt
def test_batch_above_max_batch_is_refused(engine_dir):
    plan: PlanSpec = build_plans(engine_dir, "fp32", opt_batch=2, max_batch=4)[-1]
    spec = Manifest.load(engine_dir).graphs[plan.graph]
    with TensorRTRunner(engine_dir / plan.file, plan, spec) as runner:
        with pytest.raises(EngineError, match="batch 5 is above the TensorRT plan's max_batch 4"):
            runner.infer(_feed(spec, 5))
