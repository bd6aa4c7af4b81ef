"""The GPU check: one command, a few minutes, on a machine with an NVIDIA GPU and PyTorch with CUDA. It uses
TensorRT and onnxruntime-gpu when they are there and says so when they are not.

    python3 bench/gpu_check.py [--out bench/results/gpu_check.json] [--engine DIR] [--budget 330] [--dry-run]

(a) plumbing: the TensorRT runner's CUDA code driven for real (device set, host<->device copies, stream sync,
    device memory before/after close) through a stand-in network (tests/engine/trt_fakes.py: an identity
    plan) where TensorRT is missing; (b) the torch reference on CUDA vs CPU on the demo model: fp32 with TF32
    off (rtol 1e-4) and fp16 (rtol 2e-2), per output; (c) the demo job with the torch reference on CUDA
    injected through `load(runners=...)` vs ONNX Runtime on the CPU: decision agreement; (d) an SD-1.5-size
    UNet (diffusers UNet2DConditionModel, SD-1.5's config, random weights) in torch on the GPU: ms per pass
    at batch 8/32/64, fp32 (TF32 off) and fp16, eager and CUDA graph, with and without score capture: the
    baseline a TensorRT plan must beat; (e) where TensorRT imports: plans of the demo engine built, run,
    and compared with the torch reference and with ONNX Runtime's decisions.
--dry-run runs every section small on the CPU (fake cudart, a tiny UNet, 5 digits): CI runs it.

Packages such a machine may lack (download here, install there with `pip install --no-index --no-deps
--target /tmp/site WHEELS` and PYTHONPATH=/tmp/site); DL = `pip download --no-deps --only-binary=:all:
--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d .whl`:
    diffusers (b, c, d):                  DL diffusers==0.42.1 importlib_metadata
    cuda-python (a, e: cuda.bindings):    DL cuda-bindings==13.0.3 cuda-pathfinder   (12.x for a CUDA 12 driver)
    tensorrt (e, optional):               DL tensorrt-cu13==10.13.3.9 tensorrt-cu13-libs==10.13.3.9
                                             tensorrt-cu13-bindings==10.13.3.9   (cu12 variants for CUDA 12)
    onnxruntime (c, CPU is enough):       DL onnxruntime
The demo engine is exported on first use (needs onnx, onnxscript) unless --engine or DIFFSCORE_CACHE
points at one made beforehand.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "engine"))  # trt_fakes: the stand-in network
from common import machine  # noqa: E402

from diffscore.export.verdicts import MIN_AGREEMENT, RTOL, compare  # noqa: E402

BATCHES = (8, 32, 64)
DEMO_IMAGES = 450
MODEL = HERE.parent / "models" / "demo"  # the reference of (b), (c), (e): not the path the engine recorded


class Check:
    """The rows of the summary table and the JSON, plus the time budget shared by the sections."""

    def __init__(self, budget_s: float, dry_run: bool):
        self.rows: list[dict] = []
        self.sections: dict[str, dict] = {}
        self.start, self.budget, self.dry_run = time.perf_counter(), budget_s, dry_run

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def row(self, section: str, check: str, measured, bound=None, passed: bool | None = None, note: str = ""):
        if isinstance(measured, (np.floating, np.integer, np.bool_)):
            measured = measured.item()
        self.rows.append({"section": section, "check": check, "measured": measured, "bound": bound,
                          "passed": passed, "note": note})
        print(f"[{section}] {check}: {measured} {'' if passed is None else ('PASSED' if passed else 'FAILED')} {note}",
              flush=True)

    def verdict(self, section: str, v) -> None:
        self.row(section, v.name, v.measured, v.bound, v.passed, f"max_abs={v.max_abs:.3g}" +
                 (f" nonfinite={v.nonfinite}" if v.nonfinite else ""))


# --- the machine ------------------------------------------------------------------------------------
def gpu_info(torch) -> dict:
    info = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, gpus=torch.cuda.device_count())
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
    for name in ("tensorrt", "onnxruntime", "diffusers", "cuda.bindings"):
        try:
            module = __import__(name, fromlist=["_"])
            info[name] = getattr(module, "__version__", "present")
        except Exception as e:  # noqa: BLE001 - a broken install is a finding, reported as such
            info[name] = f"missing ({type(e).__name__})"
    return info


def machine_line(info: dict) -> str:
    gpu = info.get("gpu", "no GPU")
    return (f"{gpu} ({info.get('gpu_memory_gib', '-')} GiB, driver {info.get('driver', '-')}), "
            f"{info['cpu']}, {info['cores']} cores; torch {info.get('torch', '-')} (CUDA {info.get('torch_cuda')}), "
            f"onnxruntime {info['onnxruntime']}, diffusers {info.get('diffusers')}, TensorRT {info.get('tensorrt')}, "
            f"cuda-bindings {info.get('cuda.bindings')}")


# --- (a) the TensorRT runner's CUDA plumbing ---------------------------------------------------------
def unet_io(batch_free: bool, small: bool):
    """SD-1.5's UNet inputs/outputs (4x64x64 latents, 77x768 text) as a manifest GraphSpec and a fake plan."""
    from trt_fakes import plan_bytes

    from diffscore.engine.manifest import BATCH, GraphSpec, TensorSpec

    side, width = (8, 32) if small else (64, 768)
    inputs = {"sample": ("FLOAT", [-1, 4, side, side]), "timestep": ("FLOAT", [-1]),
              "encoder_hidden_states": ("FLOAT", [-1, 77, width])}
    outputs = {"eps": ("FLOAT", [-1, 4, side, side], "sample"), "attn_scores": ("FLOAT", [-1, 7], None)}
    spec = lambda io: [TensorSpec(n, "float32", [BATCH if d == -1 else d for d in v[1]]) for n, v in io.items()]
    return GraphSpec("unet.onnx", "", 0, "fp32", spec(inputs), spec(outputs)), plan_bytes(inputs, outputs)


