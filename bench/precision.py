"""fp32 vs fp16 vs int8 UNet on ONNX Runtime CPU, and fp32 vs bf16 vs int8 on OpenVINO, for the demo
classification job, in one run: images/s, ratio to ONNX Runtime fp32, held-out accuracy and top-1
agreement with ONNX Runtime fp32.

    .venv/bin/python bench/precision.py [--limit N] [--rounds R] [--profile] [--smoothquant A] [--update-docs]

The held-out digits are split into R chunks and the precisions take turns on each chunk, so a load
change on a shared machine hits all of them alike. One untimed pass over the same chunks comes first (steady state: \
compiled
batch shapes, prompt cache). The engines run as `diffscore.load` sets them up
(on this CPU: concurrent single-threaded runs of one session). The INT8 UNet is the engine's own
(`diffscore calibrate --demo` defaults, run here first if the engine has none): calibrated and gated on
training digits only; one more INT8 row is the same calibration with SmoothQuant-style scaling at α = A
(default 0.5) on a copy of the engine. --profile adds where the UNet time goes per op type (fp32 vs int8, one thread,
one batch) and the int8/fp32 throughput of a plain GEMM on this CPU: what bounds the INT8 speed-up.
Writes bench/results/precision.json; --update-docs fills docs/benchmarks.md's precision table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classify import cpu_variants  # noqa: E402
from common import demo_engine_all_precisions, machine, machine_line, publish  # noqa: E402

import diffscore  # noqa: E402
from diffscore.app.digits import CLASS_NAMES, load_digits_split, training_images  # noqa: E402
from diffscore.engine.manifest import Manifest  # noqa: E402

PRECISIONS = ("fp32", "fp16", "int8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="first N held-out images (default: all)")
    parser.add_argument("--rounds", type=int, default=5, help="chunks the precisions take turns on")
    parser.add_argument("--profile", action="store_true", help="also profile the UNet per op type and a plain GEMM")
    parser.add_argument("--smoothquant", type=float, default=0.5, metavar="ALPHA",
                        help="add an INT8 row calibrated with SmoothQuant-style scaling at this α (0: no such row)")
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()

    engine_dir = demo_engine_all_precisions()
    calibration = Manifest.load(engine_dir).calibration
    split = load_digits_split()
    images, truth = list(split.test_images[: args.limit]), split.test_labels[: args.limit]
    labels = list(CLASS_NAMES)
    engines = {p: diffscore.load(engine_dir, backend="ort-cpu", precision=p) for p in PRECISIONS}
    engines.update({name: diffscore.load(engine_dir, backend=backend, precision=p)
                    for name, backend, p in cpu_variants() if backend == "openvino"})
    scratch = tempfile.TemporaryDirectory(prefix="diffscore-precision-")
    if args.smoothquant:  # the same calibration on a copy of the engine, smoothed first
        from diffscore.calibration.pipeline import calibrate

        smoothed_dir = shutil.copytree(engine_dir, Path(scratch.name) / "engine")
        calibrate(smoothed_dir, images=training_images(), labels=list(CLASS_NAMES), source="demo training digits",
                  smoothquant_alpha=args.smoothquant, progress=True)
        engines[f"int8 + SmoothQuant α={args.smoothquant:g}"] = diffscore.load(smoothed_dir, backend="ort-cpu",
                                                                               precision="int8")
    chunks = np.array_split(np.arange(len(images)), args.rounds)
    for engine in engines.values():
        # Warm-up: one untimed pass over the same chunks, so sessions, the prompt cache and every UNet batch
        # shape the race produces are ready (OpenVINO compiles a model per batch bucket on first use: 0.5-2.5 s
        # each for the demo UNet, once per process): the timed rounds measure the steady state.
        for chunk in chunks:
            engine.classify([images[i] for i in chunk], labels)

    seconds = dict.fromkeys(engines, 0.0)
    predicted: dict[str, list[int]] = {p: [] for p in engines}
    passes: dict[str, list[int]] = {p: [] for p in engines}
    for chunk in chunks:
        batch = [images[i] for i in chunk]
        for p, engine in engines.items():
            start = time.perf_counter()
            results = engine.classify(batch, labels)
            seconds[p] += time.perf_counter() - start
            predicted[p] += [CLASS_NAMES.index(r.label) for r in results]
            passes[p] += [r.passes for r in results]
        print(f"{len(predicted['fp32'])}/{len(images)} images: " +
              ", ".join(f"{p} {len(predicted[p]) / s:.2f}/s" for p, s in seconds.items()), flush=True)

    ref = np.array(predicted["fp32"])
    rows = {}
    for p in engines:
        got = np.array(predicted[p])
        rows[p] = {"images_per_s": len(images) / seconds[p], "ratio_to_fp32": seconds["fp32"] / seconds[p],
                   "accuracy": float((got == truth).mean()), "agreement_with_fp32": float((got == ref).mean()),
                   "seconds": seconds[p]}
    engine = engines["fp32"]
    result = {
        "images": len(images), "rounds": args.rounds, "strategy": engine.defaults.strategy,
        "stages": engine.defaults.stages, "loss": engine.defaults.loss,
        "passes_per_image": float(np.mean(passes["fp32"])),
        "workers": workers(engine), "batch_size": engine.default_batch_size(),
        "int8_calibration": {k: getattr(calibration, k)
                             for k in ("method", "samples", "source", "float_layers", "gate")},
        "load_average_1min_at_end": os.getloadavg()[0],
        "rows": rows,
    }
    if args.profile:
        result["profile"] = profile(engine_dir)
    table = ["| UNet precision (backend: ONNX Runtime CPU unless named) | images/s | ratio to fp32 | held-out accuracy "
             "| top-1 agreement with fp32 |",
             "|---|---:|---:|---:|---:|"]
    for p, row in rows.items():
        table.append(f"| {p} | {row['images_per_s']:.2f} | {row['ratio_to_fp32']:.2f}x | {row['accuracy']:.2%} | "
                     f"{row['agreement_with_fp32']:.2%} |")
    table.append("")
    table.append(f"One run, {len(images)} held-out digits in {args.rounds} interleaved rounds, the engine's default "
                 f"strategy ({result['strategy']}: {result['passes_per_image']:.1f} UNet passes per image; fixed "
                 f"stages would be "
                 f"{result['stages']}), "
                 f"{result['workers']} concurrent single-threaded UNet runs (OpenVINO: as many streams), batch "
                 f"{result['batch_size']}, load average {result['load_average_1min_at_end']:.1f} at the end (2 cores "
                 f"shared "
                 f"with other jobs); fp32 = ONNX Runtime fp32; INT8: "
                 f"{calibration.method} on {calibration.samples} UNet inputs from training digits, "
                 f"{len(calibration.float_layers)} layers kept float. Measured on {machine_line(machine())} by "
                 "`bench/precision.py`.")
    if args.profile:
        print(json.dumps(result["profile"], indent=1))
    publish("precision", result, table, args.update_docs)
    scratch.cleanup()


def workers(engine) -> int:
    """Concurrent UNet runs `diffscore.load` chose (engine.py's rule for ort-cpu)."""
    from diffscore.engine.backends.choice import CONCURRENT_MAX_ELEMENTS

    return (os.cpu_count() or 1) if int(np.prod(engine.manifest.sample_shape)) <= CONCURRENT_MAX_ELEMENTS else 1


def profile(engine_dir: Path, batch: int = 128, repeats: int = 5) -> dict:
    """UNet ms per op type (fp32 vs int8) on one batch of calibration inputs, and a GEMM's int8/fp32 rate."""
    import onnxruntime as ort

    from diffscore.calibration.dataset import CalibrationSet

    manifest = Manifest.load(engine_dir)
    cal = CalibrationSet.load(engine_dir / manifest.calibration.file)
    idx = np.arange(batch) % len(cal)
    feed = {"sample": cal.sample[idx], "timestep": cal.timestep[idx],
            "encoder_hidden_states": cal.embeddings[cal.prompt_row[idx]]}
    out = {"batch": batch, "threads": 1}
    with tempfile.TemporaryDirectory() as tmp:
        for key in ("unet", "unet.int8"):
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / key)
            path = str(engine_dir / manifest.graphs[key].file)
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            session.run(None, feed)
            start = time.perf_counter()
            for _ in range(repeats):
                session.run(None, feed)
            wall = (time.perf_counter() - start) / repeats
            events = json.loads(Path(session.end_profiling()).read_text())
            per_op: dict[str, float] = {}  # mean over all runs, the warm-up included
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    op = e["args"]["op_name"]
                    per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1e3 / (repeats + 1)
            top = dict(sorted(per_op.items(), key=lambda kv: -kv[1])[:12])
            out[key] = {"ms_per_batch": wall * 1e3, "samples_per_s": batch / wall, "ms_per_op_type": top}
    out["int8_variants"] = int8_variants(engine_dir, feed)
    out["gemm"] = [gemm_rates(), gemm_rates(2048, 1024, 1024)]
    return out


