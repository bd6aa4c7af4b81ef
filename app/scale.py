"""Scoring many images with Ray Data: an actor pool where each actor holds one loaded Engine.

The images go through `map_batches`; each actor loads the engine directory once and scores its
batches with the same `Engine.classify` / `Engine.match` a single process uses, so results are the
same wherever they ran. Ray is an optional extra (`pip install 'diffscore[ray]'`), imported lazily.

Inputs: a folder, image files or glob patterns (read by the actors: on a cluster every node must
see the paths, e.g. a shared filesystem), or a Ray Dataset with an ``image`` column (uint8 arrays
or encoded bytes, as `ray.data.read_images` / `read_binary_files` give), a ``bytes`` column or a
``path`` column. Output rows keep the input's other columns (``path``) and add the scores and an
``error`` column: why an image could not be read (its scores are null; the job goes on).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from diffscore.errors import EngineError, first_line

log = logging.getLogger("diffscore")

IMAGE_COLUMNS = ("image", "bytes", "path")  # where a row's image is, in order of preference
RAY_HINT = "pip install 'diffscore[ray]'"
# Fault-injection hook for the tests: when set to a file path, the first actor batch to create that
# file ends its process (os._exit), so a test can watch Ray restart the actor and retry the batch.
CRASH_ONCE_ENV = "DIFFSCORE_CRASH_ONCE"


def import_ray(what: str = "this command"):
    """Ray, or one line that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise EngineError(f"{what} needs Ray: {RAY_HINT}") from None
    return ray


def start_ray(address: str | None = None, num_cpus: int | None = None, object_store_mb: int | None = None,
              dashboard: bool = False):
    """Join a running cluster (`address`: 'auto', 'ray://head:10001') or start a local Ray; reuse one
    already started in this process. A local one is bounded by `num_cpus` and `object_store_mb`, and every
    process of it listens on loopback only (`loopback_ray`); `dashboard`: Ray's dashboard, on loopback too.
    A cluster joined with `address` binds as its `ray start` said."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    local = address is None
    if local:  # the raylet and every worker inherit this process's environment
        for name, seconds in SERVE_PATIENCE.items():
            os.environ.setdefault(name, seconds)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with loopback_ray(local):
            ray.init(address=address, num_cpus=num_cpus if local else None, include_dashboard=dashboard,
                     dashboard_host=LOOPBACK,
                     object_store_memory=object_store_mb * 2**20 if local and object_store_mb else None,
                     log_to_driver=False, configure_logging=False,
                     runtime_env={"worker_process_setup_hook": "diffscore.app.scale.bind_worker_servers"},
                     **({"_node_ip_address": LOOPBACK} if local else {}))
    except ConnectionError as e:
        raise EngineError(f"cannot reach the Ray cluster at {address}: {first_line(e)}") from None
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)  # ray.init installs sys.exit(15); the CLI's handler exits 143
    return ray


LOOPBACK = "127.0.0.1"
# Ray Serve gives its HTTP proxy 5 s to report ready (10 s per health check) before the controller kills it; on a
# busy 2-core machine a new worker process takes longer than that to start, and `serve` failed with "The actor
# never ran - it was cancelled before it started running". A set environment variable still wins.
SERVE_PATIENCE = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


@contextmanager
def loopback_ray(local: bool):
    """While a local Ray starts, its node address is loopback, so GCS, raylet, object manager, agents and workers
    listen on 127.0.0.1 only. ray.init(_node_ip_address="127.0.0.1") alone is turned back into the machine's
    address on Linux; Ray keeps loopback where multi-node clusters are off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
    its macOS/Windows default), a setting read once at import, hence set on the imported module here."""
    from ray._private import ray_constants  # a Ray without the setting binds as it does (the tests catch it)

    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    ray_constants.ENABLE_RAY_CLUSTER = saved and not local
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def bind_worker_servers() -> None:
    """Ray's worker_process_setup_hook: a gRPC server a worker opens on every interface ("[::]:0": Serve's
    inter-deployment server in each replica) listens on this node's address instead, loopback for a local Ray."""
    import ray

    try:
        from ray._common import tls_utils
    except ImportError:  # a Ray that moved it: the servers bind as Ray says (the tests catch it)
        return
    add_port = tls_utils.add_port_to_grpc_server

    def on_node_address(server, address: str):
        host, _, port = address.rpartition(":")
        if host in ("[::]", "0.0.0.0"):
            address = f"{ray.util.get_node_ip_address()}:{port}"
        return add_port(server, address)

    tls_utils.add_port_to_grpc_server = on_node_address


def check_engine_dir(engine_dir) -> Path:
    """The engine directory as an absolute path (actors and replicas may run elsewhere), checked here (its
    manifest and files, as loading does) so that a wrong path or a damaged engine is one line before Ray starts
    anything, not a replica or actor failing to start."""
    from diffscore.engine.manifest import Manifest

    engine_dir = Path(engine_dir).resolve()
    if not (engine_dir / "manifest.json").is_file():
        raise EngineError(f"{engine_dir} is not an engine directory (no manifest.json); "
                          f"make one with `diffscore export`")
    Manifest.load(engine_dir)
    return engine_dir


