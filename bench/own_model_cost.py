"""What one image costs on your own Stable Diffusion model, from measured figures: the per-pass time of an
SD-1.5-size UNet on each CPU path (bench/export_sd.py) times the UNet passes per image of each strategy
(bench/adaptive.py, bench/heads.py: 10 labels, measured on the demo digits). Where bench/results/gpu_check.json
exists (bench/gpu_check.py on a GPU machine), its SD-1.5 UNet rows add a column per precision.

    .venv/bin/python bench/own_model_cost.py [--update-docs]

Runs nothing itself (seconds): it combines the stored results of those scripts, so rerun them first on the machine
you care about. Writes bench/results/own_model_cost.json; --update-docs fills docs/own-model.md's
<!-- bench:own_model_cost --> block. Text encoder and VAE encoder time (once per label set / image) not included.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_line, publish  # noqa: E402

# bench/adaptive.py rows shown, in this order (the engine rows: measured on the engine, not replayed)
STRATEGIES = ("seed CIFAR-10 (50,5)->(500,1)", "fixed, demo (10,3)->(40,1)", "race, spread order, z=1 (default)",
              "race, profile, z=1 (default)")
HEADS = ("difformer", "attention")  # bench/heads.py rows: the best head, and the one-step one


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def gpu_seconds_per_pass() -> tuple[dict[str, float], str]:
    """The fastest ms/image of bench/gpu_check.py's SD-1.5 UNet passes without score capture (what the Diffusion
    Classifier and heads run), per precision; nothing when that result is absent or has no such rows."""
    path = RESULTS / "gpu_check.json"
    if not path.is_file():
        return {}, ""
    result = json.loads(path.read_text())
    best: dict[str, float] = {}
    for row in result.get("sections", {}).get("d", {}).get("rows", []):
        if isinstance(row, dict) and not row.get("capture") and row.get("ms_per_image"):
            name = f"GPU torch {row['precision']} ({result['machine'].get('gpu', 'GPU')})"
            best[name] = min(best.get(name, float("inf")), row["ms_per_image"] / 1000)
    line = f" GPU columns: `bench/gpu_check.py` ({result['date']}; {result.get('machine_line', '')})." if best else ""
    return best, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()
    sd, adaptive, heads = (json.loads((RESULTS / f"{n}.json").read_text()) for n in ("export_sd", "adaptive", "heads"))
    rows = {r["strategy"]: r for r in adaptive["rows"] if r["how"] == "engine"}
    passes = {name: rows[name]["passes_per_image"] for name in STRATEGIES}
    for kind in HEADS:
        head = heads["heads"][kind]
        passes[f"{kind} head ({', '.join(head['blocks'])} at t = {', '.join(map(str, head['steps']))})"] = \
            head["passes_per_image"]
    seconds_per_pass = {path: ms / 1000 for path, ms in sd["ms_per_pass"].items()}
    gpu, gpu_line = gpu_seconds_per_pass()
    seconds_per_pass.update(gpu)
    paths = list(seconds_per_pass)
    table = ["| strategy (10 labels) | UNet passes / image | " + " | ".join(paths) + " |",
             "|---|---:|" + "---:|" * len(paths)]
    table += [f"| {name} | {n:.0f} | " + " | ".join(duration(n * seconds_per_pass[p]) for p in paths) + " |"
              for name, n in passes.items()]
    table += ["", "Cost per image = UNet passes per image × time per image-pass. "
              f"Time per image-pass: SD-1.5-size UNet "
              f"({sd['unet_params_M']:.0f} M parameters) at batch {sd['batch']}, `bench/export_sd.py` "
              f"({sd['date']}; {machine_line(sd['machine'])}). Passes per image: 10 labels on the demo digits, "
              f"`bench/adaptive.py` ({adaptive['date']}) and `bench/heads.py` ({heads['date']}); a head's graph stops "
              "after the last block it reads, so its passes cost at most a full pass each. Text encoder and VAE "
              f"encoder not included.{gpu_line} Combined by `bench/own_model_cost.py`."]
    result = {"seconds_per_pass": seconds_per_pass, "passes_per_image": passes,
              "seconds_per_image": {name: {p: n * s for p, s in seconds_per_pass.items()}
                                    for name, n in passes.items()},
              "sources": {"export_sd": sd["date"], "adaptive": adaptive["date"], "heads": heads["date"]}}
    publish("own_model_cost", result, table, args.update_docs)


if __name__ == "__main__":
    main()