def check_plumbing(ck: Check) -> None:
    from trt_fakes import FakeCudart, fake_tensorrt, installed

    from diffscore.engine.backends.tensorrt import TensorRTRunner
    from diffscore.engine.backends.tensorrt_plans import cuda_call, gpu_slug, set_device, tensorrt_version
    from diffscore.engine.manifest import PlanSpec
    from diffscore.errors import EngineError

    if ck.dry_run:
        cudart = FakeCudart()
    else:
        from cuda.bindings import runtime as cudart
    trt = fake_tensorrt(cudart)
    with installed(trt, cudart if ck.dry_run else None), tempfile.TemporaryDirectory() as tmp:
        count = cuda_call(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
        set_device(cudart, 0)
        cuda_call(cudart.cudaFree(0), "cudaFree(0)")  # creates the context: its memory is not the runner's
        free_before, total = cuda_call(cudart.cudaMemGetInfo(), "cudaMemGetInfo")
        graph, plan = unet_io(True, ck.dry_run)
        max_batch = 32
        path = Path(tmp) / "unet.plan"
        path.write_bytes(plan)
        spec = PlanSpec("unet.plan", "unet", gpu_slug(cudart, 0), tensorrt_version(trt), "fp32", 1, 8, max_batch, "", 0)
        runner = TensorRTRunner(path, spec, graph, device=0)
        free_open = cuda_call(cudart.cudaMemGetInfo(), "cudaMemGetInfo")[0]
        want_bytes = sum(int(np.prod([max_batch if d == "batch" else d for d in t.shape])) * 4
                         for t in graph.inputs + graph.outputs)
        ck.row("a", f"device buffers at max_batch {max_batch} (MiB)", round((free_before - free_open) / 2**20, 1),
               note=f"the tensors need {want_bytes / 2**20:.1f} MiB; {count} GPU(s), GPU 0 is {spec.gpu}")
        rng = np.random.default_rng(0)
        for batch in (8, 32):
            feed = {t.name: rng.standard_normal([batch if d == "batch" else d for d in t.shape], dtype=np.float32)
                    for t in graph.inputs}
            out = runner.infer(feed)
            exact = np.array_equal(out["eps"], feed["sample"]) and not out["attn_scores"].any()
            ck.row("a", f"batch {batch}: outputs copied back exactly (identity network)", exact, True, exact)
            calls = 3 if ck.dry_run else 20
            start = time.perf_counter()
            for _ in range(calls):
                runner.infer(feed)
            ms = (time.perf_counter() - start) / calls * 1e3
            moved = sum(a.nbytes for a in feed.values()) + sum(a.nbytes for a in out.values())
            ck.row("a", f"batch {batch}: ms per call (pinned H2D + D2D + D2H + sync)", round(ms, 3),
                   note=f"{moved / 2**20:.1f} MiB moved, {moved / ms / 1e6:.2f} GB/s")
        plumbing_extras(ck, runner, path, spec, graph, calls=3 if ck.dry_run else 20)
        current = cuda_call(cudart.cudaGetDevice(), "cudaGetDevice")
        ck.row("a", "current device after infer", current, 0, current == 0)
        try:
            TensorRTRunner(path, spec, graph, device=count)
            ck.row("a", f"device={count} (absent) refused", False, True, False)
        except EngineError as e:
            ck.row("a", f"device={count} (absent) refused with one line", True, True, "\n" not in str(e), str(e))
        runner.close()
        free_closed = cuda_call(cudart.cudaMemGetInfo(), "cudaMemGetInfo")[0]
        leaked = (free_before - free_closed) / 2**20
        ck.row("a", "device memory not returned after close (MiB)", round(leaked, 2), 2.0, leaked <= 2.0,
               f"free before open {free_before / 2**30:.2f} GiB of {total / 2**30:.1f}")


def plumbing_extras(ck: Check, runner, path: Path, spec, graph, calls: int) -> None:
    """Issue 27's buffers on the real CUDA runtime: a prompt table uploaded once and gathered on the GPU, and
    CUDA graphs captured per batch size and replayed (the stand-in network's copies are what gets captured)."""
    from diffscore.engine.backends.tensorrt import TensorRTRunner
    from diffscore.engine.conditioning import take_rows

    rng = np.random.default_rng(1)
    shape = lambda t, b: [b if d == "batch" else d for d in t.shape]  # noqa: E731
    emb = next(t for t in graph.inputs if t.name == "encoder_hidden_states")
    table = rng.standard_normal([10, *shape(emb, 1)[1:]], dtype=np.float32)  # 10 prompts' embeddings
    feeds = {}
    for batch in (8, 32):
        feed = {t.name: rng.standard_normal(shape(t, batch), dtype=np.float32) for t in graph.inputs}
        feeds[batch] = feed, {**feed, "encoder_hidden_states": take_rows(table, np.arange(batch) % 10)}
    timed = lambda r, f: (r.infer(f), time.perf_counter(), [r.infer(f) for _ in range(calls)], time.perf_counter())  # noqa: E731
    for batch, (plain, rows) in feeds.items():
        _, t0, _, t1 = timed(runner, plain)
        out, t2, _, t3 = timed(runner, rows)
        exact = np.array_equal(out["eps"], rows["sample"])
        ck.row("a", f"batch {batch}: prompt rows gathered on the GPU (table uploaded once)", exact, True, exact,
               f"{(t3 - t2) / calls * 1e3:.3f} ms per call vs {(t1 - t0) / calls * 1e3:.3f} ms with the rows copied")
    graphs = TensorRTRunner(path, spec, graph, device=0, cuda_graphs=True)
    try:
        exact = True
        for batch in (8, 32, 8, 32):  # captured at the first 8 and 32, replayed after
            feed = {t.name: rng.standard_normal(shape(t, batch), dtype=np.float32) for t in graph.inputs}
            exact &= bool(np.array_equal(graphs.infer(feed)["eps"], feed["sample"]))
        ck.row("a", "CUDA graphs per batch size: replays copy each call's inputs", exact, True, exact,
               f"{len(graphs._graphs)} graphs captured")
        for batch, (plain, _) in feeds.items():
            _, t0, _, t1 = timed(runner, plain)
            _, t2, _, t3 = timed(graphs, plain)
            ck.row("a", f"batch {batch}: ms per call, CUDA graph replay vs launches", round((t3 - t2) / calls * 1e3, 3),
                   note=f"{(t1 - t0) / calls * 1e3:.3f} ms without (the stand-in network is 2 kernels: a lower bound)")
    finally:
        graphs.close()


# --- (b) torch on CUDA vs CPU on the demo model ------------------------------------------------------
def reference_runners(comp, manifest, device: str, dtype):
    """The demo's torch graphs as runners on `device` (copies: the CPU reference keeps its own)."""
    import torch  # noqa: F401

    from diffscore.export.parity import torch_modules
    from diffscore.reference.runner import TorchRunner

    return {g: TorchRunner(copy.deepcopy(m), manifest.graphs[g], g, device=device, dtype=dtype)
            for g, m in torch_modules(comp, manifest).items()}


def check_torch_cuda(ck: Check, engine_dir: Path, device: str) -> None:
    import torch

    from diffscore.engine.manifest import Manifest
    from diffscore.export.parity import feeds, reference_components

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: TF32 would miss 1e-4
    torch.backends.cudnn.allow_tf32 = False
    manifest = Manifest.load(engine_dir)
    comp = reference_components(manifest, MODEL)
    cpu = reference_runners(comp, manifest, "cpu", torch.float32)
    per_kind = feeds(manifest, comp, engine_dir)
    for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        gpu = reference_runners(comp, manifest, device, dtype)
        for kind, per_graph in per_kind.items():
            for graph, feed in per_graph.items():
                want, got = cpu[graph].infer(feed), gpu[graph].infer(feed)
                for name in want:
                    ck.verdict("b", compare(f"torch {device} {precision} vs cpu fp32 {graph}:{name} ({kind})",
                                            got[name], want[name], RTOL[precision]))


# --- (c) the demo job: torch on CUDA through runners= vs ONNX Runtime CPU ----------------------------
def check_demo_job(ck: Check, engine_dir: Path, device: str, images: int) -> None:
    import torch

    from diffscore.app.demo import run_demo
    from diffscore.engine.engine import load
    from diffscore.engine.manifest import Manifest
    from diffscore.export.parity import reference_components

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    manifest = Manifest.load(engine_dir)
    runners = reference_runners(reference_components(manifest, MODEL), manifest, device, torch.float32)
    results = {}
    # threads=1: one worker, since a torch module (its score sink) serves one call at a time
    with load(engine_dir, backend="ort-cpu", runners=runners, threads=1) as eng:
        assert eng.runners["unet"] is runners["unet"], "the injected runner is the one that runs"
        results[f"torch {device}"] = run_demo(eng, limit=images, progress=False)
    with load(engine_dir, backend="ort-cpu") as eng:
        results["ort-cpu"] = run_demo(eng, limit=images, progress=False)
    (name_t, t), (_, o) = results.items()
    agree = float(np.mean(np.array(t["predictions"]) == np.array(o["predictions"])))
    ck.row("c", f"demo job decisions: {name_t} (runners=) vs ort-cpu, {t['images']} held-out digits", agree,
           MIN_AGREEMENT, agree >= MIN_AGREEMENT)
    for name, r in results.items():
        ck.row("c", f"demo job on {name}: accuracy", round(r["accuracy"], 4),
               note=f"{r['passes_per_image']:.1f} passes/image, {r['images_per_s']:.1f} images/s")
    ck.sections["c"] = {k: {f: v for f, v in r.items() if f != "predictions"} for k, r in results.items()}


# --- (d) SD-1.5-size UNet in torch on the GPU --------------------------------------------------------
def sd15_unet(tiny: bool):
    from diffusers import UNet2DConditionModel

    if tiny:
        return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(32, 64),
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=8, norm_num_groups=8)
    return UNet2DConditionModel(  # the runwayml/stable-diffusion-v1-5 unet/config.json values (bench/export_sd.py)
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    )


