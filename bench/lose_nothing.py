"""Runs lose nothing (issue 29's check): `diffscore classify ENGINE FOLDER -o out.csv` on 200 held-out demo
digits and one corrupt file sorted last. Prints the exit code, the rows in the file, the rows with an error and
the last stderr line; writes bench/results/lose_nothing.json. Paste the table into docs/reliability.md.

    .venv/bin/python bench/lose_nothing.py
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, write_result  # noqa: E402

GOOD = 200


def main() -> None:
    from PIL import Image

    from diffscore.app.demo import demo_engine_dir
    from diffscore.app.digits import CLASS_NAMES, load_digits_split

    engine = demo_engine_dir()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i, image in enumerate(load_digits_split().test_images[:GOOD]):
            Image.fromarray(image).save(folder / f"{i:03d}.png")
        (folder / "zzz-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        out = Path(tmp) / "out.csv"
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "diffscore.app.cli", "classify", str(engine), str(folder),
                              "--labels",
                              ",".join(CLASS_NAMES), "-b", "ort-cpu", "-o", str(out)], capture_output=True, text=True,
                             cwd=tmp, env={**os.environ, "OMP_NUM_THREADS": "1"})
        seconds = time.perf_counter() - start
        rows = list(csv.DictReader(out.open(encoding="utf-8-sig"))) if out.exists() else []
    result = {"images": GOOD + 1, "exit_code": run.returncode, "rows": len(rows),
              "error_rows": sum(1 for r in rows if r.get("error")),
              "labelled_rows": sum(1 for r in rows if r.get("label")),
              "last_stderr_line": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "", "seconds": seconds}
    write_result("lose_nothing", result)
    info = machine()
    print("| images | exit code | rows in out.csv | rows with `error` | rows with a label | wall |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {GOOD} + 1 corrupt | {run.returncode} | {len(rows)} | {result['error_rows']} | {result['labelled_rows']} "
          f"| {seconds:.0f} s |")
    print(f"\nstderr's last line: `{result['last_stderr_line']}`")
    print(f"Measured on {machine_line(info)} by `bench/lose_nothing.py`.")


if __name__ == "__main__":
    main()
