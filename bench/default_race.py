"""The race settings every engine gets by default (kernels.racing.RaceConfig), measured on an engine exported with
no options: template "{}", no timestep profile (spread order), the race.

    .venv/bin/python bench/default_race.py

1. Validation (the training split's validation slice, never held-out): every label's error at every point of the
   100-timestep grid; the race in spread order is replayed on those errors for z x min_rounds. The default is the
   most cautious setting (largest z, then most rounds) that keeps >= 99.5 % agreement with the exhaustive decision
   at no more than 15 % above the cheapest such setting's passes.
2. Held-out (the 450 digits `diffscore demo` classifies): `Engine.classify` with the engine's own defaults,
   nothing passed: passes per image, accuracy and images/s. Writes bench/results/default_race.json.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptive import GRID, grid_errors, replay_race  # noqa: E402
from common import machine, machine_line, timed, write_result  # noqa: E402

import diffscore  # noqa: E402
from diffscore.app.demo import DEMO_MODEL  # noqa: E402
from diffscore.app.digits import CLASS_NAMES, load_digits_split, validation_indices  # noqa: E402
from diffscore.kernels import spread_order  # noqa: E402

Z_GRID = (1.0, 1.5, 2.0, 2.5, 3.0)
MIN_ROUNDS = (1, 2)
LABELS = list(CLASS_NAMES)


def choose(trials: list[dict]) -> dict:
    good = [t for t in trials if t["agreement"] >= 0.995] or trials
    cheapest = min(t["passes_per_image"] for t in good)
    near = [t for t in good if t["passes_per_image"] <= 1.15 * cheapest]
    return max(near, key=lambda t: (t["z"], t["min_rounds"]))


def main() -> None:
    from diffscore.export.onnx_export import export_engine

    split = load_digits_split()
    with tempfile.TemporaryDirectory() as tmp:
        engine_dir = export_engine(DEMO_MODEL, Path(tmp) / "plain-demo", show_progress=False)  # no options at all
        with diffscore.load(engine_dir, backend="ort-cpu") as engine:
            defaults = {"strategy": engine.defaults.strategy, "template": engine.defaults.template,
                        "race": dataclasses.asdict(engine.defaults.race),
                        "profile": engine.manifest.timestep_profile is not None}
            val = list(split.train_images[validation_indices()[1]])
            errors, _ = grid_errors(engine, val, "plain-validation")
            exhaustive = errors.mean(axis=2).argmin(axis=1)
            trials = []
            for z in Z_GRID:
                for m in MIN_ROUNDS:
                    winners, passes = replay_race(errors, spread_order(GRID), z, m)
                    trials.append({"z": z, "min_rounds": m, "agreement": float(np.mean(winners == exhaustive)),
                                   "passes_per_image": float(passes.mean())})
            results, seconds = timed(lambda: engine.classify(list(split.test_images), LABELS, progress=True))
    predicted = np.array([LABELS.index(r.label) for r in results])
    held_out = {"images": len(results), "accuracy": float(np.mean(predicted == split.test_labels)),
                "passes_per_image": float(np.mean([r.passes for r in results])),
                "max_passes": int(max(r.passes for r in results)), "images_per_s": len(results) / seconds}
    result = {"engine_defaults": defaults, "validation": {"images": len(val), "trials": trials,
                                                          "chosen": choose(trials)}, "held_out": held_out}
    write_result("default_race", result)
    info = machine()
    print(f"machine: {machine_line(info)}")
    for t in trials:
        print(f"validation z={t['z']} min_rounds={t['min_rounds']}: agreement {t['agreement']:.2%}, "
              f"{t['passes_per_image']:.1f} passes/image")
    print(f"chosen on validation: {result['validation']['chosen']}")
    print(f"engine defaults: {defaults}")
    print(f"held-out, engine defaults: {held_out}")


if __name__ == "__main__":
    main()
