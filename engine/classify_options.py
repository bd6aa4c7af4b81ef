"""What a `classify` call is asked, as one frozen record per method (faster-whisper's TranscriptionOptions is the
model): `DcOptions`, `HeadOptions`, `DiffDisOptions`.

- `pack(method, options, overrides)`: flat keywords (`Engine.classify(..., z=2)`) into the method's record; an
  option that belongs to another method is one line, not silently dropped.
- `record.resolve(engine)`: every unset field (None) from the engine's manifest defaults, every value checked,
  once, before any image is read. The result carries the resolved record (`Classification.options`), whose
  `to_dict` is the JSON results have always had.

The CLI (app/cli/), Ray batch (app/scale.py) and Serve (app/serve.py) build these same records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Union

from diffscore.engine.options import check_count, check_labels, check_seed, check_templates
from diffscore.errors import EngineError, UsageMistake
from diffscore.kernels import LOSSES, RaceConfig, new_run
from diffscore.kernels.cascade import CascadeConfig, cascade_config

RACE_FIELDS = tuple(f.name for f in dataclasses.fields(RaceConfig))  # z, min_rounds, round_size, budget


def _legacy(method: str, labels, templates=(), stages=(), loss="", seed=0, strategy="", race=None, head="",
            backend="", precision="") -> dict:
    """The JSON layout every result's options have had (keys and order), whatever the method."""
    return {"method": method, "labels": list(labels), "templates": list(templates),
            "stages": [list(s) for s in stages], "loss": loss, "seed": seed, "strategy": strategy, "race": race,
            "head": head, "backend": backend, "precision": precision}


def _tuple(value):
    """A list becomes a tuple (records are hashable: Serve batches requests with equal options); anything else
    stays as given, for resolve to refuse in its own words."""
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class DcOptions:
    """method "dc": the zero-shot Diffusion Classifier (DESIGN §3) by fixed stages, the race or the cascade.
    None: the engine's default (resolve fills it)."""

    method: ClassVar[str] = "dc"
    resolved: ClassVar[tuple[str, ...]] = ("backend", "precision")  # set by resolve, not by a caller
    labels: tuple[str, ...] | None = None  # the class names to choose among
    templates: tuple[str, ...] | None = None  # one candidate per (label, template); a class scores as its best one
    stages: tuple[tuple[int, int], ...] | None = None  # (n_samples, keep) per pruning stage
    loss: str | None = None  # l2 | l1 | huber
    seed: int = 0  # of the shared noise: same seed, same scores
    strategy: str | None = None  # stages | race | cascade; None: stages when stages are given, else the engine's
    z: float | None = None  # the race (kernels.racing.RaceConfig), field by field: call > engine > RaceConfig
    min_rounds: int | None = None
    round_size: int | None = None
    budget: int | None = None
    timesteps: int | None = None  # the race's grid size; None: the engine's profile, else DEFAULT_GRID
    use_profile: bool = True  # visit the grid in the engine's profiled order (resolved: whether one was used)
    shortlist: str | None = None  # cascade: who shortlists, head | diffdis (kernels.cascade.CascadeConfig)
    k: int | None = None  # cascade: shortlist size
    mass: float | None = None  # cascade: per image the fewest best classes whose probability reaches it
    head: str | None = None  # cascade with a head: its name (resolved: the head used)
    diffdis_mode: str | None = None  # cascade with DiffDis: its mode (resolved: the mode used)
    backend: str = ""  # where it ran (set by resolve)
    precision: str = ""

    @property
    def race(self) -> RaceConfig:
        return RaceConfig(**{f: getattr(self, f) for f in RACE_FIELDS})

    @property
    def cascade(self) -> CascadeConfig | None:
        return cascade_config(self.strategy, self.shortlist, self.k, self.mass)

    def runs(self, engine):
        """n_candidates -> a new per-image driver (StagedPruning or PairedRace) of these resolved options."""
        profile = engine.manifest.timestep_profile if self.use_profile else None
        strategy = "race" if self.strategy == "cascade" else self.strategy
        return lambda n: new_run(strategy, n, len(engine.alphas_cumprod), stages=self.stages, race=self.race,
                                 grid_size=self.timesteps, profile=profile)

    def resolve(self, engine) -> "DcOptions":
        d = engine.defaults
        if self.labels is None:
            raise EngineError("the Diffusion Classifier needs labels: the class names to choose from")
        labels = tuple(check_labels(self.labels))
        templates = tuple(check_templates(None, self.templates, d.template))
        loss = self.loss or d.loss
        seed = check_seed(self.seed)
        if loss not in LOSSES:
            raise EngineError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
        # [] is refused by the stages check below, not replaced by the default
        strategy = self.strategy or ("stages" if self.stages is not None else d.strategy)
        given = {f: getattr(self, f) for f in RACE_FIELDS if getattr(self, f) is not None}
        try:
            stages = tuple(tuple(s) for s in (d.stages if self.stages is None else self.stages))
            race = RaceConfig(**{**dataclasses.asdict(d.race), **given})  # call > engine default > RaceConfig
            out = dataclasses.replace(self, labels=labels, templates=templates, stages=stages, loss=loss, seed=seed,
                                      strategy=strategy, **dataclasses.asdict(race),
                                      use_profile=self.use_profile and engine.manifest.timestep_profile is not None,
                                      backend=engine.backend, precision=engine.precision)
            out.runs(engine)(len(labels) * len(templates))  # bad options fail here, before any image is read
            cascade = out.cascade
        except (ValueError, TypeError) as e:
            raise EngineError(str(e)) from None
        if cascade is None:
            return out
        if cascade.by == "head":
            return dataclasses.replace(out, shortlist="head", head=engine.head_name(self.head))
        from diffscore.engine.scorers.diffdis import check_mode, diffdis_spec

        return dataclasses.replace(out, shortlist="diffdis",
                                   diffdis_mode=check_mode(self.diffdis_mode or diffdis_spec(engine).mode))

    def to_dict(self) -> dict:
        race = None
        if self.strategy != "stages":
            race = {**dataclasses.asdict(self.race), "timesteps": self.timesteps, "profile": self.use_profile}
            if (cascade := self.cascade) is not None:
                by = f"head {self.head}" if cascade.by == "head" else f"diffdis-{self.diffdis_mode}"
                race["cascade"] = {"k": cascade.k, "mass": cascade.mass, "by": by}
        return _legacy("dc", self.labels, self.templates, self.stages if self.strategy == "stages" else (), self.loss,
                       self.seed, self.strategy, race, backend=self.backend, precision=self.precision)


