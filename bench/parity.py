"""The parity suite on the demo engine (fp32, fp16 and INT8), for docs/benchmarks.md: every tensor verdict and
the top-1 decision agreement with the fp32 torch reference on the held-out digits (INT8 is judged by
decisions only).

    .venv/bin/python bench/parity.py [--images 450] [--update-docs]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_engine_all_precisions, machine, machine_line, update_docs, write_result  # noqa: E402

from diffscore.app.demo import demo_parity_inputs  # noqa: E402
from diffscore.export.parity import run_parity  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=450, help="held-out digits for the decision check")
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()
    lines: list[str] = []
    engine_dir = demo_engine_all_precisions()
    ok = run_parity(engine_dir, echo=lines.append, **demo_parity_inputs(engine_dir, args.images))
    path = write_result("parity", {"passed": ok, "images": args.images, "lines": lines})
    print("\n".join(lines))
    print(f"wrote {path}")
    if args.update_docs:
        block = "```\n" + "\n".join(lines) + "\n```\n" + f"Measured on {machine_line(machine())} by `bench/parity.py`."
        update_docs("parity", block)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
