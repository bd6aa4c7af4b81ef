"""The GPU backends without a GPU: TensorRT's builder and runner and ONNX Runtime's GPU providers against
recording fakes (tests/engine/trt_fakes.py), checked call by call against the documented APIs."""

import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trt_fakes import FakeCudart, fake_tensorrt, installed, plan_bytes  # noqa: E402

from diffscore.engine.backends.tensorrt import TensorRTRunner  # noqa: E402
from diffscore.engine.backends.tensorrt_plans import matching_plan  # noqa: E402
from diffscore.engine.engine import load  # noqa: E402
from diffscore.engine.manifest import GraphSpec, Manifest, PlanSpec, TensorSpec  # noqa: E402
from diffscore.errors import EngineError  # noqa: E402
from diffscore.export.tensorrt_build import build_plans  # noqa: E402

H100_SXM = ("NVIDIA H100 80GB HBM3", 9, 0, 132)
H100_PCIE = ("NVIDIA H100 PCIe", 9, 0, 114)
AGX_ORIN = ("Orin", 8, 7, 16, True)  # every Jetson Orin module reports the name "Orin"
ORIN_NANO = ("Orin", 8, 7, 8, True)
ONNX_TYPES = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.INT64: "INT64",
              onnx.TensorProto.INT32: "INT32"}


PARSED = []  # (graph file, DequantizeLinear scale types) per graph the fake parser read


def onnx_io(path):
    """What the fake parser reads from an ONNX graph: its inputs and outputs (names and types from the file, shapes
    from the manifest beside it, whose symbolic axes the exporter names freely); eps copies sample (identity)."""
    model = onnx.load(path, load_external_data=False)
    graph, name = model.graph, Path(path).name
    if name.endswith(".fp16-base.onnx"):  # build-trt's INT8 variant, written beside the graph for the build
        name = name[1:].removesuffix(".fp16-base.onnx")
    inits = {t.name: t.data_type for t in graph.initializer}
    PARSED.append((name, {inits.get(n.input[1]) for n in graph.node if n.op_type == "DequantizeLinear"}))
    spec = next(g for g in Manifest.load(Path(path).parent).graphs.values() if g.file == name)
    shapes = {t.name: [-1 if d == "batch" else d for d in t.shape] for t in spec.inputs + spec.outputs}
    kind = lambda v: ONNX_TYPES[v.type.tensor_type.elem_type]
    inputs = {v.name: (kind(v), shapes[v.name]) for v in graph.input}
    outputs = {v.name: (kind(v), shapes[v.name], "sample" if v.name == "eps" else None) for v in graph.output}
    return inputs, outputs


@pytest.fixture
def gpu(engines, tmp_path):
    """make(gpus) -> (trt, cudart, engine dir): a copy of the tiny SD engine and fakes installed while the test runs."""
    engine_dir = shutil.copytree(engines["sd1"], tmp_path / "engine")
    stack = []

    def make(gpus=(H100_SXM,)):
        cudart = FakeCudart(gpus)
        trt = fake_tensorrt(cudart, onnx_io=onnx_io)
        ctx = installed(trt, cudart)
        ctx.__enter__()
        stack.append(ctx)
        return trt, cudart, engine_dir

    yield make
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)


def test_load_on_device_1_builds_and_runs_everything_on_gpu_1(gpu):
    trt, cudart, engine_dir = gpu((H100_SXM, H100_SXM))
    build_plans(engine_dir, precision="fp32", max_batch=16)
    cudart.calls.clear()
    with load(engine_dir, backend="tensorrt", device=1) as eng:
        assert ("cudaSetDevice", 1) in cudart.calls and ("cudaSetDevice", 0) not in cudart.calls
        assert {c[1] for c in cudart.calls.named("cudaMalloc")} == {1}  # every buffer on GPU 1
        results = eng.classify([np.zeros((16, 16, 3), np.uint8)], ["cat", "dog"], stages=[(4, 1)], loss="l2")
    assert results[0].passes == 8
    # the stream goes to TensorRT as its address (cuda-bindings 13 deprecates int(handle); the fake refuses it)
    assert all(isinstance(c[1], int) for c in trt.calls.named("execute_async_v3"))
    assert cudart.streams == 0 and not cudart.buffers  # closed: streams destroyed, memory freed


