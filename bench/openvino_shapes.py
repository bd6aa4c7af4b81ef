"""Why the OpenVINO runner compiles static batch shapes: the demo UNet on OpenVINO with a dynamic batch
axis (the ONNX graph as exported) and reshaped to a static batch, at fp32, the Q/DQ INT8 graph and the
bf16 hint, beside ONNX Runtime fp32, in one run.

    .venv/bin/python bench/openvino_shapes.py [--batch 128] [--calls 40] [--update-docs]

Each setting runs as the engine runs it on this CPU: one compiled model (or session) served by one
concurrent caller per core (OpenVINO: as many streams), random UNet inputs, best of 3 timed rounds of
`--calls` calls after a warm-up. Writes bench/results/openvino_shapes.json.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_engine_all_precisions, machine, machine_line, publish  # noqa: E402

from diffscore.engine.autoselect import random_unet_feed  # noqa: E402
from diffscore.engine.manifest import Manifest  # noqa: E402


def samples_per_s(call, batch: int, workers: int, calls: int) -> float:
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda _: call(), range(2 * workers)))  # warm-up
        rounds = []
        for _ in range(3):
            start = time.perf_counter()
            list(pool.map(lambda _: call(), range(calls)))
            rounds.append(time.perf_counter() - start)
    return batch * calls / min(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="UNet batch (the engine's on the demo)")
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()

    import onnxruntime as ort
    import openvino as ov

    from diffscore.engine.backends.openvino import cpu_has_bf16

    engine = demo_engine_all_precisions()
    manifest = Manifest.load(engine)
    workers, batch = os.cpu_count() or 1, args.batch
    specs = manifest.graphs["unet"].inputs
    feed = random_unet_feed(manifest, "unet", batch)

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(engine / "unet.onnx"), options, providers=["CPUExecutionProvider"])
    rows = {"ONNX Runtime fp32": samples_per_s(lambda: session.run(None, feed), batch, workers, args.calls)}
    core = ov.Core()
    settings = [("fp32", "unet.onnx", "f32"), ("int8", "unet.int8.onnx", "f32")]
    settings += [("bf16", "unet.onnx", "bf16")] if cpu_has_bf16() else []
    for precision, file, hint in settings:
        for shape in ("dynamic", "static"):
            model = core.read_model(str(engine / file))
            if shape == "static":
                model.reshape({t.name: [batch] + t.shape[1:] for t in specs})
            compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "NUM_STREAMS": str(workers)})
            requests = queue.SimpleQueue()
            for _ in range(workers):
                requests.put(compiled.create_infer_request())

            def call(requests=requests):
                request = requests.get()
                try:
                    request.infer(feed)
                finally:
                    requests.put(request)

            rows[f"OpenVINO {precision}, {shape} batch"] = samples_per_s(call, batch, workers, args.calls)
            print(f"OpenVINO {precision} {shape}: {rows[f'OpenVINO {precision}, {shape} batch']:,.0f} samples/s",
                  flush=True)

    base = rows["ONNX Runtime fp32"]
    result = {"batch": batch, "workers": workers, "calls": args.calls, "samples_per_s": rows}
    table = ["| UNet setting | samples/s | x ONNX Runtime fp32 |", "|---|---:|---:|"]
    table += [f"| {name} | {rate:,.0f} | {rate / base:.2f}x |" for name, rate in rows.items()]
    table += ["",
              f"Demo UNet, batch {batch}, {workers} concurrent callers (OpenVINO: as many streams), best of 3 rounds "
              f"of {args.calls} calls; measured on {machine_line(machine())} by `bench/openvino_shapes.py`."]
    publish("openvino_shapes", result, table, args.update_docs)


if __name__ == "__main__":
    main()
