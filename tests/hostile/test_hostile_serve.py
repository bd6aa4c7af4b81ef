"""Hostile requests against `diffscore serve` as a user starts it (one server for the whole module: the CLI in
a subprocess, default host, token from DIFFSCORE_TOKEN): every malformed field, body, image or route is a 4xx
with a one-line {"error": ...}, never a 500; no socket of the server or of any Ray process it started listens
beyond loopback (`batch` starts its Ray with the same scale.start_ray); the token is asked for; SIGTERM exits
143 and leaves no Ray process behind."""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

TOKEN = "hostile-test-token-0123456789"
START_S = 300  # a cold Ray + Serve + engine on a busy 2-core machine


@dataclass
class Served:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, path: str, body=None, *, token: str | None = TOKEN, method: str | None = None,
         headers: dict | None = None, timeout: float = 120) -> tuple[int, object]:
    """(status, answer as JSON, or as text when it is not JSON) of one request."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    head = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {}),
            **(headers or {})}
    req = urllib.request.Request(url + path, data=data, headers=head, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


@pytest.fixture(scope="module")
def served(demo_engine, tmp_path_factory):
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'diffscore[ray]'")
    pytest.importorskip("psutil")
    folder = tmp_path_factory.mktemp("hostile_serve")
    port, log = free_port(), folder / "serve.log"
    cli = Path(sys.executable).with_name("diffscore")
    command = [str(cli)] if cli.exists() else [sys.executable, "-c", "from diffscore.app.cli import main; main()"]
    env = {**os.environ, "DIFFSCORE_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:  # a file, not a pipe: Ray's logs must never block the server
        proc = subprocess.Popen([*command, "serve", str(demo_engine), "--port", str(port), "-b", "ort-cpu"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder)
    server = Served(f"http://127.0.0.1:{port}", port, proc, log)
    try:
        deadline = time.monotonic() + START_S
        while True:
            assert proc.poll() is None, f"diffscore serve exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not up within {START_S} s:\n{log.read_text()[-3000:]}"
            try:
                if call(server.url, "/health", timeout=5) == (200, {"status": "ok"}):
                    break
            except OSError:
                pass
            time.sleep(1)
        yield server
    finally:
        if proc.poll() is None:  # the SIGTERM test did not run (-k): stop it the same way
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


DIGIT = png(Image.new("L", (8, 8), 128))
GOOD = b64(DIGIT)
LABELS = ["zero", "one"]
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"  # Pillow would run Ghostscript on it


def classify(**fields) -> dict:
    return {"images": [GOOD], "labels": LABELS, **fields}


def match(**fields) -> dict:
    return {"images": [GOOD], "texts": ["a digit", "a cat"], **fields}


# (id, method, path, body, status, a piece of the error line); bodies are built lazily where they are large
CASES = [
    ("not-json", "POST", "/classify", b"{not json", 400, "not JSON"),
    ("empty-body", "POST", "/classify", b"", 400, "not JSON"),
    ("bad-utf8", "POST", "/classify", b'{"labels": "\xff\xfe"}', 400, "not JSON"),
    ("json-array", "POST", "/classify", [], 400, "must be a JSON object"),
    ("json-null", "POST", "/match", b"null", 400, "must be a JSON object"),
    ("json-string", "POST", "/head", "images", 400, "must be a JSON object"),
    ("deep-nesting", "POST", "/classify", lambda: b"[" * 200_000, 400, "nested too deeply"),
    ("int-5000-digits", "POST", "/classify", lambda: b'{"seed": ' + b"9" * 5000 + b"}", 400, "not JSON"),
    ("unknown-field", "POST", "/classify", classify(colour="red"), 400, "unknown field 'colour'"),
    ("images-missing", "POST", "/classify", {"labels": LABELS}, 400, '"images" must be a non-empty list'),
    ("images-string", "POST", "/classify", classify(images=GOOD), 400, '"images" must be a non-empty list'),
    ("images-empty", "POST", "/classify", classify(images=[]), 400, '"images" must be a non-empty list'),
    ("images-number", "POST", "/classify", classify(images=[123]), 400, "images[0] is not base64"),
    ("images-null", "POST", "/head", {"images": [None]}, 400, "images[0] is not base64"),
    ("images-empty-string", "POST", "/classify", classify(images=[""]), 400, "images[0] is not base64"),
    ("images-not-base64", "POST", "/classify", classify(images=["!!not base64!!"]), 400, "images[0] is not base64"),
    ("images-server-path", "POST", "/match", match(images=["/etc/passwd"]), 400, "server paths and URLs are refused"),
    ("images-65", "POST", "/classify", classify(images=[GOOD] * 65), 413, "the limit is 64"),
    ("image-text-bytes", "POST", "/classify", classify(images=[b64(b"hello, world")]), 400,
     "cannot read images[0]: not an image in a known format"),
    ("image-eps", "POST", "/classify", classify(images=[b64(EPS)]), 400, "not an image in a known format (PNG, JPEG"),
    ("image-truncated-png", "POST", "/classify", classify(images=[b64(DIGIT[:40])]), 400, "cannot read images[0]"),
    ("image-bomb", "POST", "/classify", lambda: classify(images=[b64(png(Image.new("1", (12_000, 12_000))))]), 400,
     "more pixels than the limit of 89,478,485"),
    ("image-elongated", "POST", "/head", lambda: {"images": [b64(png(Image.new("1", (1, 1_500_000))))]}, 400,
     "too elongated"),
    ("images-80M-pixels", "POST", "/classify", lambda: classify(images=[b64(png(Image.new("1", (4000, 4000))))] * 5),
     413, "pixels in all"),
    ("labels-missing", "POST", "/classify", {"images": [GOOD]}, 400, '"labels" must be a list of strings'),
    ("labels-string", "POST", "/classify", classify(labels="zero,one"), 400, '"labels" must be a list of strings'),
    ("labels-numbers", "POST", "/classify", classify(labels=[0, 1]), 400, '"labels" must be a list of strings'),
    ("labels-nested", "POST", "/classify", classify(labels=[["zero"]]), 400, '"labels" must be a list of strings'),
    ("labels-empty", "POST", "/classify", classify(labels=[]), 400, "non-empty list"),
    ("labels-blank", "POST", "/classify", classify(labels=["zero", " "]), 400, "non-empty strings"),
    ("labels-duplicate", "POST", "/classify", classify(labels=["zero", "zero"]), 400, "duplicates"),
    ("labels-257", "POST", "/classify", classify(labels=[f"l{i}" for i in range(257)]), 400, "the limit is 256"),
    ("template-number", "POST", "/classify", classify(template=5), 400, '"template" must be str'),
    ("template-attribute", "POST", "/classify", classify(template="{0.nope}"), 400, "exactly one {}"),
    ("template-no-field", "POST", "/classify", classify(template="a digit"), 400, "exactly one {}"),
    ("template-two-fields", "POST", "/classify", classify(template="{} and {}"), 400, "exactly one {}"),
    ("template-huge-width", "POST", "/classify", classify(template="{:>999999999}"), 400, "exactly one {}"),
    ("template-stray-brace", "POST", "/classify", classify(template="a {"), 400, "stray brace"),
    ("stages-string", "POST", "/classify", classify(stages="50:5"), 400, "[n_samples, keep]"),
    ("stages-empty", "POST", "/classify", classify(stages=[]), 400, "[n_samples, keep]"),
    ("stages-floats", "POST", "/classify", classify(stages=[[1.5, 1]]), 400, "[n_samples, keep]"),
    ("stages-triple", "POST", "/classify", classify(stages=[[4, 2, 1]]), 400, "[n_samples, keep]"),
    ("stages-negative", "POST", "/classify", classify(stages=[[-1, 5]]), 400, "must be ≥ 1"),
    ("stages-1e9", "POST", "/classify", classify(stages=[[10**9, 1]]), 400, "the model has 1000"),
    ("loss-unknown", "POST", "/classify", classify(loss="l7"), 400, "unknown loss 'l7'"),
    ("loss-number", "POST", "/classify", classify(loss=2), 400, '"loss" must be str'),
    ("seed-negative", "POST", "/classify", classify(seed=-1), 400, '"seed" must be ≥ 0'),
    ("seed-float", "POST", "/classify", classify(seed=1.5), 400, '"seed" must be int'),
    ("seed-string", "POST", "/classify", classify(seed="3"), 400, '"seed" must be int'),
    ("seed-bool", "POST", "/classify", classify(seed=True), 400, '"seed" must be int'),
    ("seed-2**40", "POST", "/classify", classify(seed=2**40), 400, "seed must be an integer in [0, 4294967295]"),
    ("seed-nan", "POST", "/classify", lambda: json.dumps(classify(seed=float("nan"))).encode(), 400,
     '"seed" must be int'),
    ("seed-nested-300", "POST", "/classify", lambda: json.dumps(classify(seed=[])).replace("[]", "[" * 300 + "]" * 300)
     .encode(), 400,
     '"seed" must be int, got [[[['),
    ("head-number", "POST", "/head", {"images": [GOOD], "head": 5}, 400, '"head" must be str'),
    ("head-unknown", "POST", "/head", {"images": [GOOD], "head": "nope"}, 400, "head"),
    ("texts-missing", "POST", "/match", {"images": [GOOD]}, 400, '"texts" must be a list of strings'),
    ("texts-string", "POST", "/match", match(texts="a cat"), 400, '"texts" must be a list of strings'),
    ("steps-zero", "POST", "/match", match(steps=0), 400, '"steps" must be ≥ 1'),
    ("steps-string", "POST", "/match", match(steps="many"), 400, '"steps" must be int'),
    ("bias-string", "POST", "/match", match(bias_weight="x"), 400, '"bias_weight" must be int or float'),
    ("bias-nan", "POST", "/match", lambda: json.dumps(match(bias_weight=float("nan"))).encode(), 400,
     "must be a finite number"),
    ("bias-1e309", "POST", "/match", lambda: json.dumps(match()).replace("}", ', "bias_weight": 1e309}').encode(),
     400, "must be a finite number"),
    ("route-unknown-get", "GET", "/admin", None, 404, "no endpoint GET /admin"),
    ("route-unknown-post", "POST", "/classify/extra", classify(), 404, "no endpoint"),
    ("method-get-classify", "GET", "/classify", None, 405, "allowed: POST"),
    ("method-post-health", "POST", "/health", {}, 405, "allowed: GET"),
    ("method-put-match", "PUT", "/match", match(), 405, "allowed: POST"),
    ("docs-off", "GET", "/docs", None, 404, "no endpoint GET /docs"),
    ("redoc-off", "GET", "/redoc", None, 404, "no endpoint GET /redoc"),
    ("openapi-off", "GET", "/openapi.json", None, 404, "no endpoint GET /openapi.json"),
]


@pytest.mark.parametrize("method, path, body, status, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_request_is_a_one_line_4xx(served, demo_engine, method, path, body, status, message):
    body = body() if callable(body) else body
    got, answer = call(served.url, path, body, method=method)
    assert (got, type(answer)) == (status, dict) and list(answer) == ["error"], (got, str(answer)[:300])
    assert message in answer["error"], answer
    assert "\n" not in answer["error"] and "Traceback" not in answer["error"], answer
    assert str(demo_engine.parent) not in answer["error"], answer  # no server paths in answers


def test_a_body_over_16MB_is_refused_before_it_is_read(served):
    """The declared length decides: 413 comes back while the client has sent only the headers."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    conn.putrequest("POST", "/classify")
    for name, value in [("Content-Length", str(16 * 2**20 + 1)), ("Content-Type", "application/json"),
                        ("Authorization", f"Bearer {TOKEN}")]:
        conn.putheader(name, value)
    conn.endheaders()
    answer = conn.getresponse()
    assert answer.status == 413 and "over the limit of 16777216" in json.loads(answer.read())["error"]
    conn.close()