def int8_variants(engine_dir: Path, feed: dict, repeats: int = 3) -> dict:
    """UNet samples/s (one thread) when only the convs or only the linear layers are int8: is any part worth it?"""
    import onnx
    import onnxruntime as ort

    from diffscore.calibration import quantize
    from diffscore.calibration.dataset import CalibrationSet

    manifest = Manifest.load(engine_dir)
    cal = CalibrationSet.load(engine_dir / manifest.calibration.file)
    fp32 = engine_dir / manifest.graphs["unet"].file
    layers = quantize.quantizable_layers(onnx.load(str(fp32), load_external_data=False))
    fragile = quantize.select_float(layers)
    convs = {name for name, nodes in layers.items() if all(n.endswith("/Conv") for n in nodes)}
    keep_sets = {"fp32": list(layers), "int8 (default float layers)": fragile,
                 "int8 convs only": sorted(set(fragile) | (set(layers) - convs)),
                 "int8 linear layers only": sorted(set(fragile) | convs)}
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, keep in keep_sets.items():
            model = quantize.quantize_unet(fp32, cal, keep_float=keep, ranges_cache=Path(tmp) / "ranges.json")
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            session.run(None, feed)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                session.run(None, feed)
                best = min(best, time.perf_counter() - start)
            rates[name] = len(feed["sample"]) / best
    return {name: {"samples_per_s": r, "ratio_to_fp32": r / rates["fp32"]} for name, r in rates.items()}


