"""Adaptive racing against fixed stages on the demo: the exhaustive decision's agreement for how many passes.

    .venv/bin/python bench/adaptive.py [--update-docs]

1. Validation (the training split's validation slice, never held-out): every candidate's error at every
   point of the 100-timestep grid; the race is replayed on those errors for a range of z and min_rounds,
   the cheapest setting that reaches >= 99.5 % agreement with the exhaustive decision becomes the default,
   and the default strategy is the one that reaches the better agreement for fewer passes (race vs the demo's
   stages, both on the engine).
2. Held-out (450 digits, nothing tuned on them): the exhaustive decision (10 classes x 100 timesteps, on the
   engine, timed); fixed schedules on the engine (the demo's; the seed's CIFAR-10 and Pets ones on the first
   SEED_IMAGES digits: they cost 1,375-2,750 passes an image); fixed schedules and the race replayed on the
   cached grid errors (the race with and without the engine's timestep profile, several z); the default race
   on the engine (timed, and its decisions checked against the replay); the race with three templates a class.

Replays count the passes a run would spend on the same (t, eps) pairs the engine uses for the race (eps by
grid position). Fixed schedules replayed on the 100-point grid see those grid eps, not the engine's stage
order of eps: same distribution, not the same draws. Writes bench/results/adaptive.json and adaptive.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, machine_line, publish, update_docs  # noqa: E402

import diffscore  # noqa: E402
from diffscore.app.demo import DEMO_STAGES, cache_root, demo_engine_dir  # noqa: E402
from diffscore.app.digits import CLASS_NAMES, load_digits_split, validation_indices  # noqa: E402
from diffscore.kernels import PairedRace, RaceConfig, StagedPruning, race_plan, stage_timesteps  # noqa: E402

GRID = 100
SEED_IMAGES = 30  # held-out digits the seed's expensive schedules run on
TEMPLATE_IMAGES = 150  # held-out digits of the several-templates row
TEMPLATES = ["a handwritten digit {}", "the digit {}", "handwritten {}"]
Z_GRID = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
MIN_ROUNDS = (1, 2, 3)
ROUND_SIZE = 5
FIXED_REPLAYED = [[(5, 3), (100, 1)], [(10, 3), (100, 1)], [(20, 3), (100, 1)], [(20, 2), (100, 1)],
                  [(50, 5), (100, 1)], [(10, 1)], [(20, 1)], [(25, 1)], [(50, 1)]]
SEED_SCHEDULES = {"seed CIFAR-10 (50,5)->(500,1)": [(50, 5), (500, 1)],
                  "seed Pets (25,5)->(250,1)": [(25, 5), (250, 1)]}
LABELS = list(CLASS_NAMES)


def grid_errors(engine, images, name: str):
    """(images, 10, GRID) errors on the engine, cached per engine; returns (errors, seconds or None if cached)."""
    key = hashlib.sha256(np.stack(images).tobytes()).hexdigest()[:12]
    path = cache_root() / "adaptive" / f"{engine.engine_dir.name}-{name}-{key}.npy"
    if path.is_file():
        return np.load(path), None
    start = time.perf_counter()
    errors = engine.grid_errors(images, LABELS, timesteps=GRID, seed=0, progress=True)
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, errors)
    return errors, seconds


def replay(run, errors: np.ndarray, column) -> tuple[int, int]:
    """Drive a StagedPruning/PairedRace on one image's cached errors: (winner, passes)."""
    while (req := run.request()) is not None:
        cand, pos = req
        run.submit(errors[np.ix_(cand, column(run, pos))])
    return run.best, run.passes


def replay_race(errors, order, z, min_rounds):
    grid, _ = race_plan(1000, GRID)
    out = [replay(PairedRace(e.shape[0], grid, order, RaceConfig(z, min_rounds, ROUND_SIZE)), e, lambda r, p: p)
           for e in errors]
    return np.array([w for w, _ in out]), np.array([p for _, p in out])


