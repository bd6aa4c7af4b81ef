"""Scale-out commands (Ray): batch (Ray Data) and serve (Ray Serve)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.text import Text

from diffscore.app.cli.options import (Backend, BackendOpt, LabelsFileOpt, LabelsOpt, LimitOpt, Loss, Method,
                                       Precision, PrecisionOpt, SeedOpt, app, image_paths, parse_stages, read_labels,
                                       read_texts)
from diffscore.app.render import err, say
from diffscore.app.runs import check_target
from diffscore.errors import EngineError

AddressOpt = typer.Option(None, "--address", help="a running Ray cluster ('auto', 'ray://head:10001'); "
                          "default: start a local Ray on this machine")
CpusPerActorOpt = typer.Option(1.0, help="CPUs Ray reserves for each engine (ONNX Runtime threads on CPU)")
GpusPerActorOpt = typer.Option(0.0, help="GPUs for each engine: 1 = one engine per GPU")


@app.command()
def batch(
    engine: Path = typer.Argument(..., help="engine directory (on a cluster: at the same path on every node)"),
    images: List[str] = typer.Argument(..., help="image files, folders or glob patterns (every Ray node must see "
                                                 "them)"),
    output: Path = typer.Option(..., "--output", "-o", help="results file: .parquet or .jsonl (written at the end)"),
    labels: Optional[str] = LabelsOpt, labels_file: Optional[Path] = LabelsFileOpt,
    texts: Optional[List[str]] = typer.Option(None, "--text", "-t", help="DSD matching instead of classifying: a "
                                              "caption, commas and all (repeat the option)"),
    texts_file: Optional[Path] = typer.Option(None, "--texts-file", help="DSD matching instead of classifying: "
                                              "captions, one per line (UTF-8)"),
    method: Method = typer.Option(Method.dc.value, help="dc: zero-shot Diffusion Classifier | head: a trained head"),
    head: Optional[str] = typer.Option(None, help="the head's name (--method head), when the engine has several"),
    template: Optional[str] = typer.Option(None, help="prompt template with one {} (default: the engine's)"),
    stages: Optional[str] = typer.Option(None, help="pruning stages n_samples:keep, e.g. 50:5,500:1"),
    loss: Optional[Loss] = typer.Option(None, help="denoising error (default: the engine's)"),
    seed: int = SeedOpt, address: Optional[str] = AddressOpt,
    actors: int = typer.Option(1, help="engines running at once, each one Ray actor"),
    cpus_per_actor: float = CpusPerActorOpt, gpus_per_actor: float = GpusPerActorOpt,
    batch_images: int = typer.Option(16, help="images per actor call"),
    backend: Backend = BackendOpt, precision: Precision = PrecisionOpt,
    limit: Optional[int] = LimitOpt,
):
    """Score many images with Ray Data: an actor pool of engines, results in one Parquet/JSONL file.

    Rows: path, label, ranking (best first), passes, error (why an image could not be read), or with
    --text: path, scores (one per text), best, error."""
    from diffscore.app import scale

    check_target(output)
    scale.check_output(output)
    if limit is not None:
        images = [str(p) for p in image_paths(images)[:limit]]
    common = dict(actors=actors, batch_images=batch_images, num_cpus=cpus_per_actor, num_gpus=gpus_per_actor,
                  backend=backend.value, precision=precision.value, address=address)
    if texts or texts_file:
        dataset = scale.match_dataset(images, engine, read_texts(texts, texts_file), seed=seed, **common)
    else:
        label_list = read_labels(labels, labels_file, required=method is Method.dc)
        dataset = scale.classify_dataset(images, engine, label_list, method=method.value, head=head, template=template,
                                         stages=parse_stages(stages), loss=loss.value if loss else None, seed=seed,
                                         **common)
    rows, failed = scale.write_results(dataset, output)
    unread = f"; {failed} images could not be read (see the error column)" if failed else ""
    say(f"wrote {rows} rows to {output}{unread}")


def token_option(value: Optional[str]) -> Optional[str]:
    """--token / DIFFSCORE_TOKEN checked as a usage mistake (exit 2), without repeating it."""
    from diffscore.app.serve import check_token

    try:
        return check_token(value)
    except EngineError as e:
        raise typer.BadParameter(str(e)) from None


@app.command()
def serve(
    engine: Path = typer.Argument(..., help="engine directory"),
    host: str = typer.Option("127.0.0.1", help="address the HTTP API listens on (0.0.0.0: every interface; Ray's "
                             "own processes stay on loopback)"),
    port: int = typer.Option(8000, min=1, max=65535, help="HTTP port"),
    replicas: int = typer.Option(1, min=1, help="engine replicas behind the one HTTP address"),
    cpus_per_replica: float = CpusPerActorOpt, gpus_per_replica: float = GpusPerActorOpt,
    max_batch: int = typer.Option(16, min=1, help="concurrent requests batched into one engine call, at most"),
    address: Optional[str] = AddressOpt,
    backend: Backend = BackendOpt, precision: Precision = PrecisionOpt,
    token: Optional[str] = typer.Option(None, envvar="DIFFSCORE_TOKEN", callback=token_option, show_envvar=True,
                                        help="bearer token every endpoint but /health asks for (prefer the "
                                        "environment variable: a flag shows in the process list)"),
    docs: bool = typer.Option(False, "--docs", help="serve the API docs at /docs, /redoc and /openapi.json"),
    dashboard: bool = typer.Option(False, "--dashboard", help="start Ray's dashboard (on 127.0.0.1:8265)"),
):
    """Serve an engine over HTTP with Ray Serve: POST /classify, /head, /match (JSON, images base64);
    GET /health, /info. Runs until Ctrl-C or SIGTERM. What it exposes: docs/serving.md."""
    import time

    from diffscore.app.scale import import_ray

    import_ray("diffscore serve")
    import ray
    from ray import serve as ray_serve

    from diffscore.app.serve import start_server

    started, deployed = not ray.is_initialized(), False  # in-process callers may have a Ray of their own
    try:
        url = start_server(engine, host=host, port=port, address=address, replicas=replicas, num_cpus=cpus_per_replica,
                           num_gpus=gpus_per_replica, backend=backend.value, precision=precision.value,
                           max_batch_size=max_batch, token=token, docs=docs, dashboard=dashboard)
        deployed = True
        if token is None and host not in ("127.0.0.1", "localhost", "::1"):
            err.print(Text.assemble(("warning: ", "yellow"), f"serving on {host} without a token: anyone who reaches "
                                    f"port {port} can use it (set DIFFSCORE_TOKEN)"))
        say(f"serving {engine} at {url} ({replicas} replica{'s' * (replicas > 1)}"
            f"{', bearer token' if token else ''}); Ctrl-C stops")
        while True:
            time.sleep(3600)
    finally:  # Ctrl-C or SIGTERM (main turns it into KeyboardInterrupt): Serve and the Ray this started end too
        if ray.is_initialized() and (started or deployed):
            ray_serve.shutdown()
        if ray.is_initialized() and started:
            ray.shutdown()
