"""The cascade (a one-pass head shortlists, the race decides) against fixed stages, the race and the head alone,
on the digits demo and on the 62-class glyph model's held-out typefaces, in one run.

    .venv/bin/python bench/cascade.py [--digits N] [--fonts N] [--timed N] [--workers W]

Per data set: a linear-probe head (on the glyphs also a DifFormer head) is trained on the model's training images
(features cached) and exported with the model; every candidate's error at every point of the race's 100-timestep
grid is computed on the engine (the exhaustive decision: classes x 100 passes an image; rows cached per image,
computed by W processes of one thread each). Fixed stages, the race and the cascade at each shortlist setting (k
fixed, or per image by the head's softmax mass) are replayed on those errors with the engine's own drivers
(kernels/, the same (t, eps) pairs the engine uses), passes counting the head's. Defaults are chosen on validation
data only: digits, the training split's validation slice, the cheapest (k, mass) with >= 99.5 % agreement (the race
stage keeps the race's own settings; tuning those too is measured and reported); glyphs, the validation typefaces,
the shortlisting head and the cheapest setting within 0.5 points of the race's agreement at <= 1/8 of its passes,
else the best agreement at that cost. Then on the engine, timed, on the first --timed images: race, head, cascade
(its decisions and passes checked against the replay). Cost against the number of classes: the glyph model's
held-out images restricted to seeded class subsets of 10, 20, 40, 62.
Writes bench/results/cascade.json and cascade.png.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from adaptive import replay, replay_stages  # noqa: E402
from common import RESULTS, machine, machine_line, publish  # noqa: E402

import diffscore  # noqa: E402
from diffscore.app.demo import DEMO_MODEL, DEMO_RACE, cache_root, demo_engine_dir  # noqa: E402
from diffscore.kernels import PairedRace, RaceConfig, race_plan  # noqa: E402
from diffscore.kernels.cascade import CascadeConfig, cascade_run  # noqa: E402

GRID = 100
FONTS_MODEL = Path(__file__).resolve().parents[1] / "models" / "fonts62"
HEAD_BLOCKS, HEAD_STEPS = ["down_blocks.1", "mid_block"], [50, 200]  # the heads bench's linear probe
RACE = RaceConfig(**DEMO_RACE)  # the demo's race (z = 1, min_rounds = 1, rounds of 5) on both models
K_VALUES = (1, 2, 3, 5, 8)  # fixed shortlist sizes replayed
MASSES = (0.99, 0.999, 0.9999, 0.99999)  # confidence-based k, at most k
SETTINGS = [CascadeConfig(k=k, mass=None) for k in K_VALUES] + [CascadeConfig(k=k, mass=m) for k in (2, 3, 5, 8)
                                                                    for m in MASSES]
SHOWN = [CascadeConfig(k=k, mass=None) for k in K_VALUES] + [CascadeConfig(k=k, mass=m) for k in (3, 5) for m in MASSES]
# the race stage's own settings, measured on the digits (round size, z, min_rounds): is tuning them worth it?
RACE_STAGE = [RaceConfig(z=z, min_rounds=m, round_size=r)
              for r, z, m in itertools.product((1, 2, 3, 5), (1.0, 1.5), (1, 2))]
CLASS_COUNTS = (10, 20, 40, 62)
FIXED = [[(10, 3), (100, 1)], [(20, 5), (100, 1)], [(20, 1)]]  # replayable on the 100-point grid (its last stage)
TARGET = 0.995
FONT_SHARE = 8  # the glyph target: the race's agreement (within 0.5 points) at <= 1/8 of its passes


def image_key(image) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]


def weights_key(model_dir: Path) -> str:
    """What the errors depend on: the model's weights and scheduler (not its model card), so cached rows and
    engines follow a retrained model and survive an edited README."""
    h = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*/*")):
        if path.suffix in (".safetensors", ".bin") or path.name == "scheduler_config.json":
            h.update(path.relative_to(model_dir).as_posix().encode() + path.read_bytes())
    return h.hexdigest()[:12]


_ENGINE = None  # a worker process's engine


def _load_worker(engine_dir: str) -> None:
    global _ENGINE
    _ENGINE = diffscore.load(engine_dir, backend="ort-cpu", threads=1)


def _grid_chunk(job):
    labels, images = job
    return _ENGINE.grid_errors(list(images), labels, timesteps=GRID)


def grid_errors(engine_dir: Path, model_dir: Path, images, labels, name: str, workers: int = 1) -> np.ndarray:
    """(images, classes, GRID) errors of every class at every grid point, on the engine exported from model_dir.
    Rows are cached per image (<cache>/cascade/<name>-<the model's weights_key>-rows.npz) and the missing ones
    computed by `workers` processes of one thread each: the noise is shared per seed and timestep, not per image,
    so a row does not depend on its batch."""
    path = cache_root() / "cascade" / f"{name}-{weights_key(model_dir)}-rows.npz"
    rows = {}
    if path.is_file():
        with np.load(path) as saved:
            rows = {k: saved[k] for k in saved.files}
    keys = [image_key(im) for im in images]
    missing = list(dict.fromkeys(i for i, k in enumerate(keys) if k not in rows))
    if missing:
        chunks = [missing[i : i + 2] for i in range(0, len(missing), 2)]
        print(f"{name}: {len(missing)} images x {len(labels)} classes x {GRID} timesteps on {workers} processes",
              flush=True)
        with multiprocessing.get_context("spawn").Pool(workers, _load_worker, (str(engine_dir),)) as pool:
            jobs = ((labels, [images[i] for i in c]) for c in chunks)
            for n, (chunk, errors) in enumerate(zip(chunks, pool.imap(_grid_chunk, jobs)), 1):
                rows.update({keys[i]: e for i, e in zip(chunk, errors)})
                if n % 8 == 0 or n == len(chunks):
                    save_rows(path, rows)
                    print(f"  {min(2 * n, len(missing))}/{len(missing)}", flush=True)
    return np.stack([rows[k] for k in keys])


def save_rows(path: Path, rows: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **rows)
    tmp.replace(path)


HEAD_FOLDERS = {"linear": "probe", "difformer": "difformer"}  # a head kind -> its folder and its name in the engine
SHORTLISTERS = {"probe": "linear probe", "difformer": "DifFormer head"}  # a head's name -> how tables call it


def engine_with_head(model_dir: Path, name: str, images, labels, classes, defaults: dict, profile=None,
                     kinds=("linear",)) -> Path:
    """The model exported with a head of each kind in `kinds` trained on (images, labels), all on the same
    features (HEAD_BLOCKS at HEAD_STEPS), cached."""
    from diffscore.engine.manifest import folder_sha256
    from diffscore.engine.profiling import save_profile
    from diffscore.export.onnx_export import export_engine
    from diffscore.reference.features import FeatureSpec
    from diffscore.reference.head_training import TrainOptions, train_head_on_images
    from diffscore.reference.heads import load_head, save_head

    key = hashlib.sha256(np.stack(images).tobytes()).hexdigest()[:12]
    root = cache_root() / "cascade" / f"{name}-{weights_key(model_dir)}-{key}"
    engine_dir = root / "-".join(["engine", *(HEAD_FOLDERS[k] for k in kinds[1:])])
    if (engine_dir / "manifest.json").is_file():
        return engine_dir
    source = folder_sha256(model_dir)  # a head records the whole folder's (its card too): retrained if it differs
    for kind in kinds:
        if not (root / HEAD_FOLDERS[kind]).is_dir() or load_head(root / HEAD_FOLDERS[kind])[1].source_sha256 != source:
            head, config = train_head_on_images(model_dir, images, labels, classes, kind,
                                                FeatureSpec(HEAD_BLOCKS, HEAD_STEPS), TrainOptions(),
                                                root / "features", progress=True)
            save_head(head, config, root / HEAD_FOLDERS[kind])
    export_engine(model_dir, engine_dir, heads=[root / HEAD_FOLDERS[k] for k in kinds], defaults=defaults,
                  overwrite=True, show_progress=False)
    if profile:
        save_profile(engine_dir, profile)
    return engine_dir


def head_scores(engine, images, head: str | None = None) -> np.ndarray:
    return engine.head_logits(images, head).astype(np.float64)


def replay_race(errors, order, race: RaceConfig = RACE):
    grid, _ = race_plan(1000, GRID)
    out = [replay(PairedRace(e.shape[0], grid, order, race), e, lambda r, p: p) for e in errors]
    return np.array([w for w, _ in out]), np.array([p for _, p in out])


def replay_cascade(errors, scores, config: CascadeConfig, profile, head_passes: int, race: RaceConfig = RACE):
    out = [replay(cascade_run(s, 1, 1000, config, race, GRID, profile), e, lambda r, p: p)
           for e, s in zip(errors, scores)]
    return np.array([w for w, _ in out]), np.array([p for _, p in out]) + head_passes


def row(name, how, winners, reference, truth, passes, images_per_s=None, data=""):
    return {"data": data, "strategy": name, "how": how, "images": len(winners),
            "agreement": float(np.mean(np.asarray(winners) == reference)),
            "accuracy": float(np.mean(np.asarray(winners) == truth)), "passes_per_image": float(np.mean(passes)),
            "images_per_s": images_per_s}


def fixed_name(stages) -> str:
    return "fixed " + "->".join(f"({n},{k})" for n, k in stages) + (" of the 100-grid" if len(stages) == 1 else "")


def config_options(config: CascadeConfig) -> dict:
    return {"k": config.k, "mass": config.mass}


def engine_options(config: CascadeConfig, head: str) -> dict:
    """classify's keywords for `config` (mass None there means the library default; 1 means always k)."""
    return {"k": config.k, "mass": 1.0 if config.mass is None else config.mass, "head": head}


def config_name(config: CascadeConfig, head: str, race: RaceConfig = RACE) -> str:
    name = f"cascade k={config.k}" if config.mass is None else f"cascade mass={config.mass:g} (k<={config.k})"
    name += f", {SHORTLISTERS[head]}"
    if race != RACE:
        name += f", race rounds of {race.round_size} z={race.z:g} min_rounds={race.min_rounds}"
    return name


def score_settings(errors, scores: dict, profile, head_passes, settings, race: RaceConfig = RACE) -> list[dict]:
    """Each (shortlisting head, shortlist setting)'s agreement with the exhaustive decision and passes per image
    (replayed); scores: a head's name -> its logits."""
    reference = errors.mean(axis=2).argmin(axis=1)
    out = []
    for head, config in itertools.product(scores, settings):
        winners, passes = replay_cascade(errors, scores[head], config, profile, head_passes, race)
        out.append({"head": head, "config": config_options(config), "race": race.__dict__,
                    "agreement": float(np.mean(winners == reference)), "passes_per_image": float(passes.mean())})
    return out


def cheapest_reaching(scored: list[dict], target: float) -> dict | None:
    good = [c for c in scored if c["agreement"] >= target - 1e-12]
    return min(good, key=lambda c: c["passes_per_image"]) if good else None


def replayed_rows(data, errors, scores: dict, truth, profile, head_passes, default: dict) -> list[dict]:
    """Exhaustive, fixed stages, race, each head alone and the cascade shortlisted by each head (SHOWN settings and
    `default`, a score_settings entry), replayed on the exhaustive errors."""
    reference = errors.mean(axis=2).argmin(axis=1)
    n_classes = errors.shape[1]
    order = race_plan(1000, GRID, profile)[1]
    rows = [row(f"exhaustive ({n_classes} classes x {GRID} timesteps)", "engine", reference, reference, truth,
                np.full(len(errors), n_classes * GRID), data=data)]
    for stages in FIXED:
        winners, passes = replay_stages(errors, stages)
        rows.append(row(fixed_name(stages), "replay", winners, reference, truth, passes, data=data))
    winners, passes = replay_race(errors, order)
    rows.append(row(f"race z={RACE.z:g}", "replay", winners, reference, truth, passes, data=data))
    for head, logits in scores.items():
        rows.append(row(f"head alone ({SHORTLISTERS[head]})", "replay", logits.argmax(axis=1), reference, truth,
                        np.full(len(errors), head_passes), data=data))
    chosen = CascadeConfig(**default["config"])
    for head, logits in scores.items():
        for config in dict.fromkeys(SHOWN + [chosen] * (head == default["head"])):
            winners, passes = replay_cascade(errors, logits, config, profile, head_passes)
            is_default = head == default["head"] and config == chosen
            name = config_name(config, head) + (" (default)" if is_default else "")
            rows.append(row(name, "replay", winners, reference, truth, passes, data=data))
    return rows


def timed_rows(data, engine, images, labels, reference, truth, config, head: str) -> tuple[list[dict], dict]:
    """Race, head and cascade on the engine, timed; the cascade's decisions/passes against its replay."""
    rows, out = [], {}
    cascade = dict(strategy="cascade", **engine_options(config, head), **DEMO_RACE, timesteps=GRID)
    engine.classify(images[:2], labels, **cascade)
    for name, options in ((f"race z={RACE.z:g}", dict(strategy="race", **DEMO_RACE, timesteps=GRID)),
                          (f"head alone ({SHORTLISTERS[head]})", dict(method="head", head=head)),
                          (config_name(config, head) + " (default)", cascade)):
        start = time.perf_counter()
        results = engine.classify(images, labels, seed=0, **options)
        speed = len(images) / (time.perf_counter() - start)
        winners = np.array([labels.index(r.label) for r in results])
        passes = np.array([r.passes for r in results])
        rows.append(row(name, "engine", winners, reference, truth, passes, speed, data=data))
        out[name] = (winners, passes)
    return rows, out


def engine_check(engine_out, errors, scores, config, profile, head_passes) -> dict:
    """How many of the engine's cascade decisions and pass counts its replay on the grid errors reproduces."""
    winners, passes = replay_cascade(errors, scores, config, profile, head_passes)
    return {"same_decisions": int(np.sum(engine_out[0] == winners)),
            "same_passes": int(np.sum(engine_out[1] == passes)),
            "images": len(winners)}


def digits(args) -> tuple[list[dict], dict]:
    from diffscore.app.digits import CLASS_NAMES, load_digits_split, validation_indices

    split = load_digits_split()
    labels = list(CLASS_NAMES)
    demo = diffscore.load(demo_engine_dir(), backend="ort-cpu")
    profile = demo.manifest.timestep_profile
    fit, val = validation_indices()
    engine_dir = engine_with_head(DEMO_MODEL, "digits", list(split.train_images[fit]), split.train_labels[fit], labels,
                                  {"template": demo.defaults.template, "loss": demo.defaults.loss}, profile)
    engine = diffscore.load(engine_dir, backend="ort-cpu")
    head_passes = len(HEAD_STEPS)
    # validation: the default shortlist
    v_images = list(split.train_images[val[: args.validation]])
    v_err = grid_errors(engine_dir, DEMO_MODEL, v_images, labels, "digits", args.workers)
    v_scores = {"probe": head_scores(engine, v_images)}
    choice = score_settings(v_err, v_scores, profile, head_passes, SETTINGS)
    chosen = cheapest_reaching(choice, TARGET) or max(choice, key=lambda c: c["agreement"])
    default = CascadeConfig(**chosen["config"])
    # held-out
    images, truth = list(split.test_images[: args.digits]), split.test_labels[: args.digits]
    errors = grid_errors(engine_dir, DEMO_MODEL, images, labels, "digits", args.workers)
    scores = {"probe": head_scores(engine, images)}
    rows = replayed_rows("digits (10 classes)", errors, scores, truth, profile, head_passes, chosen)
    # measured, not shipped: the race stage's settings tuned on validation as well
    tuned = [c for race in RACE_STAGE for c in score_settings(v_err, v_scores, profile, head_passes,
                                                              [s for s in SETTINGS if s.k > 1], race)]
    pick = cheapest_reaching(tuned, TARGET)
    held = score_settings(errors, scores, profile, head_passes, [CascadeConfig(**pick["config"])],
                          RaceConfig(**pick["race"]))[0]
    t = args.timed
    reference = errors.mean(axis=2).argmin(axis=1)
    engine_rows, out = timed_rows("digits (10 classes)", engine, images[:t], labels, reference[:t], truth[:t], default,
                                  "probe")
    check = engine_check(out[config_name(default, "probe") + " (default)"], errors[:t], scores["probe"][:t], default,
                         profile, head_passes)
    return rows + engine_rows, {"validation_images": len(v_images), "validation": choice, "default": chosen,
                                "race_stage_tuned": {"settings": len(tuned), "validation": pick, "held_out": held},
                                "engine_equals_replay": check}


def fonts(args) -> tuple[list[dict], dict]:
    """The glyph model's held-out typefaces; its shortlisting head (linear probe or DifFormer) and setting chosen on
    the validation typefaces."""
    from fonts_data import CLASS_NAMES, arrays, build

    labels = list(CLASS_NAMES)
    data = arrays(build())  # rendered from the installed packages (models/fonts_data.py's SPLIT)
    train, valid, test = data["train"], data["validation"], data["held_out"]
    engine_dir = engine_with_head(FONTS_MODEL, "fonts62", list(train["images"]), train["labels"], labels,
                                  {"template": "{}", "loss": "l2"}, kinds=("linear", "difformer"))
    engine = diffscore.load(engine_dir, backend="ort-cpu")
    heads = list(engine.manifest.heads)
    head_passes = len(HEAD_STEPS)
    # validation typefaces: the glyph model's own shortlister and shortlist setting
    vpick = np.sort(np.random.default_rng(1).permutation(len(valid["labels"]))[: args.fonts_validation])
    v_images = list(valid["images"][vpick])
    v_err = grid_errors(engine_dir, FONTS_MODEL, v_images, labels, "fonts", args.workers)
    v_scores = {head: head_scores(engine, v_images, head) for head in heads}
    v_ref = v_err.mean(axis=2).argmin(axis=1)
    race_w, race_p = replay_race(v_err, race_plan(1000, GRID)[1])
    race_v = {"agreement": float(np.mean(race_w == v_ref)), "passes_per_image": float(race_p.mean())}
    choice = score_settings(v_err, v_scores, None, head_passes, SETTINGS)
    affordable = [c for c in choice if c["passes_per_image"] <= race_v["passes_per_image"] / FONT_SHARE]
    chosen = cheapest_reaching(affordable, race_v["agreement"] - 0.005) or max(
        affordable, key=lambda c: (c["agreement"], -c["passes_per_image"]))
    default, head = CascadeConfig(**chosen["config"]), chosen["head"]
    # held-out typefaces
    pick = np.sort(np.random.default_rng(0).permutation(len(test["labels"]))[: args.fonts])  # a seeded draw
    images, truth = list(test["images"][pick]), test["labels"][pick]
    errors = grid_errors(engine_dir, FONTS_MODEL, images, labels, "fonts", args.workers)
    scores = {h: head_scores(engine, images, h) for h in heads}
    rows = replayed_rows("glyphs (62 classes, held-out typefaces)", errors, scores, truth, None, head_passes, chosen)
    t = min(args.timed_fonts, len(images))
    reference = errors.mean(axis=2).argmin(axis=1)
    engine_rows, out = timed_rows("glyphs (62 classes, held-out typefaces)", engine, images[:t], labels, reference[:t],
                                  truth[:t], default, head)
    check = engine_check(out[config_name(default, head) + " (default)"], errors[:t], scores[head][:t], default, None,
                         head_passes)
    cost = cost_by_classes(errors, scores[head], head, [CascadeConfig(k=k, mass=None) for k in (3, 5, 8)] + [default])
    return rows + engine_rows, {"images": len(images), "validation_images": len(v_images), "validation_race": race_v,
                                "validation": choice, "default": chosen, "engine_equals_replay": check, "cost": cost}


def cost_by_classes(errors, scores, head: str, configs) -> list[dict]:
    """Passes/image and agreement with the exhaustive decision among seeded class subsets (every image is
    classified among each subset's classes, its own class in it or not: the cost does not depend on it)."""
    out = []
    perm = np.random.default_rng(0).permutation(errors.shape[1])
    for n in CLASS_COUNTS:
        classes = np.sort(perm[:n])
        e, s = errors[:, classes], scores[:, classes]
        reference = e.mean(axis=2).argmin(axis=1)
        runs = {fixed_name(FIXED[0]): replay_stages(e, FIXED[0]),
                f"race z={RACE.z:g}": replay_race(e, race_plan(1000, GRID)[1]),
                **{config_name(c, head): replay_cascade(e, s, c, None, len(HEAD_STEPS))
                   for c in dict.fromkeys(configs)}}
        entry = {"classes": n, "images": len(e)}
        for name, (winners, passes) in runs.items():
            entry[name] = {"passes_per_image": float(passes.mean()), "agreement": float(np.mean(winners == reference))}
        out.append(entry)
    return out


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["data"] for r in rows))
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 5.6))
    for ax, data in zip(np.atleast_1d(axes), sets):
        mine = [r for r in rows if r["data"] == data and r["how"] != "engine" or
                (r["data"] == data and r["strategy"].startswith("exhaustive"))]
        groups = {}  # a curve per strategy kind (and shortlisting head)
        for r in mine:
            name = r["strategy"].removesuffix(" (default)")
            if name.startswith("cascade"):
                label = ("cascade k" if name.startswith("cascade k=") else "cascade mass") + ", " + name.split(", ")[1]
            else:
                label = name if name.startswith("head") else name.split(" ")[0]
            groups.setdefault(label, []).append((r["passes_per_image"], r["agreement"]))
        for label, pts in groups.items():
            style = {"cascade k": "o-", "cascade mass": "s", "race": "D", "fixed": "k^", "exhaustive": "*"}.get(
                label.split(",")[0], "v")
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        for r in mine:
            if r["strategy"].endswith("(default)"):
                ax.plot(r["passes_per_image"], r["agreement"], "r*", markersize=13, label="cascade default")
        ax.set_xscale("log")
        ax.set_xlabel("UNet passes per image (head passes included)")
        ax.set_ylabel("agreement with the exhaustive decision")
        ax.set_title(f"{data}, {mine[0]['images']} images")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # below: no point hidden
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def setting_name(scored: dict) -> str:
    """A score_settings entry's name."""
    return config_name(CascadeConfig(**scored["config"]), scored["head"], RaceConfig(**scored["race"]))


