"""HTTP serving with Ray Serve (diffscore.app.serve): real requests to 127.0.0.1 get the in-process
Engine's answers, 16 concurrent requests are batched and all answered, bad input (including decompression
bombs, elongated images and unknown routes) is a one-line 4xx, and a killed replica is replaced. The served
CLI itself (sockets, token, SIGTERM) and many more hostile requests: tests/hostile/test_hostile_serve.py."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

import diffscore
from diffscore.app.digits import CLASS_NAMES

LABELS = list(CLASS_NAMES)
STAGES = [[4, 2], [8, 1]]
SEED = 3
BACKEND = "ort-cpu"  # answers are compared exactly: one backend on both sides (auto may differ in a replica)


def png_b64(image) -> str:
    """A uint8 array or a PIL image as base64 PNG bytes."""
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def request(url: str, path: str, body=None, timeout: float = 120) -> tuple[int, dict]:
    """(status, JSON answer) of a GET (no body) or a POST (a dict as JSON, or raw bytes)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def server(ray_session, scale_engine):
    from ray import serve

    from diffscore.app.serve import Limits, start_server

    with socket.socket() as s:  # a free port on the loopback interface
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = start_server(scale_engine, host="127.0.0.1", port=port, num_cpus=0.5, batch_wait_s=0.05, backend=BACKEND,
                       docs=True,
                       limits=Limits(max_bytes=100_000, max_images=8, max_labels=20, max_pixels=2_000_000))
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def engine(scale_engine):
    return diffscore.load(scale_engine, backend=BACKEND)


def ranking(r) -> list:
    return [[c, float(s)] for c, s in r.ranking]


def test_16_concurrent_requests_equal_engine_and_are_batched(server, engine, digit_files):
    images = (digit_files[1] * 2)[:16]
    expected = engine.classify(images, LABELS, stages=STAGES, seed=SEED)
    body = lambda im: {"images": [png_b64(im)], "labels": LABELS, "stages": STAGES, "seed": SEED}
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda im: request(server, "/classify", body(im)), images))
    for i, ((status, answer), r) in enumerate(zip(answers, expected)):
        assert status == 200, answer
        assert answer["results"] == [{"label": r.label, "ranking": ranking(r), "passes": r.passes}], i
    status, info = request(server, "/info")
    assert status == 200 and info["heads"] == {"digits": LABELS}
    assert info["served"]["requests"] >= 16 and info["served"]["engine_calls"] < info["served"]["requests"], info


def test_head_and_match_endpoints_equal_engine(server, engine, digit_files):
    images = digit_files[1][:3]
    wrapped = [re.sub("(.{76})", "\\1\n", png_b64(im)) for im in images]  # as `base64 FILE` prints it
    assert "\n" in wrapped[0]
    status, answer = request(server, "/head", {"images": wrapped})
    assert status == 200 and answer["head"] == "digits"
    assert answer["results"] == [{"label": r.label, "ranking": ranking(r), "passes": r.passes}
                                 for r in engine.classify(images, method="head")]
    texts = ["a handwritten digit one", "a cat"]
    status, answer = request(server, "/match", {"images": [png_b64(im) for im in images], "texts": texts, "steps": 2})
    assert status == 200 and answer["scores"] == np.asarray(engine.match(images, texts, steps=2)).tolist()