def engine_threads(num_cpus: float, num_gpus: float) -> int | None:
    """ONNX Runtime threads of an actor or replica: the CPUs Ray reserved for it (on a GPU: ORT's default)."""
    return None if num_gpus else max(1, int(num_cpus))


def is_dataset(images) -> bool:
    return type(images).__module__.startswith("ray.data")


def image_rows(images):
    """A Ray Dataset, checked for an image column, as it is; anything else is files, folders or glob
    patterns (engine/images.expand_images), one {"path": ...} row per file."""
    if is_dataset(images):
        columns = images.columns() or []
        if not any(c in columns for c in IMAGE_COLUMNS):
            raise EngineError(f"the dataset has no image column: expected one of {', '.join(IMAGE_COLUMNS)}, "
                              f"found {', '.join(columns) or 'none'}")
        return images
    from diffscore.engine.images import expand_images

    return [{"path": str(p)} for p in expand_images([images] if isinstance(images, (str, Path)) else images)]


def _read_images(batch: dict) -> tuple[list, list]:
    """The batch's images as PIL images (None where unreadable) and the matching error messages. Encoded bytes
    get the checks of a file (bomb limit, formats: engine/images.decode_image)."""
    from diffscore.engine.images import decode_image, to_pil

    column = next(c for c in IMAGE_COLUMNS if c in batch)
    images, errors = [], []
    for x in batch[column]:
        try:
            if isinstance(x, (bytes, bytearray)):
                x = decode_image(bytes(x), "image bytes")
            images.append(to_pil(str(x) if column == "path" else x))
            errors.append(None)
        except EngineError as e:
            images.append(None)
            errors.append(str(e))
    return images, errors


def _crash_once_for_tests() -> None:
    marker = os.environ.get(CRASH_ONCE_ENV)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)


class EngineActor:
    """One loaded Engine per Ray actor; `__call__` scores one batch of rows (numpy format) into an
    Arrow table: the batch's other columns, then the task's result columns."""

    def __init__(self, engine_dir: str, task: str, options: dict, backend: str = "auto", precision: str = "fp32",
                 threads: int | None = None):
        import diffscore

        self.engine = diffscore.load(engine_dir, backend=backend, precision=precision, threads=threads)
        self.task, self.options = task, options

    def __call__(self, batch: dict):
        import pyarrow as pa

        _crash_once_for_tests()
        images, errors = _read_images(batch)
        ok = [i for i, e in enumerate(errors) if e is None]
        good = [images[i] for i in ok]
        if self.task == "match":
            texts = self.options["texts"]
            scores = np.asarray(self.engine.match(good, **self.options)) if good else np.zeros((0, len(texts)))
            columns = {"scores": pa.array(spread(scores.tolist(), ok, len(errors)), pa.list_(pa.float64())),
                       "best": pa.array(spread([texts[j] for j in scores.argmax(axis=1)], ok, len(errors)),
                                        pa.string())}
        else:
            results = spread(self.engine.classify(good, **self.options) if good else [], ok, len(errors))
            columns = classification_columns(results)
        kept = {k: pa.array(v.tolist()) for k, v in batch.items() if k not in ("image", "bytes")}
        return pa.table({**kept, **columns, "error": pa.array(errors, pa.string())})


def spread(values: list, rows: list[int], n: int) -> list:
    """values[k] at position rows[k] of a list of n, None elsewhere (the rows whose image failed)."""
    out = [None] * n
    for row, value in zip(rows, values):
        out[row] = value
    return out


def classification_columns(results) -> dict:
    """label, ranking (best first: list of {label, score}), passes [, confidence] as Arrow arrays;
    None in `results` (an image that could not be read) gives nulls."""
    import pyarrow as pa

    ranking_type = pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())]))
    columns = {
        "label": pa.array([r and r.label for r in results], pa.string()),
        "ranking": pa.array([r and [{"label": c, "score": float(s)} for c, s in r.ranking] for r in results],
                            ranking_type),
        "passes": pa.array([r and int(r.passes) for r in results], pa.int64()),
    }
    if any(hasattr(r, "confidence") for r in results):
        columns["confidence"] = pa.array([getattr(r, "confidence", None) for r in results], pa.float64())
    return columns