def test_absent_device_is_one_line(gpu):
    _, _, engine_dir = gpu((H100_SXM,))
    build_plans(engine_dir, precision="fp32", max_batch=8)
    with pytest.raises(EngineError, match=r"^device=1 does not exist: this machine has 1 GPU\(s\)") as err:
        load(engine_dir, backend="tensorrt", device=1)
    assert "\n" not in str(err.value)


def test_profiles_per_graph_opt_at_the_runtime_batch_workspace_and_timing_cache(gpu, tmp_path):
    trt, _, engine_dir = gpu()
    cache = tmp_path / "timing.cache"
    build_plans(engine_dir, precision="fp32", max_batch=32, workspace_gib=2, timing_cache=cache)
    builds = {inputs[0]: (shapes, pool) for _, inputs, shapes, pool, _ in trt.calls.named("build")}
    vae, _ = builds["image"]
    unet, pool = builds["encoder_hidden_states"]
    assert [s[0] for s in vae["image"]] == [1, 8, 8]  # the VAE encoder is called with at most 8 images
    assert [s[0] for s in unet["sample"]] == [1, 32, 32]  # opt = max: the runtime runs full batches of max_batch
    assert pool == {"WORKSPACE": 2 * 2**30}
    assert cache.read_bytes() == b"timing"
    plans = {p.graph: p for p in Manifest.load(engine_dir).plans.values()}
    assert (plans["vae_encoder"].max_batch, plans["unet"].opt_batch, plans["unet"].multiprocessors) == (8, 32, 132)
    assert plans["unet"].compute_capability == "9.0"
    with pytest.raises(EngineError, match="workspace_gib must be above 0"):
        build_plans(engine_dir, workspace_gib=0)


def test_batch_size_comes_from_this_gpus_plan_only(gpu):
    _, _, engine_dir = gpu((AGX_ORIN,))
    build_plans(engine_dir, precision="fp32", max_batch=4)  # a Jetson's plans in the same engine directory
    with installed(*_fakes((H100_SXM,))):
        build_plans(engine_dir, precision="fp32", max_batch=16)
        with load(engine_dir, backend="tensorrt") as eng:
            assert eng.runners["unet"].max_batch == 16
            assert eng.default_batch_size() == 16  # not the Jetson plan's 4


def _fakes(gpus):
    cudart = FakeCudart(gpus)
    return fake_tensorrt(cudart, onnx_io=onnx_io), cudart


def test_plan_from_another_h100_variant_runs_with_a_warning_another_orin_is_refused(gpu, caplog):
    _, _, engine_dir = gpu((H100_SXM,))
    build_plans(engine_dir, precision="fp32", max_batch=8)
    manifest = Manifest.load(engine_dir)
    with installed(*_fakes((H100_PCIE,))), caplog.at_level(logging.WARNING, logger="diffscore"):
        plan = matching_plan(manifest, "unet")
        assert plan is not None and plan.gpu == "nvidia-h100-80gb-hbm3"  # same compute capability: TensorRT runs it
        TensorRTRunner(engine_dir / plan.file, plan, manifest.graphs["unet"]).close()
    assert "rebuild it here" in caplog.text

    with installed(*_fakes((AGX_ORIN,))):
        build_plans(engine_dir, precision="fp32", max_batch=8)
    manifest = Manifest.load(engine_dir)
    with installed(*_fakes((ORIN_NANO,))):  # same name and compute capability, half the SMs and memory
        assert matching_plan(manifest, "unet") is None
        orin = next(p for p in manifest.plans.values() if p.gpu == "orin" and p.graph == "unet")
        with pytest.raises(EngineError, match=r"built for orin \(16 SMs.*here is orin \(8 SMs") as err:
            TensorRTRunner(engine_dir / orin.file, orin, manifest.graphs["unet"])
        assert "\n" not in str(err.value)


def _plan_file(tmp_path, inputs, outputs):
    path = tmp_path / "x.plan"
    path.write_bytes(plan_bytes(inputs, outputs))
    spec = GraphSpec("x.onnx", "", 0, "fp32", [TensorSpec("x", "float32", ["batch", 2])],
                     [TensorSpec("y", "float32", ["batch", 2])])
    return path, PlanSpec("x.plan", "x", "nvidia-h100-80gb-hbm3", "10.8.0", "fp32", 1, 4, 4, "", 0), spec