def test_every_endpoint_but_health_asks_for_the_token(served):
    for method, path, body in [("POST", "/classify", classify()), ("POST", "/head", {"images": [GOOD]}),
                               ("POST", "/match", match()), ("GET", "/info", None)]:
        for token, headers in [(None, None), ("not-the-token-000000000", None), (TOKEN.upper(), None),
                               (None, {"Authorization": f"Basic {TOKEN}"}), (None, {"Authorization": TOKEN})]:
            got, answer = call(served.url, path, body, method=method, token=token, headers=headers)
            assert got == 401 and list(answer) == ["error"], (path, answer)
            assert "Authorization: Bearer" in answer["error"], answer
            assert TOKEN not in answer["error"]
    assert call(served.url, "/health", token=None) == (200, {"status": "ok"})
    status, info = call(served.url, "/info")
    assert status == 200 and info["backend"] == "ort-cpu", info
    status, answer = call(served.url, "/classify", classify(stages=[[4, 2], [8, 1]]))  # the right token: scored
    assert status == 200 and answer["results"][0]["label"] in LABELS, answer


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def test_no_socket_listens_beyond_loopback(served):
    """Every listening socket of the server and of each process below it (GCS, raylet, agents, Serve's controller,
    proxy and replica, idle workers) is on 127.0.0.0/8 or ::1, none on 0.0.0.0, :: or the machine's address."""
    import psutil

    root = psutil.Process(served.proc.pid)
    sockets = []
    for process in [root, *root.children(recursive=True)]:
        try:
            sockets += [(c.laddr.ip, c.laddr.port, process.name()) for c in process.net_connections("inet")
                        if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    names = {name for _, _, name in sockets}
    assert ("127.0.0.1", served.port) in [(ip, port) for ip, port, _ in sockets], sockets
    assert {"gcs_server", "raylet"} <= names and any("ServeReplica" in n for n in names), names  # Ray's own, seen
    assert [s for s in sockets if not is_loopback(s[0])] == [], sockets


def test_a_short_token_is_a_usage_mistake_that_does_not_repeat_it(demo_engine, run_cli, monkeypatch):
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'diffscore[ray]'")
    code, err = run_cli("serve", demo_engine, "--token", "abc123")
    assert code == 2 and "16 or more printable ASCII characters" in err and "abc123" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    monkeypatch.setenv("DIFFSCORE_TOKEN", "has a space but long enough")
    code, err = run_cli("serve", demo_engine)
    assert code == 2 and "without spaces" in err and "has a space" not in err, err


def test_what_cannot_serve_is_one_line_before_ray_starts(demo_engine, run_cli, tmp_path):
    """A port in use, an address not of this machine, a damaged engine: exit 1 and one line, no traceback."""
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'diffscore[ray]'")
    import shutil

    damaged = shutil.copytree(demo_engine, tmp_path / "engine")
    (damaged / "unet.onnx").write_bytes((damaged / "unet.onnx").read_bytes()[:1000])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cases = [(["--port", taken.getsockname()[1]], demo_engine, "cannot listen on 127.0.0.1:"),
                 (["--host", "203.0.113.7"], demo_engine, "cannot listen on 203.0.113.7:8000"),  # TEST-NET-3
                 (["--port", free_port()], damaged, "graph unet (unet.onnx) is 1000 bytes")]
        for args, engine, message in cases:
            code, err = run_cli("serve", engine, *args)
            assert code == 1 and message in err and len(err.strip().splitlines()) == 1, (args, err)


def test_sigterm_exits_143_and_leaves_no_ray_process(served):
    """Last in the module: the server ends as `kill` or systemd ends it."""
    import psutil

    tree = psutil.Process(served.proc.pid).children(recursive=True)
    assert len(tree) >= 5, tree  # GCS, raylet, agents, workers: there is something to clean up
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=120) == 143, served.log.read_text()[-3000:]
    log = served.log.read_text()
    assert log.rstrip().splitlines()[-1] == "error: terminated (SIGTERM); nothing half-written was left", log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    _, alive = psutil.wait_procs(tree, timeout=60)
    left = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left == [], [(p.pid, p.name()) for p in left]