def settings_line(scored: list[dict]) -> str:
    return ", ".join(f"{setting_name(c)} {100 * c['agreement']:.1f} % at "
                     f"{c['passes_per_image']:.1f}" for c in sorted(scored, key=lambda c: c["passes_per_image"]))


def render(result: dict, info: dict) -> list[str]:
    rows = result["rows"]
    table = ["| data | strategy | run | images | agreement | accuracy | passes/image | images/s |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    table += [f"| {r['data']} | {r['strategy']} | {r['how']} | {r['images']} | {100 * r['agreement']:.2f} % | "
              f"{100 * r['accuracy']:.2f} % | {r['passes_per_image']:.1f} | "
              f"{'' if r['images_per_s'] is None else format(r['images_per_s'], '.2f')} |" for r in rows]
    if "cost" in result.get("fonts", {}):
        cost = result["fonts"]["cost"]
        names = [n for n in cost[0] if n not in ("classes", "images")]
        table += ["", "| classes | images | " + " | ".join(f"{n} passes (agreement)" for n in names) + " |",
                  "|---:|---:|" + "---:|" * len(names)]
        table += [f"| {c['classes']} | {c['images']} | " + " | ".join(
            f"{c[n]['passes_per_image']:.1f} ({100 * c[n]['agreement']:.1f} %)" for n in names) + " |" for c in cost]
    if "digits" in result:
        dg = result["digits"]
        table += ["", f"Digits' default, chosen on the validation slice ({dg['validation_images']} training digits, "
                  f"never held-out), the cheapest setting with >= {100 * TARGET:g} % agreement: "
                  f"{settings_line(dg['validation'])}"
                  f" -> **{setting_name(dg['default'])}**."]
        tuned = dg["race_stage_tuned"]
        pick, held = tuned["validation"], tuned["held_out"]
        table.append(f"Tuning the race stage too ({tuned['settings']} settings: rounds of 1-5, z 1-1.5, "
                     "min_rounds 1-2) "
                     f"would pick {setting_name(pick)}: "
                     f"{100 * pick['agreement']:.1f} % at {pick['passes_per_image']:.1f} passes on validation, "
                     f"{100 * held['agreement']:.2f} % at {held['passes_per_image']:.1f} on the held-out digits "
                     "(not shipped).")
    if "fonts" in result and "validation" in result["fonts"]:
        ft = result["fonts"]
        race = ft["validation_race"]
        budget = race["passes_per_image"] / FONT_SHARE
        table.append(f"Glyph model's own setting, chosen on {ft['validation_images']} glyphs of the validation "
                     f"typefaces (race: {100 * race['agreement']:.1f} % at {race['passes_per_image']:.1f}), "
                     f"the cheapest within 0.5 points of the race at <= 1/{FONT_SHARE} of its passes, else the best "
                     "agreement there (both heads shortlisting; the settings at that cost): "
                     f"{settings_line([c for c in ft['validation'] if c['passes_per_image'] <= budget])} -> "
                     f"**{setting_name(ft['default'])}**.")
    for name in ("digits", "fonts"):
        if name in result:
            c = result[name]["engine_equals_replay"]
            table.append(f"Engine cascade = replay ({name}): {c['same_decisions']}/{c['images']} decisions, "
                         f"{c['same_passes']}/{c['images']} pass counts.")
    table += ["", f"Machine: {machine_line(info)} (shared with other jobs: images/s are ratios within this run)."]
    if "digits_run" in result:
        run = result["digits_run"]
        table.append(f"Digits rows: run of {run['date']} on {machine_line(run['machine'])}; glyph rows: run of "
                     f"{result.get('date', 'this run')}.")
    return table


