"""The OpenVINO backend against ONNX Runtime on the tiny SD1/SD2/pixel engines (within the parity bounds),
bf16 and the Q/DQ INT8 graph, backend auto's cached measurement, and one-line refusals."""

import io
import json
import sys

import numpy as np
import pytest

import diffscore
from diffscore.calibration.pipeline import calibrate
from diffscore.engine import autoselect
from diffscore.engine.backends import openvino as ovb
from diffscore.engine.backends.choice import make_runner
from diffscore.engine.manifest import Manifest
from diffscore.errors import EngineError
from diffscore.export.onnx_export import export_engine
from diffscore.export.parity import RTOL, compare

openvino = pytest.importorskip("openvino")  # in the dev extra: runs for real in CI

LABELS = ["cat", "dog", "bird", "car"]
OPTS = dict(template="a {}", stages=[(6, 2), (12, 1)], loss="l2", seed=3)


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """Compiled models and auto's verdicts in a cache of this test session's own."""
    monkeypatch.setenv("DIFFSCORE_CACHE", str(tmp_path_factory.getbasetemp() / "ov-cache"))


@pytest.fixture(scope="module")
def engines(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("ov")
    return {k: export_engine(tiny_models[k], root / k, show_progress=False) for k in ("sd1", "sd2", "pixel")}


def random_feed(manifest: Manifest, graph: str, batch: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in manifest.graphs[graph].inputs:
        shape = [batch if d == "batch" else d for d in spec.shape]
        if spec.name == "input_ids":
            feed[spec.name] = rng.integers(0, 49406, shape).astype(np.int64)
        elif spec.name == "timestep":
            feed[spec.name] = rng.integers(0, 1000, shape).astype(np.float32)
        else:
            feed[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def images_for(manifest, n, seed=0):
    rng = np.random.default_rng(seed)
    shape = (manifest.image_size, manifest.image_size) + ((3,) if manifest.image_channels == 3 else ())
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("kind", ["sd1", "sd2", "pixel"])
def test_every_graph_equals_onnxruntime(engines, kind):
    """fp32 within the fp32 parity bound, at two batch sizes (the second padded up to its static-shape bucket);
    the UNet under the bf16 hint within the bf16 bound."""
    d = engines[kind]
    m = Manifest.load(d)
    for graph in m.graphs:
        ort = make_runner(d, m, graph, "ort-cpu", 0, None)
        ov = make_runner(d, m, graph, "openvino", 0, None)
        for batch in (1, 5):
            feed = random_feed(m, graph, batch, seed=batch)
            want, got = ort.infer(feed), ov.infer(feed)
            for spec in m.graphs[graph].outputs:
                assert got[spec.name].shape == want[spec.name].shape
                v = compare(f"{kind} {graph}:{spec.name}", got[spec.name], want[spec.name], RTOL["fp32"])
                assert v.passed, str(v)
        assert list(ov._compiled) == [1, 8]  # static shapes: batch 5 ran padded on the model compiled for 8
    bf16 = make_runner(d, m, "unet", "openvino", 0, None, precision="bf16")
    feed = random_feed(m, "unet", 4)
    want = make_runner(d, m, "unet", "ort-cpu", 0, None).infer(feed)
    for name, got in bf16.infer(feed).items():
        v = compare(f"{kind} bf16 unet:{name}", got, want[name], RTOL["bf16"])
        assert v.passed and v.max_rel > 1e-6, str(v)  # bounded, and really bf16 (not silently fp32)


@pytest.mark.parametrize("kind", ["sd1", "pixel"])
def test_classify_and_match_equal_onnxruntime(engines, kind):
    d = engines[kind]
    imgs = images_for(Manifest.load(d), 5)
    want_eng = diffscore.load(d, backend="ort-cpu")
    got_eng = diffscore.load(d, backend="openvino", threads=2)
    assert got_eng.backend == "openvino" and got_eng.workers == 2  # tiny UNet: concurrent single-threaded runs
    want = want_eng.classify(imgs, LABELS, batch_size=7, **OPTS)
    got = got_eng.classify(imgs, LABELS, batch_size=7, **OPTS)
    for g, w in zip(got, want):
        assert g.label == w.label and g.passes == w.passes
        for (lg, sg), (lw, sw) in zip(g.ranking, w.ranking):
            assert lg == lw and sg == pytest.approx(sw, rel=RTOL["fp32"])
    np.testing.assert_allclose(got_eng.match(imgs[:2], LABELS, steps=3, seed=1),
                               want_eng.match(imgs[:2], LABELS, steps=3, seed=1), rtol=RTOL["fp32"])


def test_int8_graph_runs_on_openvino(engines, tiny_models, tmp_path):
    """The engine's own Q/DQ INT8 UNet: OpenVINO runs it as INT8 (close to ONNX Runtime's INT8 result,
    and farther from fp32 than the two runtimes are from each other)."""
    import shutil

    d = shutil.copytree(engines["sd1"], tmp_path / "sd1")
    m = Manifest.load(d)
    calibrate(d, images=images_for(m, 12, seed=5), labels=LABELS, samples=16, validation=0, seed=0)
    m = Manifest.load(d)
    feed = random_feed(m, "unet", 6)
    fp32 = make_runner(d, m, "unet", "ort-cpu", 0, None).infer(feed)["eps"]
    ort8 = make_runner(d, m, "unet.int8", "ort-cpu", 0, None).infer(feed)["eps"]
    ov8 = make_runner(d, m, "unet.int8", "openvino", 0, None).infer(feed)["eps"]
    between_runtimes = compare("int8", ov8, ort8, None).max_rel
    quantization = compare("int8 vs fp32", ort8, fp32, None).max_rel
    assert np.isfinite(ov8).all() and 0 < quantization and between_runtimes < 0.1
    eng = diffscore.load(d, backend="openvino", precision="int8")
    assert eng.runners["unet"].name == "openvino:CPU:int8"
    assert len(eng.classify(images_for(m, 2), LABELS, **OPTS)) == 2


def test_threads_and_compiled_model_cache(engines, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSCORE_CACHE", str(tmp_path))
    d = engines["pixel"]
    m = Manifest.load(d)
    compiled = make_runner(d, m, "unet", "openvino", 0, 1).compiled_for(3)
    assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32  # not bf16 by default
    assert any((tmp_path / "openvino").rglob("*.blob")), "the compiled model is cached for the next load"


@pytest.mark.skipif(not ovb.cpu_has_bf16(), reason="bf16 needs a CPU with AVX-512 BF16 or AMX")
def test_bf16_after_fp32_in_one_cache_stays_finite(engines, tmp_path, monkeypatch):
    """OpenVINO 2026.4 served a bf16 compile the f32 blob of the same graph from a shared compile cache, and
    returned NaN (seen on an AMX CPU): each precision keeps a cache of its own, and bf16 stays near torch's fp32."""
    monkeypatch.setenv("DIFFSCORE_CACHE", str(tmp_path))
    d = engines["pixel"]
    m = Manifest.load(d)
    feed = random_feed(m, "unet", 6)
    outs = {}
    for precision in ("fp32", "bf16"):
        with make_runner(d, m, "unet", "openvino", 0, None, precision=precision) as runner:
            outs[precision] = runner.infer(feed)
    for name, want in outs["fp32"].items():
        assert np.isfinite(outs["bf16"][name]).all(), name
        assert compare(f"bf16 {name}", outs["bf16"][name], want, RTOL["bf16"]).passed


def test_compiled_buckets_stay_within_the_budget(engines, monkeypatch):
    """With room for one compiled model, alternating batch sizes recompile (least recently used out) and
    still equal ONNX Runtime."""
    monkeypatch.setattr(ovb.OpenVINORunner, "KEEP_BYTES", 1)
    d = engines["pixel"]
    m = Manifest.load(d)
    ov, ort = make_runner(d, m, "unet", "openvino", 0, None), make_runner(d, m, "unet", "ort-cpu", 0, None)
    for batch in (3, 9, 3):
        feed = random_feed(m, "unet", batch, seed=batch)
        np.testing.assert_allclose(ov.infer(feed)["eps"], ort.infer(feed)["eps"], rtol=RTOL["fp32"], atol=1e-5)
        assert list(ov._compiled) == [ov.bucket(batch)]


def test_auto_measures_once_and_info_says_why(engines, tmp_path, monkeypatch, run_cli):
    monkeypatch.setenv("DIFFSCORE_CACHE", str(tmp_path))
    d = engines["sd1"]
    eng = diffscore.load(d, backend="auto", threads=2)
    choice = json.loads(next((tmp_path / "auto").glob("*.json")).read_text())
    assert (eng.backend, eng.workers) == (choice["backend"], choice["workers"])
    assert set(choice["samples_per_s"]) == {"ort-cpu x1", "ort-cpu x2", "openvino x1", "openvino x2"}
    best = max(choice["samples_per_s"], key=choice["samples_per_s"].get)
    assert best == f"{eng.backend} x{eng.workers}"

    def no_second_measurement(*args):
        raise AssertionError("measured again")

    with monkeypatch.context() as patched:
        patched.setattr(autoselect, "measure", no_second_measurement)
        assert diffscore.load(d, backend="auto", threads=2).backend == eng.backend
    from rich.console import Console

    from diffscore.app import render

    monkeypatch.setattr(render, "out", Console(file=io.StringIO(), width=400))
    assert run_cli("info", d)[0] == 0
    text = render.out.file.getvalue()
    assert "auto on this CPU, fp32: not measured yet" in text  # default threads: a verdict of its own
    assert "auto on this CPU, bf16: not measured yet" in text
    eng = diffscore.load(d, backend="auto")
    rates = json.loads(autoselect.choice_path(eng.manifest, "fp32", None).read_text())["samples_per_s"]
    line = autoselect.auto_lines(eng.manifest)[0]
    assert line.startswith(f"auto on this CPU, fp32: {eng.backend} (") and all(k in line for k in rates)


def test_refusals_are_one_line(engines, monkeypatch, run_cli):
    d = engines["pixel"]
    for kwargs, needle in [(dict(backend="openvino2"), "unknown backend 'openvino2'"),
                           (dict(precision="bf8"), "unknown precision 'bf8'"),
                           (dict(backend="ort-cpu", precision="bf16"), "bf16 runs on the openvino backend only")]:
        with pytest.raises(EngineError, match=needle):
            diffscore.load(d, **kwargs)
    code, err = run_cli("classify", d, "x.png", "--labels", "a,b", "--backend", "openvino", "--precision", "bf16x")
    assert code == 2 and "'bf16x' is not one of" in err and "Traceback" not in err

    monkeypatch.setattr(ovb, "cpu_flags", lambda: {"avx2", "avx512f"})  # a CPU without bf16 instructions
    for backend in ("openvino", "auto"):
        with pytest.raises(EngineError, match="needs a CPU with bf16 instructions") as e:
            diffscore.load(d, backend=backend, precision="bf16")
        assert "\n" not in str(e.value)


def test_missing_openvino_is_one_line_and_auto_keeps_onnxruntime(engines, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSCORE_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    ovb.core.cache_clear()
    try:
        with pytest.raises(EngineError, match=r"pip install 'diffscore\[openvino\]'"):
            diffscore.load(engines["pixel"], backend="openvino")
        assert diffscore.load(engines["pixel"], backend="auto").backend == "ort-cpu"
    finally:
        ovb.core.cache_clear()