def test_bad_input_is_a_one_line_4xx(server, digit_files):
    good = png_b64(digit_files[1][0])
    bomb = png_b64(Image.new("1", (12_000, 12_000)))  # 144 M pixels in ~18 KB: the CLI refuses it, so must the API
    strip = png_b64(Image.new("1", (1, 1_500_000)))  # under the bomb limit, but 8 x 12 M pixels once resized
    assert len(bomb) < 30_000 and len(strip) < 100_000
    cases = [
        ("/classify", b"{not json", 400, "not JSON"),
        ("/classify", {"images": [good], "labels": LABELS, "colour": 1}, 400, "unknown field 'colour'"),
        ("/classify", {"labels": LABELS}, 400, '"images" must be a non-empty list'),
        ("/classify", {"images": ["/etc/hostname"], "labels": LABELS}, 400, "server paths and URLs are refused"),
        ("/classify", {"images": [base64.b64encode(b"GIF89a nonsense").decode()], "labels": LABELS}, 400,
         "cannot read images[0]"),
        ("/classify", {"images": [bomb], "labels": LABELS}, 400, "more pixels than the limit of 89,478,485"),
        ("/classify", {"images": [strip], "labels": LABELS}, 400, "too elongated"),
        ("/classify", {"images": [png_b64(np.zeros((1500, 1500), np.uint8))], "labels": LABELS}, 413,
         "more than 2,000,000 pixels"),
        ("/classify", {"images": [good], "labels": LABELS, "template": "{0.nope}"}, 400, '"template"'),
        ("/classify", {"images": [good], "labels": []}, 400, "non-empty list"),
        ("/classify", {"images": [good], "labels": ["a", "a"]}, 400, "duplicates"),
        ("/classify", {"images": [good], "labels": [f"l{i}" for i in range(21)]}, 400, "the limit is 20"),
        ("/classify", {"images": [good] * 9, "labels": LABELS}, 413, "the limit is 8"),
        ("/classify", {"images": ["A" * 120_000], "labels": LABELS}, 413, "over the limit of 100000"),
        ("/classify", {"images": [good], "labels": LABELS, "stages": "10:1"}, 400, "[n_samples, keep]"),
        ("/classify", {"images": [good], "labels": LABELS, "loss": "l7"}, 400, "unknown loss 'l7'"),
        ("/classify", {"images": [good], "labels": LABELS, "template": "{x}"}, 400, '"template"'),
        ("/classify", {"images": [good], "labels": LABELS, "seed": -1}, 400, '"seed" must be ≥ 0'),
        ("/head", {"images": [good], "head": "nope"}, 400, "has no head 'nope'"),
        ("/match", {"images": [good], "texts": "a cat"}, 400, '"texts" must be a list of strings'),
        ("/match", {"images": [good], "texts": ["a cat"], "steps": 0}, 400, '"steps" must be ≥ 1'),
    ]
    for path, body, status, message in cases:
        got, answer = request(server, path, body)
        assert (got, list(answer)) == (status, ["error"]), (path, body if isinstance(body, bytes) else answer)
        assert message in answer["error"] and "\n" not in answer["error"], answer
    assert request(server, "/health") == (200, {"status": "ok"})
    # routing's own answers are the documented {"error": ...} too
    for path, status, message in [("/nope", 404, "no endpoint GET /nope"), ("/classify", 405, "allowed: POST")]:
        got, answer = request(server, path)
        assert got == status and list(answer) == ["error"] and message in answer["error"], (path, answer)


def test_docs_when_asked_for(server):
    """This server was started with docs=True (the CLI's default is off: tests/hostile/test_hostile_serve.py)."""
    status, schema = request(server, "/openapi.json")
    assert status == 200 and {"/classify", "/head", "/match", "/health", "/info"} <= set(schema["paths"]), schema
    assert not {"/docs", "/redoc", "/openapi.json"} & set(schema["paths"])
    for path in ("/docs", "/redoc"):
        with urllib.request.urlopen(server + path, timeout=60) as r:
            assert r.status == 200 and b"/openapi.json" in r.read()


def test_a_killed_replica_is_replaced(ray_session, server, engine, digit_files):
    """Kill the replica's actor; Serve starts a new one and the same request gets the same answer."""
    status, before = request(server, "/info")
    replicas = [a for a in ray_session.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::") and before["replica"] in a["name"]]
    assert len(replicas) == 1, replicas
    ray_session.kill(ray_session.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    deadline, after = time.monotonic() + 300, None  # a new worker on a busy 2-core machine
    while time.monotonic() < deadline:
        try:
            status, info = request(server, "/info", timeout=10)
        except OSError:  # the proxy may drop the connection while no replica is up
            status = None
        if status == 200 and info["replica"] != before["replica"]:
            after = info
            break
        time.sleep(1)
    assert after is not None, "no new replica within 300 s"
    image = digit_files[1][0]
    status, answer = request(server, "/classify", {"images": [png_b64(image)], "labels": LABELS, "stages": STAGES,
                                                   "seed": SEED})
    r = engine.classify([image], LABELS, stages=STAGES, seed=SEED)[0]
    assert status == 200 and answer["results"][0]["ranking"] == ranking(r)
