"""What `diffscore serve` exposes (issue 26): every listening socket of the server and of the Ray processes it
starts, for the default (`--host 127.0.0.1`) and for `--host 0.0.0.0`; what an unauthenticated caller gets;
how long start-up takes; what SIGTERM leaves behind.

    .venv/bin/python bench/serve_exposure.py [--update-doc]

Each run starts the CLI as a user would (`diffscore serve DEMO_ENGINE -b ort-cpu`, token from DIFFSCORE_TOKEN),
waits for /health, lists the sockets with psutil, sends a few requests, then SIGTERM.
Writes bench/results/serve_exposure.json; --update-doc fills docs/serving.md's <!-- bench:serve_exposure -->.
"""

from __future__ import annotations

import argparse
import base64
import io
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, update_docs, write_result  # noqa: E402

from diffscore.app.demo import demo_engine_dir  # noqa: E402

TOKEN = "bench-exposure-token-0123456789"


def status_of(url: str, token: str | None = None, body: dict | None = None) -> int:
    req = urllib.request.Request(url, data=body and json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def scope(ip: str) -> str:
    address = ipaddress.ip_address(ip)
    address = getattr(address, "ipv4_mapped", None) or address
    return "loopback" if address.is_loopback else "every interface" if address.is_unspecified else "machine address"


def run(engine: Path, host: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = Path(sys.executable).with_name("diffscore")
    log = tempfile.NamedTemporaryFile("w+", suffix=".log")
    start = time.perf_counter()
    proc = subprocess.Popen([str(cli), "serve", str(engine), "--host", host, "--port", str(port), "-b", "ort-cpu"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "DIFFSCORE_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"diffscore serve exited {proc.returncode}:\n{log.read()[-3000:]}")
        try:
            if status_of(url + "/health") == 200:
                break
        except OSError:
            pass
        time.sleep(0.5)
    startup_s = time.perf_counter() - start
    root = psutil.Process(proc.pid)
    tree = [root, *root.children(recursive=True)]
    sockets = []
    for p in tree:
        try:
            sockets += [{"process": p.name(), "ip": c.laddr.ip, "port": c.laddr.port, "scope": scope(c.laddr.ip)}
                        for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            pass
    answers = {"GET /health (no token)": status_of(url + "/health"), "GET /info (no token)": status_of(url + "/info"),
               "GET /info (token)": status_of(url + "/info", TOKEN), "GET /docs": status_of(url + "/docs", TOKEN),
               "GET /openapi.json": status_of(url + "/openapi.json", TOKEN)}
    for name, im in [("12,000 x 12,000", Image.new("1", (12_000, 12_000))),
                     ("1 x 1,500,000", Image.new("1", (1, 1_500_000)))]:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        body = {"images": [base64.b64encode(buf.getvalue()).decode()], "labels": ["zero", "one"]}
        answers[f"POST /classify, a {name} px PNG of {len(buf.getvalue()) / 1000:.1f} KB"] = status_of(
            url + "/classify", TOKEN, body)
    stop = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=180)
    stop_s = time.perf_counter() - stop
    _, alive = psutil.wait_procs(tree[1:], timeout=30)
    left = [p.name() for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    log.seek(0)
    return {"host": host, "http_port": port, "processes": len(tree), "startup_s": round(startup_s, 1),
            "sockets": sockets, "answers": answers, "sigterm_exit_code": code, "stop_s": round(stop_s, 1),
            "processes_left": left, "last_line": log.read().rstrip().splitlines()[-1]}


def table(runs: list[dict], info: dict) -> list[str]:
    lines = ["| `--host` | listening sockets (server + Ray processes) | on loopback | elsewhere | start-up | "
             "SIGTERM: exit code, time, processes left |", "|---|---|---|---|---|---|"]
    for r in runs:
        elsewhere = [f"{s['process']} {s['ip']}:{s['port']}" for s in r["sockets"] if s["scope"] != "loopback"]
        lines.append(f"| `{r['host']}` | {len(r['sockets'])} in {r['processes']} processes | "
                     f"{sum(s['scope'] == 'loopback' for s in r['sockets'])} | {', '.join(elsewhere) or 'none'} | "
                     f"{r['startup_s']} s | {r['sigterm_exit_code']}, {r['stop_s']} s, {len(r['processes_left'])} |")
    answers = runs[0]["answers"]
    lines += ["", "| request to the default server (token set) | status |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in answers.items()]
    lines += ["", f"Measured by `bench/serve_exposure.py` on {machine_line(info)}; {info['date']}."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update-doc", action="store_true")
    args = parser.parse_args()
    engine = demo_engine_dir()
    runs = [run(engine, host) for host in ("127.0.0.1", "0.0.0.0")]
    for r in runs:
        print(f"--host {r['host']}:", json.dumps(r["sockets"]))
    path = write_result("serve_exposure", {"runs": runs})
    info = {**machine(), "date": json.loads(path.read_text())["date"]}
    lines = table(runs, info)
    print("\n".join(lines))
    print(f"wrote {path}")
    if args.update_doc:
        update_docs("serve_exposure", "\n".join(lines))


if __name__ == "__main__":
    main()
