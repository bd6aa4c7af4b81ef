"""Full-size check (not in CI): the real Stable Diffusion 1.5 architecture with random weights.

Builds an SD 1.5-shaped model folder (UNet 860M params, CLIP ViT-L/14 text encoder, SD VAE), exports
it (the fp32 UNet exceeds 2 GB, so it goes to external data), runs one batch through torch, ONNX Runtime
and OpenVINO (fp32; bf16 where the CPU has it; INT8 Q/DQ from `diffscore calibrate`'s quantizer, calibrated on
one random latent: fine for timing, meaningless for accuracy) and reports export time, file sizes, peak
memory of each path (each runs in a process of its own), per-pass latency and parity.

    .venv/bin/python bench/export_sd.py [--workdir /tmp/sd15] [--batch 2] [--no-int8] [--resume] [--update-docs]

Writes bench/results/export_sd.json. Needs ~15 GB RAM and ~10 GB disk; takes 15-30 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, update_docs, write_result  # noqa: E402

DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "demo" / "tokenizer"


def build_sd15(folder: Path, tokenizer: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    UNet2DConditionModel(  # the runwayml/stable-diffusion-v1-5 unet/config.json values
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    ).save_pretrained(folder / "unet")
    CLIPTextModel(CLIPTextConfig(  # CLIP ViT-L/14 text tower
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )).save_pretrained(folder / "text_encoder")
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    ).save_pretrained(folder / "vae")
    PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  skip_prk_steps=True).save_pretrained(folder / "scheduler")
    shutil.copytree(tokenizer, folder / "tokenizer")  # the real CLIP BPE vocabulary
    cfg = folder / "tokenizer" / "tokenizer_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "model_max_length": 77}))  # CLIP's context length
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')


def peak_rss_gb() -> float:
    """This process's peak RSS: /proc's VmHWM (ru_maxrss would carry the parent's peak across exec)."""
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1e6
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB


PATHS = ["torch fp32", "ONNX Runtime fp32", "ONNX Runtime fp32 ε̂-only", "OpenVINO fp32", "OpenVINO bf16", "quantize",
         "ONNX Runtime int8", "OpenVINO int8", "OpenVINO int8 ε̂-only", "ONNX Runtime fp32 ε̂-only + ORT optimizer"]
EPS_ONLY = " ε̂-only"  # the ε̂-only graph (export/eps_graph.py) of the same precision: no score capture
# ONNX Runtime's transformer optimizer, model type "unet", with the fusions whose ops have CUDA kernels only
# (GroupNorm, SkipGroupNorm, BiasSplitGelu, NhwcConv, BiasAdd) turned off, so that the CPU can run the result
CUDA_ONLY_FUSIONS = ("enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu", "enable_nhwc_conv",
                     "enable_bias_add")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/diffscore-sd15"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokenizer", type=Path, default=DEMO_TOKENIZER, help="a CLIP tokenizer folder")
    parser.add_argument("--no-int8", dest="int8", action="store_false",
                        help="skip the INT8 UNet (quantizing takes minutes)")
    parser.add_argument("--update-docs", action="store_true")
    parser.add_argument("--resume", action="store_true",
                        help="keep the export and the paths already timed in --workdir")
    parser.add_argument("--paths", help="comma-separated paths to time (default: all); " + "; ".join(PATHS))
    parser.add_argument("--result", choices=("export_sd", "export_sd_capture"), default="export_sd",
                        help="the result and docs block to write: export_sd_capture holds the with/without score "
                             "capture rows (--paths of those)")
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)  # one path, in its own process
    args = parser.parse_args()
    if args.child:
        return print(json.dumps(run_path(args.child, args.workdir)))

    from diffscore.engine.backends.openvino import cpu_has_bf16
    from diffscore.engine.manifest import Manifest
    from diffscore.export.onnx_export import export_engine
    from diffscore.export.tensorrt_ops import unsupported_ops
    from diffscore.export.verdicts import compare

    model, engine, state_file = args.workdir / "model", args.workdir / "engine", args.workdir / "state.json"
    # --resume: keep the export and the paths already timed (a run is 20-30 minutes; one path can die).
    state = json.loads(state_file.read_text()) if args.resume and state_file.exists() else {}
    if not state:
        shutil.rmtree(args.workdir, ignore_errors=True)
        start = time.perf_counter()
        build_sd15(model, args.tokenizer)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        export_engine(model, engine)
        state = {"build_s": build_s, "export_s": time.perf_counter() - start, "peaks": {"export": peak_rss_gb()},
                 "ms": {}, "quantize_s": None, "params_m": None}
        rng = np.random.default_rng(0)
        B = args.batch
        np.savez(args.workdir / "feed.npz", sample=rng.standard_normal((B, 4, 64, 64), dtype=np.float32),
                 timestep=np.array([100.0, 700.0][:B] + [500.0] * max(0, B - 2), dtype=np.float32),
                 encoder_hidden_states=rng.standard_normal((B, 77, 768), dtype=np.float32))
        state_file.write_text(json.dumps(state))
    manifest = Manifest.load(engine)
    files = {p.name: p.stat().st_size / 1e9 for p in sorted(engine.iterdir())}
    B = len(np.load(args.workdir / "feed.npz")["timestep"])

    # Each path in a process of its own: its peak memory is its own, and one path's sessions cannot
    # push another's out of memory (all of them in one process did not fit 23 GB).
    chosen = PATHS if not args.paths else [p.strip() for p in args.paths.split(",")]
    if set(chosen) - set(PATHS):
        raise SystemExit(f"--paths: unknown {sorted(set(chosen) - set(PATHS))}; choose from {PATHS}")
    for path in (p for p in PATHS if p in chosen):
        if ((path == "OpenVINO bf16" and not cpu_has_bf16())
                or (not args.int8 and ("int8" in path or path == "quantize"))):
            continue
        if path in state["peaks"]:
            continue  # timed before this --resume
        print(f"-- {path}", flush=True)
        done = subprocess.run([sys.executable, __file__, "--child", path, "--workdir", str(args.workdir)],
                              capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{path}: exit {done.returncode} (rerun with --resume to keep what was timed)")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        state["peaks"][path] = row["peak_rss_gb"]
        state["params_m"] = row.get("unet_params_M", state["params_m"])
        if path == "quantize":
            state["quantize_s"] = row["seconds"]
        elif row["ms_per_pass"] is not None:
            state["ms"][path] = row["ms_per_pass"]
        if "optimizer" in row:
            state["optimizer"] = row["optimizer"]
        state_file.write_text(json.dumps(state))
        print(f"   {row}", flush=True)
    ms, peaks, quantize_s, params_m = state["ms"], state["peaks"], state["quantize_s"], state["params_m"]
    build_s, export_s = state["build_s"], state["export_s"]
    outputs = {k: np.load(f) for k in ("torch", "ort", "ort-eps", "ort-eps-opt")
               if (f := args.workdir / f"out-{k}.npz").exists()}
    verdicts = [compare(f"unet:{n}", outputs["ort"][n], outputs["torch"][n], 1e-4) for n in ("eps", "attn_scores")]
    verdicts += [compare(f"{key}:eps", outputs[key]["eps"], outputs["torch"]["eps"], 1e-4)
                 for key in ("ort-eps", "ort-eps-opt") if key in outputs]
    result = {
        "unet_params_M": params_m, "build_model_s": build_s, "export_s": export_s, "peak_rss_gb": max(peaks.values()),
        "peak_rss_gb_of_process": peaks,
        "files_gb": files, "unet_external_data": manifest.graphs["unet"].data_files,
        "batch": B, "ms_per_pass": ms, "speedup_vs_torch": {k: ms["torch fp32"] / v for k, v in ms.items()},
        "torch_ms_per_pass": ms["torch fp32"], "ort_ms_per_pass": ms["ONNX Runtime fp32"],
        "ort_speedup": ms["torch fp32"] / ms["ONNX Runtime fp32"],
        "quantize_s": quantize_s, "ort_optimizer": state.get("optimizer"),
        "parity": {v.name: {"max_abs": v.max_abs, "max_rel": v.max_rel, "passed": v.passed} for v in verdicts},
        "tensorrt_unsupported_ops": {g: unsupported_ops(engine / s.file) for g, s in manifest.graphs.items()},
    }
    path = write_result(args.result, result)
    print(json.dumps(result, indent=1))
    print(f"wrote {path}")
    if args.update_docs:
        update_docs(args.result, readme_table(json.loads(path.read_text())))


def run_path(path: str, workdir: Path) -> dict:
    """One path in this process: ms per image-pass (best of two timed calls after a warm-up) and the
    process's peak RSS; torch and ONNX Runtime fp32 keep their outputs for the parity check."""
    from diffscore.engine.backends.onnxruntime import OnnxRuntimeRunner
    from diffscore.engine.backends.openvino import OpenVINORunner
    from diffscore.engine.manifest import GraphSpec, Manifest

    engine = workdir / "engine"
    manifest = Manifest.load(engine)
    feed = dict(np.load(workdir / "feed.npz"))
    int8_spec = workdir / "unet.int8.spec.json"  # the timing-only INT8 graphs are not put in the manifest
    if path == "quantize":
        from diffscore.export.eps_graph import write_eps_graph

        start = time.perf_counter()
        spec = quantize_for_timing(engine, manifest, feed)
        seconds = time.perf_counter() - start
        int8_spec.write_text(json.dumps(dataclasses.asdict(spec)))
        eps_spec = write_eps_graph(engine, spec, "int8")
        (workdir / "unet_eps.int8.spec.json").write_text(json.dumps(dataclasses.asdict(eps_spec)))
        return {"seconds": seconds, "peak_rss_gb": peak_rss_gb()}
    optimizer = None
    if path.endswith("ORT optimizer"):
        optimizer, spec = ort_optimize(engine, manifest.graphs["unet_eps"], workdir)
        if spec is None:  # nothing to time: the report says why
            return {"ms_per_pass": None, "peak_rss_gb": peak_rss_gb(), "optimizer": optimizer}
    if path == "torch fp32":
        import torch

        from diffscore.reference.loading import load_components
        from diffscore.reference.scoring_unet import ScoringUNet

        unet = ScoringUNet(load_components(workdir / "model").unet, manifest.attention_layers).eval()
        tin = [torch.from_numpy(v) for v in feed.values()]

        def call():
            with torch.inference_mode():
                return dict(zip(["eps", "attn_scores"], (t.numpy() for t in unet(*tin))))
    else:
        eps_only = EPS_ONLY in path
        if optimizer is None and "int8" in path:
            spec_file = workdir / "unet_eps.int8.spec.json" if eps_only else int8_spec
            spec = GraphSpec(**json.loads(spec_file.read_text()))
        elif optimizer is None:
            spec = manifest.graphs["unet_eps" if eps_only else "unet"]
        folder = workdir if optimizer is not None else engine
        runner = (OnnxRuntimeRunner(folder / spec.file, spec) if path.startswith("ONNX") else
                  OpenVINORunner(folder / spec.file, spec, path.replace(EPS_ONLY, "").split()[-1]))
        call = lambda: runner.infer(feed)  # noqa: E731
    out = call()  # warm-up: session set-up, compilation, first-run allocations
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    kept = {"torch fp32": "torch", "ONNX Runtime fp32": "ort", "ONNX Runtime fp32 ε̂-only": "ort-eps",
            "ONNX Runtime fp32 ε̂-only + ORT optimizer": "ort-eps-opt"}
    if path in kept:
        np.savez(workdir / f"out-{kept[path]}.npz", **out)
    row = {"ms_per_pass": 1000 * min(seconds) / len(feed["timestep"]), "peak_rss_gb": peak_rss_gb()}
    if optimizer is not None:
        row["optimizer"] = optimizer
    if path == "torch fp32":
        row["unet_params_M"] = sum(p.numel() for p in unet.parameters()) / 1e6
    return row


def ort_optimize(engine: Path, spec, workdir: Path) -> tuple[dict, object]:
    """ONNX Runtime's transformer optimizer (model type "unet") on the ε̂-only graph, with the CUDA-only fusions off:
    first with its attention fusion, then without; returns what it did (op counts, errors, whether the CPU loads
    the result, seconds) and the spec of the first graph that loads, to time."""
    import onnxruntime as ort
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    report = {}
    for variant, off in (("cpu-runnable", CUDA_ONLY_FUSIONS),
                         ("cpu-runnable, no attention fusion", CUDA_ONLY_FUSIONS + ("enable_attention",))):
        options = FusionOptions("unet")
        for name in off:
            setattr(options, name, False)
        start = time.perf_counter()
        try:
            model = optimize_model(str(engine / spec.file), model_type="unet", opt_level=0,
                                   optimization_options=options, use_gpu=False)
        except Exception as e:  # noqa: BLE001 - the optimizer's own failure on our graph is the finding
            report[variant] = {"seconds": time.perf_counter() - start, "error": f"{type(e).__name__}: {e}"[:300],
                               "cpu_loads": False, "fused_ops": {}, "nodes": 0}
            continue
        out = workdir / f"unet_eps.opt-{len(report)}.onnx"
        model.save_model_to_file(str(out), use_external_data_format=True, all_tensors_to_one_file=True)
        ops = {}
        for node in model.model.graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        row = {"seconds": time.perf_counter() - start, "fused_ops": {k: v for k, v in ops.items() if k in (
            "MultiHeadAttention", "Attention", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "NhwcConv", "BiasAdd",
            "SkipLayerNormalization", "LayerNormalization", "FastGelu", "BiasGelu", "Gelu")},
            "nodes": sum(ops.values())}
        try:
            options_cpu = ort.SessionOptions()
            options_cpu.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # loading is the test
            ort.InferenceSession(str(out), options_cpu, providers=["CPUExecutionProvider"])
            row["cpu_loads"] = True
        except Exception as e:  # noqa: BLE001 - what the CPU provider says about the fused graph
            row["cpu_loads"], row["cpu_error"] = False, str(e).splitlines()[0][:300]
        report[variant] = row
        if row["cpu_loads"]:
            return report, dataclasses.replace(spec, file=out.name, data_files=[f"{out.name}.data"])
    return report, None


def quantize_for_timing(engine: Path, manifest, feed: dict):
    """The fp32 UNet in INT8 Q/DQ with `diffscore calibrate`'s quantizer (its default float layers), ranges
    from one random latent: the speed is real, the accuracy is not (random weights, random inputs)."""
    from diffscore.calibration.dataset import CalibrationSet
    from diffscore.calibration.quantize import quantize_unet
    from diffscore.export.onnx_export import save_graph

    n = 1  # 4 (in one calibration batch) ran out of 23 GB: the calibrator keeps every activation
    rng = np.random.default_rng(1)
    cal = CalibrationSet(sample=rng.standard_normal((n,) + feed["sample"].shape[1:], dtype=np.float32),
                         timestep=np.linspace(50, 950, n).astype(np.float32),
                         prompt_row=np.arange(n) % len(feed["timestep"]),
                         embeddings=feed["encoder_hidden_states"], image_row=np.arange(n), noise_row=np.arange(n),
                         workload=np.zeros(n, dtype=np.int64))
    fp32 = manifest.graphs["unet"]
    model = quantize_unet(engine / fp32.file, cal)
    return save_graph(model, engine, "unet.int8.onnx", fp32.inputs, fp32.outputs, "int8")


def readme_table(result: dict) -> str:
    ms, peaks = result["ms_per_pass"], result["peak_rss_gb_of_process"]
    rows = "\n".join(f"| {k} | {v / 1000:.1f} s | {ms['torch fp32'] / v:.2f}× | {ms['ONNX Runtime fp32'] / v:.2f}× | "
                     f"{peaks[k]:.1f} GB |"
                     for k, v in ms.items())
    return (f"SD 1.5-size UNet ({result['unet_params_M']:.1f} M parameters, random weights), one pass at batch "
            f"{result['batch']}, per image "
            f"(`bench/export_sd.py`; {machine_line(result['machine'])}):\n\n"
            "| path | per image-pass | vs torch | vs ONNX Runtime fp32 | peak RSS of its process |\n"
            "|---|---|---|---|---|\n"
            f"{rows}\n\nExport {result['export_s']:.0f} s (its process peaked at {peaks['export']:.1f} GB); "
            f"INT8 quantization {result['quantize_s'] or 0:.0f} s, peak {peaks.get('quantize', 0):.1f} GB "
            "(calibrated on one random latent: timing only)." + capture_notes(result))


def capture_notes(result: dict) -> str:
    """The ε̂-only graphs' parity with torch and what ONNX Runtime's transformer optimizer did, where measured."""
    parity = result.get("parity", {})
    notes = [f"{name} vs torch: max rel {v['max_rel']:.2g} ({'PASSED' if v['passed'] else 'FAILED'} at 1e-4)"
             for name, v in parity.items() if name.startswith("ort-eps")]
    for variant, row in (result.get("ort_optimizer") or {}).items():
        fused = ", ".join(f"{k} {v}" for k, v in row["fused_ops"].items()) or "nothing fused"
        if "error" in row:
            notes.append(f"ORT optimizer ({variant}) failed after {row['seconds']:.0f} s: {row['error']}")
            continue
        loads = "loads on the CPU" if row["cpu_loads"] else f"does not load on the CPU ({row.get('cpu_error', '')})"
        notes.append(f"ORT optimizer ({variant}): {row['nodes']} nodes, {fused}; {loads}; {row['seconds']:.0f} s")
    return "" if not notes else "\n\n" + "; ".join(notes) + "."


if __name__ == "__main__":
    main()