def replay_stages(errors, stages):
    grid = {t: j for j, t in enumerate(race_plan(1000, GRID)[0])}
    if len(stages) == 1:  # one stage (n, 1): stage_timesteps' n points of the 100-point grid, every candidate
        cols = [grid[t] for t in stage_timesteps([stages[0], (GRID, 1)], 1000)[0]]
        return errors[:, :, cols].mean(axis=2).argmin(axis=1), np.full(len(errors), errors.shape[1] * len(cols))
    out = [replay(StagedPruning(e.shape[0], stages, 1000), e, lambda r, p: [grid[t] for t in r.timesteps[p]])
           for e in errors]
    return np.array([w for w, _ in out]), np.array([p for _, p in out])


def row(name, how, winners, reference, truth, passes, images_per_s=None, n=None):
    return {"strategy": name, "how": how, "images": int(n or len(winners)),
            "agreement": float(np.mean(np.asarray(winners) == reference)),
            "accuracy": float(np.mean(np.asarray(winners) == truth)),
            "passes_per_image": float(np.mean(passes)), "images_per_s": images_per_s}


def on_engine(engine, images, **options):
    start = time.perf_counter()
    results = engine.classify(images, LABELS, seed=0, progress=True, **options)
    seconds = time.perf_counter() - start
    return (np.array([LABELS.index(r.label) for r in results]), np.array([r.passes for r in results]),
            len(images) / seconds)


