"""Online scoring with Ray Serve: replicas each holding one loaded Engine, behind HTTP JSON endpoints.

Importing this module needs Ray (`pip install 'diffscore[ray]'`); without it the import raises an
EngineError that says so. Requests carry the image bytes, base64-encoded in JSON (server paths and
URLs are refused). Concurrent requests are batched (`@serve.batch`): those with the same options
(labels, template, stages, loss, seed, or texts for match) go through one engine call, so they share
UNet batches. Endpoints, all JSON:

  POST /classify {"images": [b64, ...], "labels": [...], "template"?, "stages"?: [[n, keep], ...], "loss"?, "seed"?}
       -> {"results": [{"label", "ranking": [[label, error], ...], "passes"}, ...]}  (Diffusion Classifier)
  POST /head     {"images": [...], "head"?: name} -> {"results": [... probability ...]}  (a trained head)
  POST /match    {"images": [...], "texts": [...], "steps"?, "bias_weight"?, "seed"?}
       -> {"texts": [...], "scores": [[...], ...], "best": [...]}  (DSD, higher = better)
  GET  /health   -> {"status": "ok"};  GET /info -> the engine, the limits, what this replica has served

Every answer that is not a result is {"error": "one line"}: 400 bad JSON, field, image or option; 401 no or
a wrong bearer token (when the server has one: `Authorization: Bearer TOKEN` on every endpoint but /health);
404 no such endpoint (also /docs, /redoc and /openapi.json unless the server was started with docs on);
405 wrong method; 413 too many bytes, images or pixels. Images are read with the CLI's checks (the
decompression-bomb limit, the formats of engine/images.IMAGE_SUFFIXES) and brought to the engine's size in
the request, so one bad image fails only its own request. What is exposed and how to open it: docs/serving.md.
"""

import asyncio
import hmac
import logging
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from diffscore.app.scale import check_engine_dir, engine_threads, import_ray, start_ray
from diffscore.app.serve_requests import (BadRequest, Limits, classify_options, decode_images, finite,
                                          read_body, result_json, text_list, token_digest, typed)
from diffscore.engine.classify_options import HeadOptions
from diffscore.errors import EngineError, first_line

import_ray("diffscore serve")  # the install hint, before the imports below fail less clearly
from fastapi import FastAPI, Request  # noqa: E402  (fastapi comes with ray[serve])
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402

log = logging.getLogger("diffscore")
APP_NAME = "diffscore"


ENDPOINTS = "POST /classify, /head, /match; GET /health, /info"
# FastAPI's own docs routes are off; the replica serves them itself when started with docs=True
api = FastAPI(title="diffscore", description=__doc__, docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(BadRequest)
async def _bad_request(request: Request, exc: BadRequest):
    return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=exc.headers)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException):
    """Routing's own answers (no such path, wrong method) in the documented {"error": ...} form."""
    where = f"{request.method} {request.url.path}"
    message = {404: f"no endpoint {where}; the endpoints are {ENDPOINTS}",
               405: f"{request.url.path} does not take {request.method}; allowed: {(exc.headers or {}).get('Allow')}"}
    return JSONResponse({"error": message.get(exc.status_code, f"{where}: {exc.detail}")}, status_code=exc.status_code,
                        headers=exc.headers)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    """A bug, not the caller's mistake: logged with its traceback here, one line in the answer."""
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": f"internal error ({type(exc).__name__}: {first_line(exc)}); see the server log"},
                        status_code=500)


@dataclass(frozen=True)
class Job:
    """One request's share of a batch: its images and the options that decide which engine call it joins."""

    task: str  # classify | match
    options: object  # hashable, so requests with equal options share one call: a classify record, or match's
    # sorted (name, value) pairs
    images: list