def _score_dataset(images, engine_dir, task: str, options: dict, *, actors: int, batch_images: int,
                   num_cpus: float, num_gpus: float, backend: str, precision: str, address: str | None,
                   ray_options: dict | None):
    engine_dir = check_engine_dir(engine_dir)
    if actors < 1 or batch_images < 1:
        raise EngineError(f"actors and batch_images must be ≥ 1, got {actors} and {batch_images}")
    rows = image_rows(images)  # a user's mistake shows before Ray starts
    ray = start_ray(address)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    dataset = rows if is_dataset(rows) else ray.data.from_items(rows)
    return dataset.map_batches(
        EngineActor, batch_size=batch_images, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs=dict(engine_dir=str(engine_dir), task=task, options=options, backend=backend,
                                   precision=precision, threads=engine_threads(num_cpus, num_gpus)),
        num_cpus=num_cpus, num_gpus=num_gpus, **(ray_options or {}),
    )


def engine_errors(error: Exception) -> None:
    """Re-raise an EngineError that an actor raised (Ray Data passes it on only as traceback text) as
    the one line it is; anything else as it came."""
    prefix = f"{EngineError.__module__}.{EngineError.__name__}: "
    for line in reversed(str(error).splitlines()):
        if line.startswith(prefix):
            raise EngineError(line[len(prefix):]) from None
    raise error


def classify_dataset(images, engine_dir, labels: list[str] | None = None, *, method: str = "dc",
                     head: str | None = None, template: str | None = None, stages=None, loss: str | None = None,
                     seed: int = 0, batch_size: int | None = None, actors: int = 1, batch_images: int = 16,
                     num_cpus: float = 1, num_gpus: float = 0, backend: str = "auto", precision: str = "fp32",
                     address: str | None = None, ray_options: dict | None = None):
    """A lazy Ray Dataset of classifications: the input's columns (``path``) + label, ranking, passes.

    Same options and same results as `Engine.classify` (method dc: the Diffusion Classifier among
    `labels`; method head: a trained head). `actors` engines run at once, each with `num_cpus` CPUs
    and `num_gpus` GPUs (1 = one actor per GPU), on `batch_images` images at a time. `ray_options`
    go to `map_batches` (e.g. accelerator_type, resources). Consume it with `write_results`,
    `.take_all()` or any Ray Data writer.
    """
    if method == "dc":
        from diffscore.engine.options import check_labels

        labels = check_labels(labels or [])  # refuse bad labels here, not in every actor
    from diffscore.engine.classify_options import pack

    record = pack(method, None, dict(labels=labels, head=head, template=template, loss=loss, seed=seed,
                                     stages=[tuple(s) for s in stages] if stages else None))
    options = dict(options=record, batch_size=batch_size)
    return _score_dataset(images, engine_dir, "classify", options, actors=actors, batch_images=batch_images,
                          num_cpus=num_cpus, num_gpus=num_gpus, backend=backend, precision=precision,
                          address=address, ray_options=ray_options)


def match_dataset(images, engine_dir, texts: list[str], *, steps: int | None = None, bias_weight: float | None = None,
                  seed: int = 0, batch_size: int | None = None, actors: int = 1, batch_images: int = 16,
                  num_cpus: float = 1, num_gpus: float = 0, backend: str = "auto", precision: str = "fp32",
                  address: str | None = None, ray_options: dict | None = None):
    """A lazy Ray Dataset of DSD scores: the input's columns + scores (one per text, in `texts`
    order, higher = better) and best (the best-matching text). Same as `Engine.match`."""
    from diffscore.engine.options import check_labels

    options = dict(texts=check_labels(texts, what="texts"), steps=steps, bias_weight=bias_weight, seed=seed,
                   batch_size=batch_size)
    return _score_dataset(images, engine_dir, "match", options, actors=actors, batch_images=batch_images,
                          num_cpus=num_cpus, num_gpus=num_gpus, backend=backend, precision=precision,
                          address=address, ray_options=ray_options)


OUTPUT_SUFFIXES = (".parquet", ".jsonl")


def check_output(output: str | Path) -> Path:
    output = Path(output)
    if output.suffix not in OUTPUT_SUFFIXES:
        raise EngineError(f"--output {output} must end in {' or '.join(OUTPUT_SUFFIXES)}")
    if not output.parent.is_dir():
        raise EngineError(f"the folder of --output {output} does not exist")
    return output


def write_results(dataset, output: str | Path) -> tuple[int, int]:
    """Stream a result Dataset into one Parquet or JSONL file on this machine; returns (rows, rows
    whose image could not be read).

    Written to a temporary name beside `output` and renamed at the end: a failed job leaves nothing."""
    import json

    import pyarrow.parquet as pq

    output = check_output(output)
    partial = output.with_name(f".{output.name}.partial")
    rows, failed, writer = 0, 0, None
    try:
        with open(partial, "wb") as f:
            try:
                for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                    if output.suffix == ".parquet":
                        writer = writer or pq.ParquetWriter(f, table.schema)
                        writer.write_table(table)
                    else:
                        f.writelines(json.dumps(row).encode() + b"\n" for row in table.to_pylist())
                    rows += table.num_rows
                    failed += table.num_rows - table["error"].null_count
            except EngineError:
                raise
            except Exception as e:
                engine_errors(e)
            if writer is not None:
                writer.close()
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return rows, failed