def choose_defaults(engine, profile_order, split, limit=None) -> dict:
    """z and min_rounds (cheapest with >= 99.5 % validation agreement), and the default strategy."""
    val = validation_indices()[1][:limit]
    images = list(split.train_images[val])
    errors, _ = grid_errors(engine, images, "validation")
    exhaustive = errors.mean(axis=2).argmin(axis=1)
    trials = []
    for z in Z_GRID:
        for m in MIN_ROUNDS:
            winners, passes = replay_race(errors, profile_order, z, m)
            trials.append({"z": z, "min_rounds": m, "agreement": float(np.mean(winners == exhaustive)),
                           "passes_per_image": float(passes.mean())})
    good = [t for t in trials if t["agreement"] >= 0.995] or trials
    best = min(good, key=lambda t: (t["passes_per_image"], -t["agreement"]))
    winners, passes, _ = on_engine(engine, images, strategy="stages", stages=DEMO_STAGES)
    stages = {"agreement": float(np.mean(winners == exhaustive)), "passes_per_image": float(passes.mean())}
    race_wins = best["agreement"] >= stages["agreement"] and best["passes_per_image"] <= stages["passes_per_image"]
    return {"images": len(images), "trials": trials, "chosen": best, "demo_stages": stages,
            "default_strategy": "race" if race_wins else "stages"}


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, key in zip(axes, ("agreement", "accuracy")):
        for prefix, style in (("race, profile", "o-"), ("race, spread order", "s--")):
            pts = sorted((r["passes_per_image"], r[key]) for r in rows if r["strategy"].startswith(prefix) and r["how"]
                         == "replay")
            ax.plot(*zip(*pts), style, label=prefix)
        fixed = [r for r in rows if r["strategy"].startswith("fixed") or r["strategy"].startswith("seed")]
        ax.plot([r["passes_per_image"] for r in fixed], [r[key] for r in fixed], "k^", label="fixed stages")
        ax.set_xscale("log")
        ax.set_xlabel("UNet passes per image")
        ax.set_ylabel(f"{key} (held-out digits)")
        ax.grid(alpha=0.3)
    axes[0].set_title("agreement with the exhaustive decision")
    axes[1].set_title("accuracy")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update-docs", action="store_true")
    parser.add_argument("--limit", type=int, default=None, help="a smoke run: at most N images per split")
    parser.add_argument("--render", action="store_true",
                        help="only re-render the docs table from bench/results/adaptive.json")
    args = parser.parse_args()
    if args.render:
        saved = json.loads((RESULTS / "adaptive.json").read_text())
        update_docs("adaptive", "\n".join(render(saved, saved["machine"])))
        return

    split = load_digits_split()
    engine = diffscore.load(demo_engine_dir(), backend="ort-cpu")
    profile_grid, profile_order = race_plan(1000, None, engine.manifest.timestep_profile)
    spread_order = race_plan(1000, GRID)[1]
    assert len(profile_grid) == GRID
    engine.classify(list(split.test_images[:2]), LABELS, strategy="race")  # warm-up: sessions, prompt cache

    chosen = choose_defaults(engine, profile_order, split, args.limit)
    z, min_rounds = chosen["chosen"]["z"], chosen["chosen"]["min_rounds"]
    print("validation:", chosen["chosen"], "demo stages:", chosen["demo_stages"], "default:",
          chosen["default_strategy"])

    images, truth = list(split.test_images[: args.limit]), split.test_labels[: args.limit]
    errors, seconds = grid_errors(engine, images, "held-out")
    reference = errors.mean(axis=2).argmin(axis=1)  # the exhaustive decision
    rows = [row("exhaustive (10 classes x 100 timesteps)", "engine", reference, reference, truth,
                np.full(len(images), errors.shape[1] * GRID), len(images) / seconds if seconds else None)]

    winners, passes, speed = on_engine(engine, images, strategy="stages", stages=DEMO_STAGES)
    rows.append(row("fixed, demo (10,3)->(40,1)", "engine", winners, reference, truth, passes, speed))
    for name, stages in SEED_SCHEDULES.items():
        winners, passes, speed = on_engine(engine, images[:SEED_IMAGES], strategy="stages", stages=stages)
        rows.append(row(name, "engine", winners, reference[:SEED_IMAGES], truth[:SEED_IMAGES], passes, speed))
    for stages in FIXED_REPLAYED:
        winners, passes = replay_stages(errors, stages)
        name = "->".join(f"({n},{k})" for n, k in stages) + (" of the 100-grid" if len(stages) == 1 else "")
        rows.append(row(f"fixed {name}", "replay", winners, reference, truth, passes))
    for zz in Z_GRID:
        for label, order in (("race, profile", profile_order), ("race, spread order", spread_order)):
            winners, passes = replay_race(errors, order, zz, min_rounds)
            rows.append(row(f"{label}, z={zz:g}", "replay", winners, reference, truth, passes))

    checks = {}
    for label, use_profile, order in (("race, profile", True, profile_order),
                                      ("race, spread order", False, spread_order)):
        winners, passes, speed = on_engine(engine, images, strategy="race", z=z, min_rounds=min_rounds,
                                           round_size=ROUND_SIZE, timesteps=GRID, use_profile=use_profile)
        rows.append(row(f"{label}, z={z:g} (default)", "engine", winners, reference, truth, passes, speed))
        replayed, replayed_passes = replay_race(errors, order, z, min_rounds)
        checks[label] = {"same_decisions": int(np.sum(winners == replayed)),
                         "same_passes": int(np.sum(passes == replayed_passes))}
    n = TEMPLATE_IMAGES
    winners, passes, speed = on_engine(engine, images[:n], strategy="race", z=z, min_rounds=min_rounds,
                                       round_size=ROUND_SIZE, templates=TEMPLATES)
    rows.append(row(f"race, profile, z={z:g}, {len(TEMPLATES)} templates/class (vs the 1-template exhaustive)",
                    "engine", winners, reference[:n], truth[:n], passes, speed))

    png = RESULTS / "adaptive.png"
    RESULTS.mkdir(exist_ok=True)
    plot(rows, png)
    result = {"rows": rows, "validation": chosen, "engine_equals_replay": checks, "grid": GRID,
              "round_size": ROUND_SIZE, "plot": png.name}
    publish("adaptive", result, render(result, machine()), args.update_docs)


