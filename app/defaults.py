"""An engine's scoring defaults from the command line: set at `export`, shown and changed by `diffscore defaults`,
and the UNet passes per image they cost, which `classify` says before a long run.

Every engine starts with the race in spread order (kernels.racing's RaceConfig and DEFAULT_STRATEGY), so an
exported model is fast before anyone tunes it; `diffscore profile` then records a visiting order.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from diffscore.engine.manifest import Manifest, ScoringDefaults
from diffscore.engine.classify_options import RACE_FIELDS
from diffscore.engine.options import check_template
from diffscore.errors import EngineError, UsageMistake
from diffscore.kernels import LOSSES, STRATEGIES, RaceConfig, dsd_preset
from diffscore.kernels.racing import DEFAULT_GRID
from diffscore.kernels.timesteps import stage_timesteps



def scoring_changes(*, template=None, strategy=None, stages=None, loss=None, timesteps=None, **race) -> dict:
    """The ScoringDefaults fields the caller gave (None = not given), checked before anything is written.
    `race` holds RACE_FIELDS; `stages` is a list of (n_samples, keep); `timesteps`: DSD timesteps per pair."""
    changes = {k: v for k, v in dict(template=template, strategy=strategy, loss=loss, dsd_steps=timesteps).items()
               if v is not None}
    if template is not None:
        try:
            check_template(template)
        except EngineError as e:
            raise UsageMistake(f"--template: {e}") from None
    if strategy is not None and strategy not in STRATEGIES:
        raise UsageMistake(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if loss is not None and loss not in LOSSES:
        raise UsageMistake(f"loss {loss!r} is not one of {', '.join(LOSSES)}")
    if stages is not None:
        try:
            stage_timesteps(stages)
        except ValueError as e:
            raise UsageMistake(f"--stages {stages}: {e}") from None
        changes["stages"] = [list(s) for s in stages]
    given = {k: v for k, v in race.items() if k in RACE_FIELDS and v is not None}
    if set(race) - set(RACE_FIELDS):
        raise UsageMistake(f"unknown race settings {sorted(set(race) - set(RACE_FIELDS))}; known: {RACE_FIELDS}")
    if given:
        try:
            RaceConfig(**given)
        except (TypeError, ValueError) as e:
            raise UsageMistake(f"race settings {given}: {e}") from None
        changes["race"] = given
    return changes


def apply(defaults: ScoringDefaults, changes: dict) -> ScoringDefaults:
    """`defaults` with `changes` (scoring_changes' output); race settings merge field by field."""
    race = dataclasses.replace(defaults.race, **changes.get("race", {}))
    return dataclasses.replace(defaults, **{**changes, "race": race})


def change_defaults(engine_dir: Path, changes: dict, reset: bool = False) -> ScoringDefaults:
    """Write the engine's new scoring defaults: under the engine's writer lock, manifest replaced atomically.
    `reset` starts from what a fresh export records (its DSD preset kept: it goes with the exported layers)."""
    from diffscore.export.atomic import exclusive

    engine_dir = Path(engine_dir)
    with exclusive(engine_dir, "writing"):
        manifest = Manifest.load(engine_dir)
        preset = manifest.defaults.dsd_preset
        base = ScoringDefaults(dsd_preset=preset, dsd_steps=dsd_preset(preset).steps) if reset else manifest.defaults
        manifest.defaults = apply(base, changes)
        manifest.save(engine_dir)
    return manifest.defaults


def describe(defaults: ScoringDefaults, profile: list[int] | None) -> list[str]:
    """Lines for `diffscore defaults`: each setting, and which of them the default strategy uses."""
    race = defaults.race
    order = f"profiled order of {len(profile)} timesteps" if profile else f"spread order over {DEFAULT_GRID} timesteps"
    return [
        f"strategy  {defaults.strategy}" + (f" ({order})" if defaults.strategy == "race" else ""),
        f"template  {defaults.template!r}",
        f"loss      {defaults.loss}",
        f"race      z {race.z:g}, min rounds {race.min_rounds}, round size {race.round_size}, "
        f"budget {race.budget or 'none'}",
        f"stages    {','.join(f'{n}:{k}' for n, k in defaults.stages)}",
        f"timesteps {defaults.dsd_steps} (DSD matching, per pair); DSD preset {defaults.dsd_preset}",
    ]


def expected_passes(strategy: str, candidates: int, *, stages=None, race: RaceConfig | None = None,
                    grid: int | None = None) -> tuple[int, int]:
    """(fewest, most) UNet passes one image costs: equal for fixed stages; the race stops between the end of
    its first eligible round with one survivor and the whole grid (or its budget)."""
    if strategy == "stages":
        alive, total = candidates, 0
        for new, (_, keep) in zip(stage_timesteps(stages), stages):
            total += alive * len(new)
            alive = min(alive, keep)
        return total, total
    race = race or RaceConfig()
    most = candidates * (grid or DEFAULT_GRID)
    if race.budget is not None:
        most = min(most, race.budget)
    return min(candidates * race.round_size * race.min_rounds, most), most


def passes_line(strategy: str, candidates: int, images: int, samples_per_s: float | None = None, **plan) -> str:
    """One stderr line before a run: UNet passes per image (and a time estimate where a UNet rate is known)."""
    low, high = expected_passes(strategy, candidates, **plan)
    per_image = f"{low:,}" if low == high else f"{low:,} to {high:,}"
    note = "" if low == high else " (the race stops when one label is left)"
    line = f"{strategy}: {per_image} UNet passes per image{note}, {images:,} image{'s' * (images != 1)}"
    if samples_per_s:
        first, last = low * images / samples_per_s, high * images / samples_per_s
        line += f"; about {duration(first)}" + ("" if low == high else f" to {duration(last)}") + " here"
    return line


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"




LONG_RUN = 2_000  # UNet passes (all images, at most) from which `classify` says what the run will cost


def classify_plan(engine, options, images: int) -> str | None:
    """The line `classify` prints on stderr before a long Diffusion Classifier run: passes per image of the call's
    resolved DcOptions (engine.classify_options), and the time they take at the UNet rate `auto` measured here,
    where it did. None for a short run."""
    from diffscore.engine.autoselect import cached_choice, label

    strategy, labels = options.strategy, options.labels
    profile = engine.manifest.timestep_profile
    plan = dict(stages=list(options.stages)) if strategy == "stages" else \
        dict(race=options.race, grid=len(profile) if profile else None)
    if expected_passes(strategy, len(labels), **plan)[1] * images < LONG_RUN:
        return None
    choice = cached_choice(engine.manifest, engine.precision) or {}
    rate = choice.get("samples_per_s", {}).get(label(engine.backend, engine.workers))
    return passes_line(strategy, len(labels), images, rate, **plan)
