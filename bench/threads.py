"""torch threads for the build commands: one thread against every core, under the machine's current load, and
the default rule (app/threads.py: the idle cores) — the measurement behind `--threads`' default.

    .venv/bin/python bench/threads.py

Runs `diffscore train-prompts --demo` (TRAIN_STEPS steps) as a fresh process per setting, ROUNDS rounds in
alternation, and records each run's wall time with the load average it started under.
Writes bench/results/threads.json.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, write_result  # noqa: E402

from diffscore.app.demo import DEMO_MODEL  # noqa: E402
from diffscore.app.threads import idle_cores  # noqa: E402

TRAIN_STEPS = 3
ROUNDS = 2


def run(threads: int | None, out: Path) -> dict:
    args = [sys.executable, "-m", "diffscore.app.cli", "train-prompts", str(DEMO_MODEL), "--demo", "--shots", "2",
            "--train-steps", str(TRAIN_STEPS), "--out", str(out), "--overwrite", "--batch-size", "8"]
    args += [] if threads is None else ["--threads", str(threads)]
    load, idle = os.getloadavg()[0], idle_cores()
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=tempfile.gettempdir())
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return {"threads": threads or f"default ({idle})", "seconds": round(seconds, 2),
            "load_average_1min": round(load, 2)}


def main() -> None:
    cores = os.cpu_count() or 1
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(ROUNDS):
            for threads in (1, cores, None):
                runs.append(run(threads, Path(tmp) / "run"))
                print(runs[-1], flush=True)
    best = {}
    for r in runs:
        best[str(r["threads"]).split(" ")[0]] = min(best.get(str(r["threads"]).split(" ")[0], 1e9), r["seconds"])
    write_result("threads", {"command": f"train-prompts --demo --shots 2 --train-steps {TRAIN_STEPS} --batch-size 8",
                             "cores": cores, "runs": runs, "best_seconds": best})
    print(f"machine: {machine_line(machine())}")
    print(f"best wall seconds (process start to end, {TRAIN_STEPS} steps): {best}")


if __name__ == "__main__":
    main()