def render(result: dict, info: dict) -> list[str]:
    """The docs/benchmarks.md table and the summary lines, all computed from the result."""
    rows, chosen, checks = result["rows"], result["validation"], result["engine_equals_replay"]
    z, min_rounds = chosen["chosen"]["z"], chosen["chosen"]["min_rounds"]
    table = ["| strategy | run | images | agreement | accuracy | passes/image | images/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    table += [f"| {r['strategy']} | {r['how']} | {r['images']} | {100 * r['agreement']:.2f} % | "
              f"{100 * r['accuracy']:.2f} % | {r['passes_per_image']:.0f} | "
              f"{'' if r['images_per_s'] is None else format(r['images_per_s'], '.2f')} |"
              for r in rows]
    n = rows[0]["images"]
    race = next(r for r in rows if r["strategy"].startswith("race, profile") and r["strategy"].endswith("(default)"))
    fixed = [r for r in rows if r["strategy"].startswith(("fixed", "seed"))]
    enough = [r for r in fixed if r["images"] == n and r["agreement"] >= race["agreement"]]
    cheapest = min(enough, key=lambda r: r["passes_per_image"]) if enough else None
    demo = next(r for r in rows if r["strategy"].startswith("fixed, demo"))
    cifar = next(r for r in rows if r["strategy"].startswith("seed CIFAR"))
    summary = (f"The default race: {100 * race['agreement']:.2f} % agreement with the exhaustive decision at "
               f"{race['passes_per_image']:.0f} passes/image; ")
    if cheapest:
        summary += (f"the cheapest fixed schedule with at least that agreement, {cheapest['strategy']}, needs "
                    f"{cheapest['passes_per_image']:.0f} "
                    f"({cheapest['passes_per_image'] / race['passes_per_image']:.1f}x); ")
    summary += (f"the seed's CIFAR-10 schedule {cifar['passes_per_image']:.0f} "
                f"({cifar['passes_per_image'] / race['passes_per_image']:.0f}x); the demo's stages "
                f"{demo['passes_per_image']:.0f} ({demo['passes_per_image'] / race['passes_per_image']:.1f}x) at "
                f"{100 * demo['agreement']:.2f} %. On the engine, in this run: {race['images_per_s']:.2f} images/s "
                f"against {demo['images_per_s']:.2f} for the demo's stages "
                f"({race['images_per_s'] / demo['images_per_s']:.1f}x) and {cifar['images_per_s']:.3f} for the "
                f"CIFAR-10 schedule ({race['images_per_s'] / cifar['images_per_s']:.0f}x).")
    table += ["", summary, "",
              f"Defaults chosen on the validation slice ({chosen['images']} training digits): z = {z:g}, min_rounds = "
              f"{min_rounds}, rounds of {result['round_size']} ({100 * chosen['chosen']['agreement']:.1f} % agreement, "
              f"{chosen['chosen']['passes_per_image']:.0f} passes/image; the demo's stages: "
              f"{100 * chosen['demo_stages']['agreement']:.1f} %, {chosen['demo_stages']['passes_per_image']:.0f}); "
              f"default strategy: {chosen['default_strategy']}. Engine race = replay: "
              + ", ".join(f"{k} {v['same_decisions']}/{n} decisions, {v['same_passes']}/{n} pass counts"
                          for k, v in checks.items()) + ". The seed's schedules ran on the first "
              f"{SEED_IMAGES} digits only (1,375-2,750 passes an image); the templates row on the first "
              f"{TEMPLATE_IMAGES}.",
              "", f"Machine: {machine_line(info)} (shared with other jobs: timings are ratios within this one run).",
              "", "![agreement and accuracy against UNet passes per image](../bench/results/adaptive.png)"]
    return table


if __name__ == "__main__":
    main()