@serve.deployment(name="Diffscore", health_check_period_s=5)
@serve.ingress(api)
class DiffscoreServer:
    """One replica: a loaded engine, request batching across concurrent requests, the HTTP endpoints."""

    def __init__(self, engine_dir: str, backend: str = "auto", precision: str = "fp32", threads: int | None = None,
                 limits: Limits = Limits(), max_batch_size: int = 16, batch_wait_s: float = 0.01,
                 token_sha256: str | None = None, docs: bool = False):
        import diffscore

        self.engine = diffscore.load(engine_dir, backend=backend, precision=precision, threads=threads)
        self.limits, self.token_sha256, self.docs = limits, token_sha256, docs
        self._score.set_max_batch_size(max_batch_size)
        self._score.set_batch_wait_timeout_s(batch_wait_s)
        self.served = {"requests": 0, "batches": 0, "engine_calls": 0, "images": 0}

    # --- batching -----------------------------------------------------------------------------
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score(self, jobs: list[Job]) -> list:
        self.served["batches"] += 1
        return await asyncio.get_running_loop().run_in_executor(None, self._run_jobs, jobs)

    def _run_jobs(self, jobs: list[Job]) -> list:
        """Jobs with equal options run as one engine call; an EngineError answers only its own group."""
        answers: list = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((job.task, job.options), []).append(i)
        for (task, options), members in groups.items():
            images = [im for i in members for im in jobs[i].images]
            self.served["engine_calls"] += 1
            self.served["images"] += len(images)
            try:
                if task == "match":
                    out = np.asarray(self.engine.match(images, **dict(options)))  # (images, texts)
                else:
                    out = self.engine.classify(images, options=options)
            except EngineError as e:
                for i in members:
                    answers[i] = e
                continue
            start = 0
            for i in members:
                answers[i] = out[start : start + len(jobs[i].images)]
                start += len(jobs[i].images)
        return answers

    def _authorize(self, request: Request) -> None:
        """401 unless the request carries the server's bearer token (when it has one)."""
        if self.token_sha256 is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(token.strip()), self.token_sha256):
            why = "a wrong bearer token" if scheme.lower() == "bearer" else "no bearer token"
            raise BadRequest(f"this server needs a token: send the header 'Authorization: Bearer TOKEN' ({why} came)",
                             401, headers={"WWW-Authenticate": "Bearer"})

    async def _images(self, request: Request, task: str) -> tuple[dict, list]:
        """The checked body and its images at the engine's size (decoded off the event loop)."""
        self._authorize(request)
        body = await read_body(request, task, self.limits)
        m = self.engine.manifest
        images = await asyncio.to_thread(decode_images, body.get("images"), self.limits, m.image_size)
        return body, images

    async def _submit(self, task: str, options, images: list):
        self.served["requests"] += 1
        answer = await self._score(Job(task, tuple(sorted(options.items())) if task == "match" else options, images))
        if isinstance(answer, EngineError):
            raise self._refusal(answer)
        return answer

    def _refusal(self, error: EngineError) -> BadRequest:
        """The engine's one line for the caller, naming the engine, not where it lies on the server."""
        return BadRequest(first_line(error).replace(str(self.engine.engine_dir), Path(self.engine.engine_dir).name))

    # --- endpoints ----------------------------------------------------------------------------
    @api.post("/classify")
    async def classify(self, request: Request):
        body, images = await self._images(request, "classify")
        results = await self._submit("classify", classify_options(body, self.limits), images)
        return {"results": [result_json(r) for r in results]}

    @api.post("/head")
    async def head(self, request: Request):
        body, images = await self._images(request, "head")
        try:
            name = self.engine.head_name(typed(body, "head", str))
        except EngineError as e:
            raise self._refusal(e) from None
        results = await self._submit("classify", HeadOptions(head=name), images)
        return {"head": name, "results": [result_json(r) for r in results]}

    @api.post("/match")
    async def match(self, request: Request):
        body, images = await self._images(request, "match")
        texts = text_list(body, "texts", self.limits)
        options = dict(texts=tuple(texts), steps=typed(body, "steps", int, minimum=1),
                       seed=typed(body, "seed", int, 0, minimum=0),
                       bias_weight=typed(body, "bias_weight", (int, float)))  # None: the engine's DSD preset's λ
        scores = await self._submit("match", options, images)
        return {"texts": texts, "scores": [[finite(x) for x in row] for row in scores],
                "best": [texts[j] for j in np.nan_to_num(scores, nan=-np.inf).argmax(axis=1)]}

    @api.get("/health")
    async def health(self):
        return {"status": "ok"}

    @api.get("/info")
    async def info(self, request: Request):
        import diffscore

        self._authorize(request)

        m = self.engine.manifest
        return {
            "diffscore": diffscore.__version__, "engine": Path(self.engine.engine_dir).name,
            "backend": self.engine.backend, "precision": self.engine.precision,
            "image_size": m.image_size, "image_channels": m.image_channels, "defaults": asdict(m.defaults),
            "heads": {name: h.labels for name, h in m.heads.items()},
            "limits": asdict(self.limits), "replica": serve.get_replica_context().replica_id.unique_id,
            "served": self.served,
        }

    # --- docs: off unless the server was started with docs=True ---------------------------------
    def _docs_on(self, request: Request) -> None:
        if not self.docs:
            raise HTTPException(404)
        self._authorize(request)

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        self._docs_on(request)
        return api.openapi()

    @api.get("/docs", include_in_schema=False)
    async def swagger(self, request: Request):
        self._docs_on(request)
        return get_swagger_ui_html(openapi_url="/openapi.json", title="diffscore")

    @api.get("/redoc", include_in_schema=False)
    async def redoc(self, request: Request):
        self._docs_on(request)
        return get_redoc_html(openapi_url="/openapi.json", title="diffscore")