def rel(got, want) -> float:
    """max|got - want| / max|want| (the parity suite's measure)."""
    got, want = got.float(), want.float()
    return float((got - want).abs().max() / want.abs().max())


def time_pass(torch, fn, device: str, iters: int) -> float:
    """ms per call of fn (already warm), timed with CUDA events on a GPU."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters * 1e3


def cuda_graph(torch, model, static: tuple):
    """model(*static) captured as a CUDA graph (warmed on a side stream, as torch's docs do it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            model(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(*static)
    return graph, out


def check_sd15_speed(ck: Check, device: str) -> None:
    import torch

    from diffscore.reference.scoring_unet import ScoringUNet, default_attention_layers

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tiny, gpu = ck.dry_run, device.startswith("cuda")
    torch.manual_seed(0)
    with torch.device(device):
        unet = sd15_unet(tiny).eval()
    plain = dict(unet.attn_processors)
    layers = default_attention_layers(unet)
    batches = (1, 2) if tiny else BATCHES
    text = 77, unet.config.cross_attention_dim
    side = unet.config.sample_size
    rows, eps_ref = [], {}
    for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        if not gpu and precision == "fp16":
            continue
        unet.to(dtype)
        for capture in (False, True):
            unet.set_attn_processor(dict(plain))
            model = ScoringUNet(unet, layers if capture else [])
            for batch in batches:
                if ck.left() < 20:
                    ck.row("d", f"{precision} capture={capture} batch {batch}", "skipped", note="time budget spent")
                    continue
                g = torch.Generator(device).manual_seed(batch)
                static = (torch.randn(batch, 4, side, side, generator=g, device=device, dtype=dtype),
                          torch.randint(0, 1000, (batch,), generator=g, device=device).to(torch.float32),
                          torch.randn(batch, *text, generator=g, device=device, dtype=dtype))
                with torch.inference_mode():
                    eps = model(*static)[0]  # warm-up (and cuDNN's choice)
                    est = time_pass(torch, lambda: model(*static), device, 1)
                    iters = max(2, min(10, int(2000 / max(est, 1e-3))))
                    eager = time_pass(torch, lambda: model(*static), device, iters)
                    row = {"precision": precision, "capture": capture, "batch": batch, "eager_ms": round(eager, 2),
                           "iters": iters}
                    if batch == batches[0]:  # capture vs none: the ε̂ the Diffusion Classifier reads
                        ref = eps_ref.setdefault(precision, eps.float())
                        if capture:
                            row["eps_rel_vs_no_capture"] = rel(eps, ref)
                    if gpu:
                        try:
                            graph, out = cuda_graph(torch, model, static)
                            graph.replay()
                            row["graph_rel_vs_eager"] = rel(out[0], model(*static)[0])
                            row["graph_ms"] = round(time_pass(torch, graph.replay, device, iters), 2)
                            del graph, out
                        except Exception as e:  # noqa: BLE001 - reported in the row; the eager figures stand
                            row["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    row["ms_per_image"] = round(min(row["eager_ms"], row.get("graph_ms", np.inf)) / batch, 3)
                    if gpu:
                        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                        torch.cuda.reset_peak_memory_stats()
                        torch.cuda.empty_cache()
                rows.append(row)
                ck.row("d", f"{precision} capture={capture} batch {batch}: eager/graph ms per pass",
                       f"{row['eager_ms']} / {row.get('graph_ms', '-')}", note=f"{row['ms_per_image']} ms/image")
            model.remove_hooks()
    ck.sections["d"] = {"unet": "tiny" if tiny else "SD-1.5 (860M params, 64x64 latents, 77x768 text)",
                        "params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
                        "attention_layers_captured": layers, "fp32": "TF32 off", "rows": rows}
    for r in rows:
        if "eps_rel_vs_no_capture" in r:
            bound = RTOL[r["precision"]]
            ck.row("d", f"{r['precision']} eps with vs without capture (rel)", r["eps_rel_vs_no_capture"], bound,
                   r["eps_rel_vs_no_capture"] <= bound)
        if "graph_rel_vs_eager" in r:
            bound = RTOL[r["precision"]]
            ck.row("d", f"{r['precision']} capture={r['capture']} batch {r['batch']}: CUDA graph eps vs eager (rel)",
                   r["graph_rel_vs_eager"], bound, r["graph_rel_vs_eager"] <= bound)


# --- (e) TensorRT plans of the demo engine -----------------------------------------------------------
def check_tensorrt(ck: Check, engine_dir: Path, images: int) -> None:
    from diffscore.export.tensorrt_build import tensorrt_available

    why = tensorrt_available()
    if why is not None:
        ck.row("e", "TensorRT plans of the demo engine", "not run", note=why)
        return
    import shutil

    import torch

    from diffscore.app.demo import run_demo
    from diffscore.engine.backends.choice import make_runner
    from diffscore.engine.engine import load
    from diffscore.engine.manifest import Manifest, unet_graph
    from diffscore.export.parity import feeds, reference_components
    from diffscore.export.tensorrt_build import build_plans

    work = Path(tempfile.mkdtemp()) / "engine"
    shutil.copytree(engine_dir, work)  # plans and the timing cache go beside the graphs
    manifest = Manifest.load(work)
    comp = reference_components(manifest, MODEL)
    cpu = reference_runners(comp, manifest, "cpu", torch.float32)
    feed = feeds(manifest, comp, work)["real"]
    with load(work, backend="ort-cpu") as eng:
        base = run_demo(eng, limit=images, progress=False)["predictions"]
    for precision in ("fp32", "fp16"):
        start = time.perf_counter()
        plans = build_plans(work, precision=precision)
        ck.row("e", f"{precision} plans built", len(plans), note=f"{time.perf_counter() - start:.0f} s")
        manifest = Manifest.load(work)
        for graph in {p.graph for p in plans}:
            with make_runner(work, manifest, graph, "tensorrt", 0, None) as runner:
                got = runner.infer(feed[graph.split(".")[0]])
            want = cpu[graph.split(".")[0]].infer(feed[graph.split(".")[0]])
            for name in want:
                ck.verdict("e", compare(f"tensorrt {precision} {graph}:{name}", got[name], want[name], RTOL[precision]))
        with load(work, backend="tensorrt", precision=precision) as eng:
            r = run_demo(eng, limit=images, progress=False)
        agree = float(np.mean(np.array(r["predictions"]) == np.array(base)))
        ck.row("e", f"tensorrt {precision} demo decisions vs ort-cpu", agree, MIN_AGREEMENT, agree >= MIN_AGREEMENT,
               f"{r['images_per_s']:.0f} images/s, accuracy {r['accuracy']:.4f}")
    assert unet_graph("fp16") in manifest.graphs


# --- the report -----------------------------------------------------------------------------------
def table(ck: Check, info: dict) -> list[str]:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| | check | measured | bound | verdict |", "| --- | --- | --- | --- | --- |"]
    for r in ck.rows:
        verdict = "" if r["passed"] is None else ("PASSED" if r["passed"] else "**FAILED**")
        lines.append(f"| {r['section']} | {r['check']} | {fmt(r['measured'])} | "
                     f"{'' if r['bound'] is None else fmt(r['bound'])} | {verdict} {r['note']} |".rstrip())
    speed = ck.sections.get("d", {}).get("rows", [])
    if speed:
        lines += ["", "| UNet pass (d) | batch | eager ms | CUDA graph ms | ms/image | peak GiB |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['precision']}{' + score capture' if r['capture'] else ''} | {r['batch']} | {r['eager_ms']} | "
                  f"{r.get('graph_ms', '-')} | {r['ms_per_image']} | {r.get('peak_gib', '-')} |" for r in speed]
    lines += ["", f"Machine: {machine_line(info)}. `bench/gpu_check.py`{' --dry-run' if ck.dry_run else ''}, "
                  f"{time.perf_counter() - ck.start:.0f} s."]
    return lines


SECTIONS = {"a": "plumbing", "b": "torch CUDA vs CPU", "c": "demo job", "d": "SD-1.5 UNet speed", "e": "TensorRT"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu_check.json")
    parser.add_argument("--engine", type=Path, help="the demo engine (default: exported/cached by the demo)")
    parser.add_argument("--sections", default="abcde", help="which of a-e to run")
    parser.add_argument("--images", type=int, help=f"held-out digits for (c) and (e) (default {DEMO_IMAGES})")
    parser.add_argument("--budget", type=float, default=330, help="seconds; (d) skips what no longer fits")
    parser.add_argument("--dry-run", action="store_true", help="every section small, on the CPU (CI)")
    args = parser.parse_args(argv)
    import torch

    ck = Check(args.budget, args.dry_run)
    info = {**machine(), **gpu_info(torch)}
    print(machine_line(info), flush=True)
    if not args.dry_run and not info["cuda_available"]:
        print("no CUDA GPU is visible to torch; run with --dry-run for the CPU rehearsal", file=sys.stderr)
        return 1
    device = "cpu" if args.dry_run else "cuda:0"
    images = args.images or (5 if args.dry_run else DEMO_IMAGES)
    engine_dir = args.engine
    if engine_dir is None and set(args.sections) & set("bce"):
        from diffscore.app.demo import DEMO_MODEL, demo_engine_dir

        engine_dir = demo_engine_dir(DEMO_MODEL, precisions=("fp32", "fp16"))
    runs = {"a": lambda: check_plumbing(ck), "b": lambda: check_torch_cuda(ck, engine_dir, device),
            "c": lambda: check_demo_job(ck, engine_dir, device, images), "d": lambda: check_sd15_speed(ck, device),
            "e": lambda: check_tensorrt(ck, engine_dir, images)}
    for key in args.sections:
        start = time.perf_counter()
        try:
            runs[key]()
            status = "ran"
        except Exception as e:  # noqa: BLE001 - one section's failure is reported, the others still run
            traceback.print_exc()
            status = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            ck.row(key, f"{SECTIONS[key]} section", "error", passed=False, note=status)
        ck.sections.setdefault(key, {})
        ck.sections[key].update(status=status, seconds=round(time.perf_counter() - start, 1))
        print(f"== ({key}) {SECTIONS[key]}: {status} in {ck.sections[key]['seconds']} s", flush=True)
    lines = table(ck, info)
    failed = [r for r in ck.rows if r["passed"] is False]
    payload = {"benchmark": "gpu_check", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "dry_run": args.dry_run, "machine": info, "machine_line": machine_line(info),
               "seconds": round(time.perf_counter() - ck.start, 1), "failed": len(failed),
               "rows": ck.rows, "sections": ck.sections, "table": lines}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1, default=str))
    print("\n".join(lines))
    print(f"wrote {args.out}; {len(failed)} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