def test_plan_dtype_other_than_the_manifests_is_refused_not_cast(tmp_path):
    path, plan, spec = _plan_file(tmp_path, {"x": ("HALF", [-1, 2])}, {"y": ("FLOAT", [-1, 2], None)})
    cudart = FakeCudart()
    with installed(fake_tensorrt(cudart), cudart):
        runner = TensorRTRunner(path, plan, spec)
        with pytest.raises(EngineError, match="input x is float32, the TensorRT plan takes float16"):
            runner.infer({"x": np.ones((2, 2), np.float32)})
        runner.close()


def test_bf16_io_is_one_line_not_a_raw_type_error(tmp_path):
    path, plan, spec = _plan_file(tmp_path, {"x": ("FLOAT", [-1, 2])}, {"y": ("BF16", [-1, 2], None)})
    cudart = FakeCudart()
    with installed(fake_tensorrt(cudart), cudart), pytest.raises(EngineError, match="BF16 input or output"):
        TensorRTRunner(path, plan, spec)


# --- ONNX Runtime's GPU providers ------------------------------------------------------------------
import onnxruntime  # noqa: E402

REAL_SESSION = onnxruntime.InferenceSession


class RecordingSession:
    """onnxruntime.InferenceSession's stand-in: records the providers asked for, reports `runs_on`."""

    asked: list = []
    runs_on = ["CPUExecutionProvider"]

    def __init__(self, path, options, providers):
        RecordingSession.asked = providers
        self._real = REAL_SESSION(path, options, providers=["CPUExecutionProvider"])

    def get_providers(self):
        return list(self.runs_on)

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture
def ort_gpu(monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", RecordingSession)
    return RecordingSession


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_ort_trt_sets_precision_flags_and_a_batch_profile(ort_gpu, engines, precision):
    from diffscore.engine.backends.onnxruntime import OnnxRuntimeRunner

    manifest = Manifest.load(engines["sd1"])
    spec = manifest.graphs["unet"]
    spec = GraphSpec(spec.file, spec.sha256, spec.size, precision, spec.inputs, spec.outputs)
    ort_gpu.runs_on = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    runner = OnnxRuntimeRunner(engines["sd1"] / spec.file, spec, "ort-trt", 0, graph="unet", batches=(1, 16, 32))
    name, options = ort_gpu.asked[0]
    assert name == "TensorrtExecutionProvider" and runner.name == "onnxruntime:TensorrtExecutionProvider"
    assert options["trt_fp16_enable"] == (precision == "fp16") and options["trt_int8_enable"] == (precision == "int8")
    sample = "x".join(map(str, manifest.sample_shape))
    assert options["trt_profile_min_shapes"].startswith(f"sample:1x{sample},timestep:1,encoder_hidden_states:1x")
    assert options["trt_profile_opt_shapes"].startswith(f"sample:16x{sample},")
    assert options["trt_profile_max_shapes"].startswith(f"sample:32x{sample},")


def test_a_session_that_fell_back_to_the_cpu_is_refused_not_reported_as_cuda(ort_gpu, engines):
    from diffscore.engine.backends.onnxruntime import OnnxRuntimeRunner

    spec = Manifest.load(engines["sd1"]).graphs["unet"]
    ort_gpu.runs_on = ["CPUExecutionProvider"]  # what onnxruntime does when libcudart/libcudnn do not load
    with pytest.raises(EngineError, match="created the unet session on CPUExecutionProvider, not CUDAExecution"):
        OnnxRuntimeRunner(engines["sd1"] / spec.file, spec, "ort-cuda", 0, graph="unet")


def test_auto_does_not_choose_ort_trt_without_tensorrt(ort_gpu, engines, monkeypatch):
    from diffscore.engine.backends import onnxruntime as ort_backend
    from diffscore.engine.backends.choice import resolve_backend

    manifest = Manifest.load(engines["sd1"])
    monkeypatch.setattr(ort_backend, "tensorrt_loadable", lambda: False)
    assert resolve_backend(manifest, "auto", "unet") == "ort-cuda"
    monkeypatch.setattr(ort_backend, "tensorrt_loadable", lambda: True)
    assert resolve_backend(manifest, "auto", "unet") == "ort-trt"


# --- installs -----------------------------------------------------------------------------------------
def test_jetson_install_runs_without_onnxruntime(gpu, monkeypatch):
    """The x86 part of the Jetson path (docs/gpu.md): the core runtime + TensorRT plans built on the board,
    no ONNX Runtime at all (apt's TensorRT; no GPU ONNX Runtime wheel on PyPI for aarch64)."""
    _, _, engine_dir = gpu((AGX_ORIN,))
    build_plans(engine_dir, precision="fp32", max_batch=8, workspace_gib=2)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with load(engine_dir) as eng:  # auto: this board's plans
        assert eng.backend == "tensorrt"
        assert eng.classify([np.zeros((16, 16, 3), np.uint8)], ["cat", "dog"], stages=[(2, 1)])[0].passes == 4
    with pytest.raises(EngineError, match=r"ONNX Runtime is not installed: pip install 'diffscore\[cpu\]'"):
        load(engine_dir, backend="ort-cpu")


def test_extras_resolve_one_onnxruntime_and_cuda_python_of_tensorrts_cuda_major():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    name = lambda req: req.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip()
    ort = {"onnxruntime", "onnxruntime-gpu"}
    assert not ort & {name(r) for r in project["dependencies"]}  # the core lets the user choose
    extras = {k: {name(r): r for r in v} for k, v in project["optional-dependencies"].items()}
    assert [k for k, v in extras.items() if ort & set(v)] == ["cpu", "gpu"]
    assert all(len(ort & set(v)) == 1 for k, v in extras.items() if k in ("cpu", "gpu"))
    for major in ("12", "13"):
        reqs = extras[f"tensorrt-cu{major}"]
        assert set(reqs) == {f"tensorrt-cu{major}", "cuda-python"}
        assert f"<{int(major) + 1}" in reqs["cuda-python"] and f">={major}" in reqs["cuda-python"]


def test_only_the_outputs_the_engine_reads_are_copied_back(tmp_path, engines):
    inputs = {"x": ("FLOAT", [-1, 2])}
    outputs = {"y": ("FLOAT", [-1, 2], "x"), "features.big": ("FLOAT", [-1, 4096], None)}
    path = tmp_path / "x.plan"
    path.write_bytes(plan_bytes(inputs, outputs))
    spec = GraphSpec("x.onnx", "", 0, "fp32", [TensorSpec("x", "float32", ["batch", 2])],
                     [TensorSpec("y", "float32", ["batch", 2]), TensorSpec("features.big", "float32", ["batch", 4096])])
    plan = PlanSpec("x.plan", "x", "nvidia-h100-80gb-hbm3", "10.8.0", "fp32", 1, 4, 4, "", 0)
    cudart = FakeCudart()
    with installed(fake_tensorrt(cudart), cudart):
        runner = TensorRTRunner(path, plan, spec)
        runner.fetch = {"y"}
        x = np.arange(6, dtype=np.float32).reshape(3, 2)
        out = runner.infer({"x": x})
        runner.close()
    assert list(out) == ["y"] and np.array_equal(out["y"], x)
    assert [c[1:] for c in cudart.calls.named("cudaMemcpyAsync") if c[1] == "cudaMemcpyDeviceToHost"] == \
        [("cudaMemcpyDeviceToHost", x.nbytes)]  # not the 3 x 4096 floats of features.big
    with load(engines["sd1"], backend="ort-cpu") as eng:  # the engine asks every backend for eps and scores only
        assert eng.runners["unet"].fetch == {"eps", "attn_scores"}


# --- buffers (issue 27, deliver 3) --------------------------------------------------------------------
def _identity_runner(tmp_path, cudart, name="x", activations=1024, max_batch=8, **options):
    """A runner over a fake plan whose output y copies input x (B, 3) and whose `emb` (B, 2, 2) output copies
    input emb: what went in comes back, so reused buffers and replayed graphs are checked byte for byte."""
    inputs = {"x": ("FLOAT", [-1, 3]), "emb": ("FLOAT", [-1, 2, 2])}
    outputs = {"y": ("FLOAT", [-1, 3], "x"), "emb_out": ("FLOAT", [-1, 2, 2], "emb")}
    path = tmp_path / f"{name}.plan"
    path.write_bytes(plan_bytes(inputs, outputs, activations))
    spec = GraphSpec(f"{name}.onnx", "", 0, "fp32",
                     [TensorSpec("x", "float32", ["batch", 3]), TensorSpec("emb", "float32", ["batch", 2, 2])],
                     [TensorSpec("y", "float32", ["batch", 3]), TensorSpec("emb_out", "float32", ["batch", 2, 2])])
    plan = PlanSpec(f"{name}.plan", name, "nvidia-h100-80gb-hbm3", "10.8.0", "fp32", 1, max_batch, max_batch, "", 0)
    return TensorRTRunner(path, plan, spec, **options)


def _feed(batch, seed, table=None, rows=None):
    from diffscore.engine.conditioning import take_rows

    rng = np.random.default_rng(seed)
    emb = take_rows(table, rows) if table is not None else rng.standard_normal((batch, 2, 2), dtype=np.float32)
    return {"x": rng.standard_normal((batch, 3), dtype=np.float32), "emb": emb}


@pytest.fixture
def fakes():
    """(trt, cudart): a fake pair installed while the test runs."""
    cudart = FakeCudart()
    trt = fake_tensorrt(cudart)
    with installed(trt, cudart):
        yield trt, cudart


def test_buffers_are_allocated_once_and_every_copy_goes_through_pinned_memory(tmp_path, fakes):
    _, cudart = fakes
    runner = _identity_runner(tmp_path, cudart)
    allocations = len(cudart.calls.named("cudaMalloc")) + len(cudart.calls.named("cudaMallocHost"))
    assert len(cudart.calls.named("cudaMallocHost")) == 4  # one pinned buffer per input and output
    for batch, seed in ((8, 0), (3, 1), (8, 2), (5, 3)):
        feed = _feed(batch, seed)
        out = runner.infer(feed)
        assert np.array_equal(out["y"], feed["x"]) and np.array_equal(out["emb_out"], feed["emb"])
    assert len(cudart.calls.named("cudaMalloc")) + len(cudart.calls.named("cudaMallocHost")) == allocations
    host_side = [(dst, src) for kind, dst, src, _ in cudart.copies if kind != "cudaMemcpyDeviceToDevice"]
    assert host_side and all(src in cudart.pinned or dst in cudart.pinned for dst, src in host_side)
    kept = out["y"].copy()
    runner.infer(_feed(8, 9))
    assert np.array_equal(out["y"], kept)  # results are the caller's: the next call does not overwrite them
    runner.close()
    assert not cudart.buffers and not cudart.pinned  # device, pinned and activation memory all returned


def test_a_prompt_tables_rows_upload_the_table_once_and_gather_on_the_gpu(tmp_path, fakes):
    _, cudart = fakes
    rng = np.random.default_rng(0)
    table, other = (rng.standard_normal((5, 2, 2), dtype=np.float32) for _ in range(2))
    runner = _identity_runner(tmp_path, cudart)
    uploads = lambda: [c for c in cudart.copies if c[0] == "cudaMemcpyHostToDevice" and c[3] == table.nbytes]
    device_copies = {}
    for rows in ([0, 0, 3, 3], [4, 1, 2, 3, 0, 0], [2]):  # one prompt set: one upload, whatever the rows
        rows, before = np.array(rows), len(cudart.copies)
        out = runner.infer(_feed(len(rows), 1, table, rows))
        assert np.array_equal(out["emb_out"], table[rows])
        device_copies[len(rows)] = [c[3] for c in cudart.copies[before:] if c[0] == "cudaMemcpyDeviceToDevice"]
    assert len(uploads()) == 1
    # [4, 1, 2, 3, 0, 0]: one copy per run of consecutive rows (16 bytes a row), then the network's own two
    assert device_copies[6] == [16, 48, 16, 16, 6 * 12, 6 * 16]
    out = runner.infer(_feed(2, 1, other, np.array([1, 0])))  # a new prompt set: uploaded once more
    assert np.array_equal(out["emb_out"], other[[1, 0]]) and len(uploads()) == 2
    rows_sent = [c for c in cudart.copies if c[0] == "cudaMemcpyHostToDevice" and c[3] in (4 * 16, 6 * 16, 16)]
    assert not rows_sent  # the gathered (B, 2, 2) rows never cross from the host: only the table did
    runner.close()
    assert not cudart.buffers


def test_the_engines_contexts_share_one_activation_block(tmp_path, fakes):
    trt, cudart = fakes
    small = _identity_runner(tmp_path, cudart, "small", activations=1000)
    big = _identity_runner(tmp_path, cudart, "big", activations=5000)
    assert [c[1] for c in trt.calls.named("create_execution_context")] == ["USER_MANAGED"] * 2
    blocks = [c for c in cudart.calls.named("cudaMalloc") if c[2] in (1000, 5000)]
    assert [c[2] for c in blocks] == [1000, 5000]  # grown once to the larger need, the smaller one freed
    memory = trt.calls.named("set_device_memory")
    assert {(address, size) for _, address, size in memory[-2:]} == {(memory[-1][1], 1000), (memory[-1][1], 5000)}
    for runner in (small, big):  # both run on the shared block
        feed = _feed(4, 0)
        assert np.array_equal(runner.infer(feed)["y"], feed["x"])
    small.close()
    assert memory[-1][1] in cudart.buffers  # still in use by the other context
    big.close()
    assert not cudart.buffers


def test_cuda_graphs_are_captured_once_per_batch_size_and_replayed(tmp_path, fakes):
    trt, cudart = fakes
    runner = _identity_runner(tmp_path, cudart, cuda_graphs=True)
    for i, batch in enumerate((3, 3, 5, 3, 5, 8)):
        feed = _feed(batch, i)
        out = runner.infer(feed)  # replays copy this call's inputs, not the captured call's
        assert np.array_equal(out["y"], feed["x"]) and np.array_equal(out["emb_out"], feed["emb"])
    assert len(cudart.calls.named("cudaStreamBeginCapture")) == 3  # batches 3, 5 and 8
    assert len(cudart.calls.named("cudaGraphLaunch")) == 3  # the second 3, the second 5, the third 3
    assert len(trt.calls.named("execute_async_v3")) == 6  # per bucket: one run to settle shapes, one captured
    runner.close()
    assert cudart.graphs == 0 and not cudart.buffers


def test_the_engine_uploads_its_prompt_embeddings_once_per_call(gpu):
    _, cudart, engine_dir = gpu()
    build_plans(engine_dir, precision="fp32", max_batch=4)
    with load(engine_dir, backend="tensorrt") as eng:
        assert "unet_eps" in eng.runners  # the ε̂-only graph's plan runs classify
        table = eng.text_conditioning(["a photo of a cat", "a photo of a dog"])["encoder_hidden_states"]
        cudart.copies.clear()
        eng.classify([np.zeros((16, 16, 3), np.uint8)], ["cat", "dog"], stages=[(8, 1)], loss="l2")
        uploads = [c for c in cudart.copies if c[0] == "cudaMemcpyHostToDevice" and c[3] == table.nbytes]
        assert len(uploads) == 1  # 16 pairs in 4 UNet calls, one upload of the two prompts' embeddings


def test_int8_plans_are_built_from_the_fp16_base_variant(gpu):
    """build-trt --precision int8 parses the Q/DQ graph with fp16 scales and float part (export.fp16.on_fp16_base),
    as NVIDIA's demo/Diffusion builds INT8, and leaves no temporary file behind."""
    from diffscore.calibration.dataset import CalibrationSet
    from diffscore.calibration.quantize import quantize_unet
    from diffscore.export.eps_graph import write_eps_graph
    from diffscore.export.onnx_export import save_graph

    _, _, engine_dir = gpu()
    manifest = Manifest.load(engine_dir)
    n, rng = 4, np.random.default_rng(0)
    cal = CalibrationSet(sample=rng.standard_normal((n, *manifest.sample_shape), dtype=np.float32),
                         timestep=np.linspace(50, 950, n).astype(np.float32), prompt_row=np.arange(n) % 2,
                         embeddings=rng.standard_normal((2, manifest.max_length, manifest.text_hidden_size),
                                                        dtype=np.float32),
                         image_row=np.arange(n), noise_row=np.arange(n), workload=np.zeros(n, dtype=np.int64))
    unet = manifest.graphs["unet"]
    model = quantize_unet(engine_dir / unet.file, cal)
    manifest.graphs["unet.int8"] = save_graph(model, engine_dir, "unet.int8.onnx", unet.inputs, unet.outputs, "int8")
    manifest.graphs["unet_eps.int8"] = write_eps_graph(engine_dir, manifest.graphs["unet.int8"], "int8")
    manifest.save(engine_dir)
    PARSED.clear()
    plans = build_plans(engine_dir, precision="int8", max_batch=4)
    parsed = dict(PARSED)
    assert {p.graph: p.precision for p in plans if "unet" in p.graph} == {"unet.int8": "int8", "unet_eps.int8": "int8"}
    for file in ("unet.int8.onnx", "unet_eps.int8.onnx"):
        assert parsed[file] == {onnx.TensorProto.FLOAT16}, parsed  # every scale fp16: the fp16 base
    assert parsed["text_encoder.onnx"] == set()  # the encoders stay the fp32 graphs
    assert not list(engine_dir.glob(".*fp16-base*"))
