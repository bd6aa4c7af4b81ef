"""Export: engine directory contents, fp32/fp16 parity with torch for every UNet kind, TensorRT op
support of every exported graph, atomicity, and the tokenizer.json round trip."""

import errno
import json


import numpy as np
import onnx
import pytest

from diffscore.errors import EngineError
from diffscore.engine.manifest import Manifest
from diffscore.export.onnx_export import export_engine
from diffscore.engine.backends.openvino import cpu_has_bf16
from diffscore.export.parity import available_backends, run_parity, tensor_parity
from diffscore.export.tensorrt_ops import unsupported_ops
from diffscore.reference.loading import load_components

KINDS = ["sd1", "sd2", "pixel"]


@pytest.fixture(scope="module")
def engines(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    return {
        kind: export_engine(tiny_models[kind], root / kind, precisions=("fp32", "fp16"),
                            feature_blocks=["mid_block", "up_blocks.0"], show_progress=False)
        for kind in KINDS
    }


@pytest.mark.parametrize("kind", KINDS)
def test_engine_directory(engines, kind):
    m = Manifest.load(engines[kind])
    expected = ({"text_encoder", "unet", "unet.fp16", "unet_eps", "unet_eps.fp16"}
                | ({"vae_encoder"} if kind != "pixel" else set()))
    assert set(m.graphs) == expected
    for key, scoring in (("unet_eps", "unet"), ("unet_eps.fp16", "unet.fp16")):  # the ε̂-only cut of each precision
        assert [t.name for t in m.graphs[key].outputs] == ["eps"] and m.graphs[key].inputs == m.graphs[scoring].inputs
        assert m.graphs[key].precision == m.graphs[scoring].precision
        ops = lambda g: [n.op_type for n in onnx.load(str(engines[kind] / m.graphs[g].file)).graph.node]  # noqa: E731
        assert "ReduceLogSumExp" in ops(scoring) and "ReduceLogSumExp" not in ops(key)  # no score capture left
        assert len(ops(key)) < len(ops(scoring))
    assert m.verify(engines[kind]) == []
    unet = m.graphs["unet"]
    assert [t.name for t in unet.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert [t.name for t in unet.outputs] == ["eps", "attn_scores", "features.mid_block", "features.up_blocks.0"]
    assert unet.outputs[1].shape == ["batch", len(m.attention_layers)]
    assert m.graphs["unet.fp16"].precision == "fp16"
    assert not list(engines[kind].parent.glob(f".{kind}.partial-*"))


@pytest.mark.parametrize("kind", KINDS)
def test_exported_graphs_follow_the_runtime_graph_contract(engines, tiny_models, kind):
    """Every graph role's ONNX signature (read from the file onnx wrote) is its contract's: inputs' names in order,
    dtypes and shapes from the diffusers model's own config with the symbolic batch axis, outputs' names, dtypes and
    every dim the file fixes; its sample feed has those shapes; the VAE's TensorRT profile is capped."""
    from diffscore.engine.graph_contract import VAE_BATCH, ModelDims, batch_profile, graph_contracts

    m = Manifest.load(engines[kind])
    comp = load_components(tiny_models[kind])
    contracts = graph_contracts(ModelDims.of(m))
    S, C = comp.unet.config.sample_size, comp.unet.config.in_channels
    L, D = comp.tokenizer.model_max_length, comp.text_encoder.config.hidden_size
    assert contracts["unet"].inputs[0].shape == ["batch", C, S, S]
    assert contracts["text_encoder"].outputs[0].shape == ["batch", L, D]
    onnx_types = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64"}

    def signature(tensors):
        return [(t.name, onnx_types[t.type.tensor_type.elem_type],
                 [d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim]) for t in tensors]

    for role, contract in contracts.items():
        if role not in m.graphs:
            assert role == "vae_encoder" and kind == "pixel"
            continue
        graph = onnx.load(str(engines[kind] / m.graphs[role].file), load_external_data=False).graph
        assert signature(graph.input) == [(t.name, t.dtype, t.shape) for t in contract.inputs]
        for (name, dtype, shape), t in zip(signature(graph.output), contract.outputs, strict=False):
            # the exporter may leave an output dim symbolic (its own name): the runtime checks those on first run
            assert (name, dtype, len(shape)) == (t.name, t.dtype, len(t.shape))
            assert all(d == w for d, w in zip(shape, t.shape) if isinstance(d, int) or d == "batch"), (shape, t.shape)
        assert [t.name for t in graph.output][: len(contract.outputs)] == [t.name for t in contract.outputs]
        feed = contract.sample_feed(3, np.random.default_rng(0))
        assert [(k, v.dtype.name, list(v.shape)) for k, v in feed.items()] == [
            (t.name, t.dtype, [3 if d == "batch" else d for d in t.shape]) for t in contract.inputs]
    assert batch_profile(m, "unet", (1, 32, 64)) == (1, 32, 64)
    if kind != "pixel":
        assert batch_profile(m, "vae_encoder", (1, 32, 64)) == (1, VAE_BATCH, VAE_BATCH)


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_and_fp16_parity_with_torch(engines, tiny_models, kind):
    m = Manifest.load(engines[kind])
    verdicts = tensor_parity(engines[kind], m, load_components(tiny_models[kind]))
    failed = [str(v) for v in verdicts if not v.passed]
    assert not failed, failed
    fp32 = [v for v in verdicts if v.name.startswith("ort-cpu fp32 unet:")]
    fp16 = [v for v in verdicts if v.name.startswith("ort-cpu fp16 unet:")]
    assert len(fp32) == len(fp16) == 8  # 4 outputs x (random, real)
    assert max(v.measured for v in fp32) <= 1e-4 and max(v.measured for v in fp16) <= 2e-2
    # the ε̂-only graphs against a plain diffusers UNet (its own attention processors, no capture)
    eps = {p: [v for v in verdicts if v.name.startswith(f"ort-cpu {p} unet_eps:eps")] for p in ("fp32", "fp16")}
    assert len(eps["fp32"]) == len(eps["fp16"]) == 2  # (random, real)
    assert max(v.measured for v in eps["fp32"]) <= 1e-4 and max(v.measured for v in eps["fp16"]) <= 2e-2
    if "openvino" in available_backends(m):  # OpenVINO x every precision, bf16 where the CPU has it
        ov = {p: [v for v in verdicts if v.name.startswith(f"openvino {p} unet:")] for p in ("fp32", "fp16", "bf16")}
        assert len(ov["fp32"]) == len(ov["fp16"]) == 8 and max(v.measured for v in ov["fp32"]) <= 1e-4
        assert len(ov["bf16"]) == (8 if cpu_has_bf16() else 0)


@pytest.mark.parametrize("kind", KINDS)
def test_every_exported_op_is_supported_by_tensorrt(engines, kind):
    m = Manifest.load(engines[kind])
    for name, graph in m.graphs.items():
        assert unsupported_ops(engines[kind] / graph.file) == {}, name


def test_failed_export_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    import diffscore.export.onnx_export as ex

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "write_tokenizer", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_engine(tiny_models["pixel"], tmp_path / "eng", show_progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error, says", [
    (lambda model, out: OSError(errno.EACCES, "Permission denied", str(model / "tokenizer" / "vocab.json")),
     "cannot read {model}/tokenizer/vocab.json: Permission denied"),
    (lambda model, out: OSError(errno.ENOSPC, "No space left on device"), "No space left on device: {out}"),
])
def test_read_and_write_errors_are_told_apart(tiny_models, tmp_path, monkeypatch, error, says):
    """An unreadable input is named as an input, a full disk as the output; either way nothing is left."""
    import diffscore.export.onnx_export as ex

    model, out = tiny_models["pixel"], tmp_path / "eng"

    def fail(*a, **k):
        raise error(model, out)

    monkeypatch.setattr(ex, "write_tokenizer", fail)
    with pytest.raises(EngineError) as caught:
        export_engine(model, out, show_progress=False)
    assert str(caught.value) == says.format(model=model, out=out) + f"; nothing was written to {out}"
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(engines, tiny_models):
    with pytest.raises(EngineError, match="already exists"):
        export_engine(tiny_models["pixel"], engines["pixel"], show_progress=False)


def test_tokenizer_json_matches_transformers(engines, tiny_models):
    from tokenizers import Tokenizer

    tok = load_components(tiny_models["pixel"]).tokenizer
    fast = Tokenizer.from_file(str(engines["pixel"] / "tokenizer.json"))
    prompts = ["a handwritten digit seven", "The NUMBER 7!", "", "a very long prompt " * 10, "naïve café"]
    want = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert [e.ids for e in fast.encode_batch(prompts)] == want


def test_damaged_engine_is_refused(engines, tmp_path):
    import shutil

    copy = shutil.copytree(engines["pixel"], tmp_path / "e")
    with open(copy / "unet.onnx", "ab") as f:
        f.write(b"x")
    with pytest.raises(EngineError, match="damaged"):
        Manifest.load(copy)
    raw = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**raw, "format_version": 99}))
    with pytest.raises(EngineError, match="format 99"):
        Manifest.load(copy)


def test_parity_command_reports_and_passes(engines, capsys):
    assert run_parity(engines["sd2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("PASSED |") and all(l.startswith(("PASSED", "FAILED")) for l in lines)
