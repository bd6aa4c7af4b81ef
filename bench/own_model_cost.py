"""What one image costs on your own Stable Diffusion model, from measured figures: the per-pass time of an
SD-1.5-size UNet on each CPU path (bench/export_sd.py) times the UNet passes per image of each strategy
(bench/adaptive.py, bench/heads.py: 10 labels, measured on the demo digits).

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
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


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
              "encoder not included. Combined by `bench/own_model_cost.py`."]
    result = {"seconds_per_pass": seconds_per_pass, "passes_per_image": passes,
              "seconds_per_image": {name: {p: n * s for p, s in seconds_per_pass.items()}
                                    for name, n in passes.items()},
              "sources": {"export_sd": sd["date"], "adaptive": adaptive["date"], "heads": heads["date"]}}
    publish("own_model_cost", result, table, args.update_docs)


if __name__ == "__main__":
    main()
