"""backend="auto" on a CPU: the backend and threading measured fastest for this engine on this machine.

No fixed preference: which of ONNX Runtime and OpenVINO wins, and whether one multi-threaded run or
several concurrent single-threaded runs wins, depends on the CPU, the UNet's size and the precision.
So the first `auto` load times each candidate on one batch of random UNet inputs (best of a few
calls, a second or so for a small UNet) and stores the verdict in the user cache, keyed by the UNet
graph's sha256, the precision, the thread count and the machine; later loads read it back, and
`diffscore info` prints it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from diffscore.engine.backends.openvino import cpu_flags, cpu_has_bf16, cpuinfo, openvino_version
from diffscore.engine.cache import cache_root
from diffscore.engine.manifest import Manifest
from diffscore.errors import EngineError

log = logging.getLogger("diffscore")
CALLS = 3  # timed rounds per candidate, after one warm-up round; the best round counts
REVISION = 2  # of the runners measured: a new one (2: OpenVINO static-shape buckets) measures again


def candidates(precision: str, threads: int | None) -> list[tuple[str, int]]:
    """(backend, concurrent runs): one run on every thread, and one single-threaded run per thread."""
    backends = ([] if precision == "bf16" else ["ort-cpu"]) + (["openvino"] if openvino_version() else [])
    if not backends:
        raise EngineError("precision bf16 needs the openvino backend: pip install 'diffscore[openvino]'")
    return [(b, w) for b in backends for w in sorted({1, threads or os.cpu_count() or 1})]


def choice_path(manifest: Manifest, precision: str, threads: int | None) -> Path:
    """Where the verdict for this UNet, precision and thread count on this machine lives."""
    import onnxruntime

    from diffscore.engine.manifest import unet_graph

    key = [REVISION, manifest.graphs[unet_graph(precision)].sha256, precision, threads,
           cpuinfo("model name") or platform.processor(), os.cpu_count(),
           sorted(cpu_flags()), onnxruntime.__version__, openvino_version()]
    return cache_root() / "auto" / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.json"


def cached_choice(manifest: Manifest, precision: str, threads: int | None = None) -> dict | None:
    path = choice_path(manifest, precision, threads)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def choose_cpu_backend(engine_dir: Path, manifest: Manifest, precision: str, threads: int | None) -> tuple[str, int]:
    """(backend, concurrent runs) for this engine and precision here: cached, else measured now and cached."""
    found = cached_choice(manifest, precision, threads)
    if found:
        return found["backend"], found["workers"]
    options = candidates(precision, threads)
    rates = {}
    if len(options) > 1:
        log.warning("backend auto: timing %d CPU backend settings on this engine (once per engine and machine)",
                    len(options))
        for backend, workers in options:
            try:
                rates[label(backend, workers)] = measure(engine_dir, manifest, precision, backend, workers, threads)
            except EngineError as e:  # a backend that cannot run this graph is no candidate
                log.warning("backend auto: %s skipped: %s", label(backend, workers), e)
    best = max(rates, key=rates.get) if rates else label(*options[0])
    backend, workers = next(o for o in options if label(*o) == best)
    choice = {"backend": backend, "workers": workers, "precision": precision, "threads": threads,
              "samples_per_s": rates, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_average_1min": round(os.getloadavg()[0], 2)}
    path = choice_path(manifest, precision, threads)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(choice, indent=1))
        tmp.replace(path)  # never a half-written verdict
    except OSError as e:
        log.warning("backend auto: could not cache the choice in %s: %s", path.parent, e)
    return backend, workers


def label(backend: str, workers: int) -> str:
    return f"{backend} x{workers}"


def auto_lines(manifest: Manifest) -> list[str]:
    """For `diffscore info`: per UNet precision the engine has, what auto picks on this CPU and why."""
    from diffscore.engine.manifest import PRECISIONS, unet_graph

    bf16 = openvino_version() is not None and cpu_has_bf16()
    return [describe(cached_choice(manifest, p), p) for p in PRECISIONS
            if unet_graph(p) in manifest.graphs and (p != "bf16" or bf16)]


def describe(choice: dict | None, precision: str) -> str:
    """One line: what auto picks on this CPU for `precision`, and the figures it picked by."""
    if choice is None:
        return f"auto on this CPU, {precision}: not measured yet (the first load with backend auto measures it)"
    rates = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(choice["samples_per_s"].items(), key=lambda kv: -kv[1]))
    runs = "one run" if choice["workers"] == 1 else f"{choice['workers']} concurrent single-threaded runs"
    why = f"fastest measured, UNet samples/s: {rates}" if rates else "the only candidate here"
    return (f"auto on this CPU, {precision}: {choice['backend']} ({runs}); {why} "
            f"({choice['date']}, load average {choice['load_average_1min']})")


def random_unet_feed(manifest: Manifest, graph: str, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the right names, shapes and dtypes for timing a UNet graph (timesteps in range)."""
    from diffscore.engine.graph_contract import ModelDims, graph_contracts, role_of

    return graph_contracts(ModelDims.of(manifest))[role_of(graph)].sample_feed(batch, np.random.default_rng(seed))


def measure(engine_dir: Path, manifest: Manifest, precision: str, backend: str, workers: int,
            threads: int | None) -> float:
    """UNet samples/s of one setting: `workers` concurrent calls of one engine batch each, best round of CALLS."""
    from diffscore.engine.backends.choice import make_runner
    from diffscore.engine.manifest import unet_graph

    graph = unet_graph(precision)
    runner = make_runner(engine_dir, manifest, graph, backend, 0, threads, workers=workers, precision=precision)
    batch = int(np.clip(2**13 // int(np.prod(manifest.sample_shape)), 1, 128))  # Engine.default_batch_size on CPU
    feed = random_unet_feed(manifest, graph, batch)
    seconds = []
    with ThreadPoolExecutor(workers) as pool:
        for _ in range(CALLS + 1):  # the first round warms up
            start = time.perf_counter()
            list(pool.map(lambda _: runner.infer(feed), range(workers)))
            seconds.append(time.perf_counter() - start)
    return batch * workers / min(seconds[1:])