def update_docs(table: list[str]) -> None:
    """docs/cascade.md's text between <!-- bench:cascade --> and <!-- /bench:cascade -->."""
    path = Path(__file__).resolve().parents[1] / "docs" / "cascade.md"
    head, rest = path.read_text().split("<!-- bench:cascade -->")
    _, tail = rest.split("<!-- /bench:cascade -->")
    path.write_text(head + "<!-- bench:cascade -->\n" + "\n".join(table) + "\n<!-- /bench:cascade -->" + tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--digits", type=int, default=450, help="held-out digits scored exhaustively (of 450)")
    ap.add_argument("--validation", type=int, default=135, help="validation digits the default is chosen on (of 135)")
    ap.add_argument("--fonts", type=int, default=228, help="held-out glyphs scored exhaustively (62 x 100 passes each)")
    ap.add_argument("--fonts-validation", type=int, default=434,
                    help="validation-typeface glyphs scored exhaustively (of 434)")
    ap.add_argument("--timed", type=int, default=30, help="digits run on the engine, timed")
    ap.add_argument("--timed-fonts", type=int, default=6,
                    help="glyphs run on the engine, timed (the race: ~420 passes each)")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes computing missing exhaustive rows (one thread each)")
    ap.add_argument("--skip-fonts", action="store_true", help="the digits only")
    ap.add_argument("--skip-digits", action="store_true", help="the glyphs only; the digits' rows and default come "
                    "from the last bench/results/cascade.json")
    ap.add_argument("--render", action="store_true", help="only re-render docs/cascade.md's table and the plot "
                    "from the JSON")
    args = ap.parse_args()
    if args.render:
        saved = json.loads((RESULTS / "cascade.json").read_text())
        update_docs(render(saved, saved["machine"]))
        plot(saved["rows"], RESULTS / "cascade.png")
        return
    if args.skip_digits:
        result = json.loads((RESULTS / "cascade.json").read_text())
        result["digits_run"] = {"date": result.pop("date"), "machine": result.pop("machine")}
        result.pop("benchmark")
        result["rows"] = [r for r in result["rows"] if r["data"].startswith("digits")]
    else:
        rows, info = digits(args)
        result = {"rows": rows, "digits": info, "grid": GRID, "race": DEMO_RACE,
                  "head": {"kind": "linear", "blocks": HEAD_BLOCKS, "steps": HEAD_STEPS}}
    if not args.skip_fonts:
        font_rows, font_info = fonts(args)
        result["rows"] += font_rows
        result["fonts"] = font_info
    png = RESULTS / "cascade.png"
    RESULTS.mkdir(exist_ok=True)
    plot(result["rows"], png)
    result["plot"] = png.name
    update_docs(render(result, machine()))
    publish("cascade", result, render(result, machine()), readme=False)


if __name__ == "__main__":
    main()
