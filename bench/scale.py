"""Scale-out (issue 16): the demo job (zero-shot Diffusion Classifier on held-out digits, the demo's
stages) in one process vs Ray Data with 1 and 2 actors, and Ray Serve requests/s with p50/p95 latency
at concurrency 1 and 8, on a local Ray bounded to this machine's cores.

    .venv/bin/python bench/scale.py [--images N] [--requests N] [--update-docs]

The same PNG files go through every path; each Ray path's results are checked against the
in-process ones. Ray Data times are end to end (actor start-up and engine loading included; Ray's own
start-up is reported apart). Each actor gets cores / actors CPUs (= its ONNX Runtime threads); the
in-process engine and the one Serve replica get all of them. Serving: one image per request, base64
PNG, over HTTP on 127.0.0.1; `concurrency` clients send requests back to back.

Writes bench/results/scale.json; --update-docs fills docs/benchmarks.md's <!-- bench:scale --> section.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared 2-core box: sleep, do not spin, in OpenMP waits

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, publish  # noqa: E402

import diffscore  # noqa: E402
from diffscore.app.demo import demo_engine_dir  # noqa: E402
from diffscore.app.digits import CLASS_NAMES, load_digits_split  # noqa: E402

LABELS = list(CLASS_NAMES)


def same(rows: list[dict], results) -> bool:
    return len(rows) == len(results) and all(
        row["label"] == r.label and [(x["label"], x["score"]) for x in row["ranking"]]
        == [(c, float(s)) for c, s in r.ranking]
        for row, r in zip(rows, results))


def serve_load(url: str, bodies: list[bytes], concurrency: int) -> dict:
    """Send every body once, `concurrency` at a time; requests/s and latency percentiles (ms)."""
    def send(body: bytes) -> tuple[float, dict]:
        start = time.perf_counter()
        req = urllib.request.Request(url + "/classify", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            answer = json.loads(r.read())
        return time.perf_counter() - start, answer

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(send, bodies))
    wall = time.perf_counter() - start
    latency = np.array([t for t, _ in out]) * 1000
    return {"concurrency": concurrency, "requests": len(bodies), "requests_per_s": len(bodies) / wall,
            "p50_ms": float(np.percentile(latency, 50)), "p95_ms": float(np.percentile(latency, 95)),
            "answers": [a["results"][0] for _, a in out]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="held-out digits for the batch job")
    parser.add_argument("--requests", type=int, default=32, help="requests per serving run (one image each)")
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()

    import base64

    from diffscore.app.scale import classify_dataset, start_ray
    from diffscore.app.serve import start_server

    cores = os.cpu_count() or 1
    engine_dir = demo_engine_dir()
    images = list(load_digits_split().test_images[: args.images])
    folder = Path(tempfile.mkdtemp(prefix="diffscore-scale-"))
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{i:04d}.png")
        Image.fromarray(image).save(paths[-1])
    load_start = os.getloadavg()[0]
    rows, checks = [], {}

    engine = diffscore.load(engine_dir, backend="ort-cpu")
    start = time.perf_counter()
    expected = engine.classify([str(p) for p in paths], LABELS, seed=0)
    base = time.perf_counter() - start
    rows.append({"path": f"in-process `Engine.classify` ({cores} threads)", "images_per_s": len(paths) / base,
                 "seconds": base})

    start = time.perf_counter()
    start_ray(num_cpus=cores, object_store_mb=500)
    ray_start = time.perf_counter() - start
    for actors in (1, 2):
        start = time.perf_counter()
        out = classify_dataset(folder, engine_dir, LABELS, seed=0, actors=actors, batch_images=16,
                               num_cpus=cores / actors, backend="ort-cpu").take_all()
        seconds = time.perf_counter() - start
        checks[f"ray_data_{actors}_identical"] = same(out, expected)
        rows.append({"path": f"Ray Data, {actors} actor{'s' * (actors > 1)} × {cores // actors} "
                             f"CPU{'s' * (cores // actors > 1)}",
                     "images_per_s": len(paths) / seconds, "seconds": seconds})

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = start_server(engine_dir, port=port, num_cpus=cores, backend="ort-cpu", max_batch_size=16, batch_wait_s=0.01)
    encoded = []
    for p in paths:
        encoded.append(json.dumps({"images": [base64.b64encode(p.read_bytes()).decode()], "labels": LABELS}).encode())
    serve_load(url, encoded[:2], 1)  # warm-up: the replica's first requests
    serving = []
    for concurrency in (1, 8):
        bodies = (encoded * (args.requests // len(encoded) + 1))[: args.requests]
        result = serve_load(url, bodies, concurrency)
        answers = result.pop("answers")
        checks[f"serve_c{concurrency}_identical"] = all(
            a["label"] == r.label and a["ranking"] == [[c, float(s)] for c, s in r.ranking]
            for a, r in zip(answers, (expected * (args.requests // len(expected) + 1))[: args.requests]))
        serving.append(result)
    info = json.loads(urllib.request.urlopen(url + "/info", timeout=30).read())
    from ray import serve

    serve.shutdown()
    import ray

    ray.shutdown()
    load_end = os.getloadavg()[0]

    info_machine = machine()
    table = [
        "| batch job: demo DC (stages (10, 3) → (40, 1), 190 UNet passes / image) | images/s | vs in-process |",
        "|---|---:|---:|",
        *[f"| {r['path']} | {r['images_per_s']:.2f} | {r['images_per_s'] / rows[0]['images_per_s']:.2f}× |"
          for r in rows],
        "",
        "| Ray Serve, 1 replica × " + f"{cores} CPUs, one image per request | requests/s | p50 latency | p95 latency |",
        "|---|---:|---:|---:|",
        *[f"| concurrency {s['concurrency']} ({s['requests']} requests) | {s['requests_per_s']:.2f} | "
          f"{s['p50_ms']:.0f} ms | {s['p95_ms']:.0f} ms |" for s in serving],
        "",
        f"One run of `bench/scale.py` on {len(paths)} held-out digits: every Ray result identical to the in-process "
        f"one ({'yes' if all(checks.values()) else 'NO: ' + ', '.join(k for k, v in checks.items() if not v)}). Ray "
        f"Data times include actor start-up and engine loading; starting Ray itself took {ray_start:.1f} s (not "
        f"counted). The replica ran {info['served']['requests']} requests in {info['served']['engine_calls']} engine "
        f"calls (`@serve.batch`). The machine is shared with other jobs (1-min load average {load_start:.1f} at the "
        f"start, {load_end:.1f} at the end), so ratios are rough. {machine_line(info_machine)}, ray {ray.__version__}.",
    ]
    publish("scale", {"images": len(paths), "batch": rows, "serving": serving, "checks": checks,
                      "ray_start_s": ray_start, "served": info["served"], "load_average": [load_start, load_end],
                      "ray": ray.__version__}, table, args.update_docs)


if __name__ == "__main__":
    main()