def check_free(host: str, port: int) -> None:
    """Refuse a host:port this machine cannot listen on (in use, not one of its addresses) before Ray starts."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own socket: TIME_WAIT is fine
            s.bind((host, port))
    except OSError as e:
        raise EngineError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port, or a --host "
                          "that is an address of this machine") from None


def last_line(error: BaseException) -> str:
    """The root cause of a Ray error: the last line of its text (Ray puts the remote traceback first)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


TOKEN_ENV = "DIFFSCORE_TOKEN"
MIN_TOKEN_CHARS = 16


def check_token(token: str | None) -> str | None:
    """The bearer token, stripped (a file's newline), or None; a short or unsendable one is refused in one line
    that does not repeat it."""
    if token is None:
        return None
    token = token.strip()
    if len(token) < MIN_TOKEN_CHARS or not (token.isascii() and token.isprintable()) or " " in token:
        raise EngineError(f"the token must be {MIN_TOKEN_CHARS} or more printable ASCII characters without spaces "
                          f"(got {len(token)} characters); make one with: "
                          "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return token


def build_app(engine_dir, *, replicas: int = 1, num_cpus: float = 1, num_gpus: float = 0, backend: str = "auto",
              precision: str = "fp32", limits: Limits = Limits(), max_batch_size: int = 16, batch_wait_s: float = 0.01,
              token: str | None = None, docs: bool = False):
    """The Serve application: `replicas` copies of the engine, each with `num_cpus` / `num_gpus`; `token`: the
    bearer token every endpoint but /health asks for; `docs`: serve /docs, /redoc and /openapi.json."""
    engine_dir = check_engine_dir(engine_dir)
    if replicas < 1 or max_batch_size < 1:
        raise EngineError(f"replicas and max_batch_size must be ≥ 1, got {replicas} and {max_batch_size}")
    token = check_token(token)
    return DiffscoreServer.options(
        num_replicas=replicas, max_ongoing_requests=2 * max_batch_size,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
    ).bind(str(engine_dir), backend, precision, engine_threads(num_cpus, num_gpus), limits, max_batch_size,
           batch_wait_s, token and token_digest(token), docs)


def start_server(engine_dir, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                 dashboard: bool = False, **options):
    """Start Ray (or join `address`), start Serve's HTTP proxy on host:port and deploy the engine; returns
    when every replica is up. `serve.shutdown()` stops it.

    A Ray started here listens on loopback only, whatever `host` is (scale.start_ray); only the HTTP proxy
    listens on `host`. `dashboard`: Ray's dashboard, on loopback too."""
    app = build_app(engine_dir, **options)
    if address is None:
        check_free(host, port)  # one line now, not a proxy actor's traceback after Ray has started
    start_ray(address, dashboard=dashboard)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/")
    except (ray.exceptions.RayError, RuntimeError) as e:  # a replica that cannot load the engine, a proxy that
        raise EngineError(f"the server did not start: {last_line(e)}") from None  # cannot bind: their last line
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