@dataclass(frozen=True)
class HeadOptions:
    """method "head": a trained head, one UNet pass per noise step (its steps and noise are its own)."""

    method: ClassVar[str] = "head"
    resolved: ClassVar[tuple[str, ...]] = ("seed", "backend", "precision")  # set by resolve, not by a caller
    labels: tuple[str, ...] | None = None  # None: the head's; else the head's own set (any order)
    head: str | None = None  # the head's name, needed when the engine has several (resolved: the head used)
    seed: int = 0  # resolved: the head's own noise seed (spec.seed)
    backend: str = ""
    precision: str = ""

    def resolve(self, engine) -> "HeadOptions":
        name = engine.head_name(self.head)
        classes = engine.manifest.heads[name].labels
        if self.labels is not None and set(check_labels(self.labels)) != set(classes):
            raise EngineError(f"head {name} was trained on the labels {classes}, not {list(self.labels)}; leave labels "
                              "out to use its own")
        return HeadOptions(tuple(classes), name, engine.manifest.heads[name].seed, engine.backend, "fp32")

    def to_dict(self) -> dict:
        return _legacy("head", self.labels, seed=self.seed, head=self.head, backend=self.backend,
                       precision=self.precision)


@dataclass(frozen=True)
class DiffDisOptions:
    """method "diffdis": the engine's DiffDis (`export --diffdis`), one image pass for every label."""

    method: ClassVar[str] = "diffdis"
    resolved: ClassVar[tuple[str, ...]] = ("backend", "precision")
    labels: tuple[str, ...] | None = None
    template: str | None = None  # one prompt template with one {}; None: the engine's
    diffdis_mode: str | None = None  # denoise | generate; None: the engine's
    timesteps: int | None = None  # denoise: shared (t, ε) per label; None: the engine's
    seed: int = 0
    backend: str = ""
    precision: str = ""

    def resolve(self, engine) -> "DiffDisOptions":
        from diffscore.engine.scorers.diffdis import check_mode, diffdis_spec

        if self.labels is None:
            raise EngineError("DiffDis needs labels: the class names to choose from")
        labels = tuple(check_labels(self.labels))
        template = check_templates(self.template, None, engine.defaults.template)[0]
        seed = check_seed(self.seed)
        spec = diffdis_spec(engine)
        mode = check_mode(self.diffdis_mode or spec.mode)
        timesteps = check_count("timesteps", self.timesteps, optional=True) or spec.timesteps
        return DiffDisOptions(labels, template, mode, timesteps, seed, engine.backend, "fp32")

    def to_dict(self) -> dict:
        return _legacy(f"diffdis-{self.diffdis_mode}", self.labels, (self.template,), seed=self.seed,
                       backend=self.backend, precision=self.precision)


ClassifyOptions = Union[DcOptions, HeadOptions, DiffDisOptions]  # what `classify` takes and its results carry
METHODS: dict[str, type] = {cls.method: cls for cls in (DcOptions, HeadOptions, DiffDisOptions)}
# A flat keyword at its default means "not given": the CLI passes seed=0 to every method.
_UNSET = {f.name: f.default for cls in METHODS.values() for f in dataclasses.fields(cls)}


def pack(method: str | None, options: ClassifyOptions | None = None, overrides: dict | None = None):
    """The record of a `classify` call: `options` (or the method's empty record) with the flat keywords
    `overrides` on top (`template` is one of `templates`). Not yet resolved."""
    overrides = {k: _tuple(v) for k, v in (overrides or {}).items()}
    if options is not None:
        if method is not None and method != options.method:
            raise UsageMistake(f"method {method!r} and options for method {options.method!r} were both given; "
                               "give one")
        method = options.method
    method = method or "dc"
    if method not in METHODS:
        raise EngineError(f"unknown method {method!r}; choose dc (Diffusion Classifier), head (a trained head) "
                          "or diffdis")
    cls = METHODS[method]
    names = {f.name for f in dataclasses.fields(cls)} - set(cls.resolved)
    if method == "dc" and "template" in overrides:
        template = overrides.pop("template")
        if template is not None and overrides.get("templates") is None:
            overrides["templates"] = (template,)
    if unknown := sorted(set(overrides) - set(_UNSET) - {"template"}):
        raise UsageMistake(f"unknown classify option {unknown[0]!r}; the options are {', '.join(sorted(_UNSET))}")
    foreign = [k for k, v in overrides.items() if k not in names and v is not None and v != _UNSET.get(k)]
    if foreign:
        raise UsageMistake(f"{foreign[0]} is not an option of method {method}; it takes {', '.join(sorted(names))}")
    given = {k: v for k, v in overrides.items() if k in names}
    return dataclasses.replace(options, **given) if options is not None else cls(**given)