def gemm_rates(m: int = 8192, k: int = 576, n: int = 64, repeats: int = 10) -> dict:
    """One MatMul of the UNet's largest conv shape (im2col: batch·H·W x 9·C_in x C_out), fp32 vs int8 Q/DQ."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)

    def graph(int8: bool) -> bytes:
        inits = [numpy_helper.from_array(w, "w")]
        nodes = [helper.make_node("MatMul", ["xa", "wa"], ["y"])]
        if int8:
            wq = np.clip(np.round(w / (np.abs(w).max() / 127)), -127, 127).astype(np.int8)
            inits = [numpy_helper.from_array(wq, "wq"),
                     numpy_helper.from_array(np.float32(np.abs(w).max() / 127), "ws"),
                     numpy_helper.from_array(np.float32(np.abs(x).max() / 127), "xs"),
                     numpy_helper.from_array(np.int8(0), "z"), numpy_helper.from_array(np.float32(1.0), "ys")]
            nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "z"], ["xq"]),
                     helper.make_node("DequantizeLinear", ["xq", "xs", "z"], ["xa"]),
                     helper.make_node("DequantizeLinear", ["wq", "ws", "z"], ["wa"]),
                     helper.make_node("MatMul", ["xa", "wa"], ["y0"]),
                     helper.make_node("QuantizeLinear", ["y0", "ys", "z"], ["yq"]),
                     helper.make_node("DequantizeLinear", ["yq", "ys", "z"], ["y"])]
        else:
            nodes = [helper.make_node("Identity", ["x"], ["xa"]), helper.make_node("Identity", ["w"], ["wa"])] + nodes
        g = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()

    rates = {}
    for name, int8 in (("fp32", False), ("int8", True)):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(graph(int8), options, providers=["CPUExecutionProvider"])
        session.run(None, {"x": x})
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(repeats):
                session.run(None, {"x": x})
            best = min(best, (time.perf_counter() - start) / repeats)
        rates[name] = 2 * m * k * n / best / 1e9  # GOP/s
    return {"shape": [m, k, n], "gops_fp32": rates["fp32"], "gops_int8": rates["int8"],
            "int8_over_fp32": rates["int8"] / rates["fp32"]}


if __name__ == "__main__":
    main()
