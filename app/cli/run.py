"""Runtime commands (no torch): classify, match, info, demo, defaults."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from diffscore.app.cli.options import (Backend, BackendOpt, BatchOpt, BudgetOpt, DefaultBudgetOpt, DefaultLossOpt,
                                       DefaultStagesOpt, DefaultStrategyOpt, DefaultTemplateOpt, DefaultTimestepsOpt,
                                       DefaultZOpt, DiffDisMode, DiffDisModeOpt, FormatOpt, ImagesArg, InfoFormat,
                                       LabelsFileOpt, LabelsOpt, LimitOpt, Loss, MatchMethod, Method, MinRoundsOpt,
                                       OutputOpt, Precision, PrecisionOpt, RoundSizeOpt, SeedOpt, Shortlister,
                                       Strategy, StrategyOpt, TextOpt, TextsFileOpt, ZOpt, app, cascade_options,
                                       finish, flag_defaults, image_paths, open_engine, parse_stages, plan_line,
                                       race_options, read_labels, read_texts, require_torch)
from diffscore.app.render import Format, emit, say
from diffscore.app.runs import ReadableImages, check_output
from diffscore.engine.classify_options import pack
from diffscore.errors import EngineError, UsageMistake


@app.command()
def classify(
    engine: Path = typer.Argument(..., help="engine directory made by `diffscore export`"),
    images: List[str] = ImagesArg,
    labels: Optional[str] = LabelsOpt, labels_file: Optional[Path] = LabelsFileOpt,
    method: Method = typer.Option(Method.dc.value, help="dc: zero-shot Diffusion Classifier | head: a trained head, "
                                  "one UNet pass per noise step (labels are the head's) | diffdis: the engine's "
                                  "DiffDis "
                                  "(`export --diffdis`), one image pass"),
    head: Optional[str] = typer.Option(None, help="the head's name (--method head), when the engine has several"),
    template: Optional[str] = typer.Option(None, help="prompt template with one {}, e.g. 'a photo of a {}' (default: "
                                                      "the engine's)"),
    stages: Optional[str] = typer.Option(None, help="pruning stages n_samples:keep, e.g. 50:5,500:1 (default: the "
                                                    "engine's)"),
    loss: Optional[Loss] = typer.Option(None, help="denoising error (default: the engine's)"),
    seed: int = SeedOpt, batch_size: Optional[int] = BatchOpt,
    backend: Backend = BackendOpt, precision: Precision = PrecisionOpt,
    fmt: Format = FormatOpt, output: Optional[Path] = OutputOpt,
    strategy: Optional[Strategy] = StrategyOpt, z: Optional[float] = ZOpt, budget: Optional[int] = BudgetOpt,
    diffdis_mode: Optional[DiffDisMode] = DiffDisModeOpt,
    timesteps: Optional[int] = typer.Option(None, min=1, help="diffdis denoise: shared (t, ε) per label (default: "
                                            "the engine's)"),
    limit: Optional[int] = LimitOpt,
    shortlist: Optional[Shortlister] = typer.Option(None, help="cascade: who shortlists, the engine's head (--head) "
                                                    "or its DiffDis (default: head)"),
    k: Optional[int] = typer.Option(None, "--k", min=1, help="cascade: classes the race decides among, at most "
                                    "(default 3)"),
    mass: Optional[float] = typer.Option(None, "--mass", min=0.0, max=1.0, help="cascade: per image, the fewest best "
                                         "classes whose shortlister probability sums to MASS, at most --k (default "
                                         "0.99999 with a head; 1: always --k; DiffDis: always --k)"),
):
    """Classify images: the zero-shot Diffusion Classifier (default), a trained head (--method head) or
    DiffDis (--method diffdis). --strategy cascade: a head or DiffDis shortlists --k classes, the race decides.

    confidence: the winner's lead over the best other class in standard errors of their paired errors (a head:
    its logit lead over the runner-up, log(p1/p2))."""
    check_output(output)
    label_list = read_labels(labels, labels_file, required=method is not Method.head)  # a head has its own labels
    paths = image_paths(images)[:limit]
    stage_list = parse_stages(stages)
    if method is not Method.diffdis and (diffdis_mode or timesteps):
        raise UsageMistake("--diffdis-mode and --timesteps go with --method diffdis")
    if head is not None and method is not Method.head:
        raise UsageMistake(f"--head {head} names a trained head; use it with --method head")
    record = pack(method.value, None, dict(
        template=template, stages=stage_list, loss=loss.value if loss else None, seed=seed, head=head,
        diffdis_mode=diffdis_mode.value if diffdis_mode else None, timesteps=timesteps,
        **race_options(strategy, z, budget), **cascade_options(shortlist, k, mass)))
    readable = ReadableImages(paths).start()  # an unreadable image becomes an error row; the others are scored
    with open_engine(engine, backend, precision) as eng:
        resolved = eng.classify_options(label_list, record)
        plan_line(eng, resolved, len(paths))
        results = eng.classify(readable, options=resolved, batch_size=batch_size, progress=True)
        title = (f"head {resolved.head} (higher probability = better)" if method is Method.head
                 else "DiffDis (higher score = better)" if method is Method.diffdis
                 else "Diffusion Classifier (lower mean error = better)")
    score = {Method.head: "probability", Method.diffdis: "score"}.get(method, "mean_error")
    rows = []
    for p, r in zip(readable.read_paths, results):
        row = {"image": str(p), "label": r.label, score: r.ranking[0][1],
               "runner_up": r.ranking[1][0] if len(r.ranking) > 1 else "", "passes": r.passes,
               **({} if r.confidence is None else {"confidence": r.confidence})}
        rows.append({**row, **r.to_dict()})
    table = [{k: v for k, v in row.items() if k not in ("ranking", "options")} for row in readable.rows(rows, "")]
    finish(readable.rows(rows), fmt, output, title, table)
    readable.check()


@app.command()
def match(
    engine: Path = typer.Argument(..., help="engine directory"),
    images: List[str] = ImagesArg,
    texts: Optional[List[str]] = TextOpt, texts_file: Optional[Path] = TextsFileOpt,
    timesteps: Optional[int] = typer.Option(None, min=1, help="timesteps per pair (DSD), shared (t, ε) per text "
                                            "(diffdis denoise) (default: the engine's)"),
    bias_weight: Optional[float] = typer.Option(None, help="λ of the denoising bias (default: the engine's DSD "
                                                           "preset's: "
                                                "discffusion 1, diffscore 0)"),
    seed: int = SeedOpt, batch_size: Optional[int] = BatchOpt,
    backend: Backend = BackendOpt, precision: Precision = PrecisionOpt,
    fmt: Format = FormatOpt, output: Optional[Path] = OutputOpt,
    method: MatchMethod = typer.Option(MatchMethod.dsd.value, "--method", help="dsd: DSD attention scores | diffdis: "
                                       "the engine's DiffDis (`export --diffdis`), one image pass for all texts | itc: "
                                       "cosine similarity of a `diffscore finetune` run's embeddings (one UNet pass "
                                       "per image)"),
    diffdis_mode: Optional[DiffDisMode] = DiffDisModeOpt,
    limit: Optional[int] = LimitOpt,
):
    """Image-text matching: an images x texts matrix of scores (higher = better match): DSD, DiffDis or ITC."""
    check_output(output)
    text_list = read_texts(texts, texts_file)
    paths = image_paths(images)[:limit]
    if method is not MatchMethod.diffdis and diffdis_mode:
        raise UsageMistake("--diffdis-mode goes with --method diffdis")
    if method is not MatchMethod.dsd and bias_weight is not None:
        raise UsageMistake(f"--bias-weight is DSD's; --method {method.value} has none")
    extra = {"diffdis_mode": diffdis_mode.value if diffdis_mode else None} if method is MatchMethod.diffdis else {}
    readable = ReadableImages(paths).start()  # an unreadable image becomes an error row; the others are scored
    with open_engine(engine, backend, precision) as eng:
        res = eng.match(readable, text_list, steps=timesteps, bias_weight=bias_weight, seed=seed,
                        batch_size=batch_size, progress=True, method=method.value, **extra)
    read, best = readable.read_paths, res.best()
    if fmt is Format.table:
        rows = [{"image": str(p), **{t: float(s) for t, s in zip(res.texts, row)}, "best": b}
                for p, row, b in zip(read, res.scores, best)]
    else:
        rows = [{"image": str(p), "best": b, "scores": dict(zip(res.texts, map(float, row))),
                 "options": res.options.to_dict()} for p, row, b in zip(read, res.scores, best)]
    title = {MatchMethod.dsd: "DSD", MatchMethod.diffdis: "DiffDis", MatchMethod.itc: "ITC"}[method]
    finish(readable.rows(rows), fmt, output, f"{title} scores (higher = better match)", readable.rows(rows, ""))
    readable.check()


@app.command()
def info(engine: Path = typer.Argument(..., help="engine directory"),
         verify: bool = typer.Option(False, "--verify", help="also check every file's sha256 (slow for big graphs)"),
         fmt: InfoFormat = typer.Option(Format.table.value, "--format", "-f", help="table (for people) or json")):
    """What an engine directory holds: graphs, precisions, plans, captured layers, heads, defaults."""
    import dataclasses

    from diffscore.engine.manifest import Manifest

    fmt = Format(fmt.value)
    m = Manifest.load(engine)
    bad = m.verify(engine) if verify else []
    if fmt is Format.json:
        record = dataclasses.asdict(m)
        record.pop("alphas_cumprod")
        record["verified"] = None if not verify else not bad
        sys.stdout.write(json.dumps(record, indent=1) + "\n")
    else:
        say((str(engine), "bold"), f" (format {m.format_version}, diffscore {m.diffscore_version})")
        say(f"source {m.source_path} sha256 {m.source_sha256[:12]}; "
            f"{'pixel space' if m.pixel_space else f'latent space (scaling {m.latent_scaling})'}; "
            f"image {m.image_size}px x{m.image_channels}; sample {m.sample_shape}; T={len(m.alphas_cumprod)}; "
            f"predicts {m.prediction_type}; DSD preset {m.defaults.dsd_preset}")
        rows = [{"graph": k, "file": g.file, "precision": g.precision, "MB": g.size / 1e6} for k, g in m.graphs.items()]
        rows += [{"graph": k, "file": p.file, "precision": p.precision, "MB": p.size / 1e6} for k, p in m.plans.items()]
        emit(rows)
        if m.conditioning == "sdxl":
            say(f"conditioning: sdxl (two tokenizers; UNet inputs "
                f"{', '.join(t.name for t in m.graphs['unet'].inputs)}; time ids {m.time_ids})")
        say(f"attention layers: {', '.join(m.attention_layers) or '-'}")
        say(f"feature blocks: {', '.join(m.feature_blocks) or '-'}; merged adapters: {', '.join(m.adapters) or '-'}")
        for name, a in m.adapters.items():
            if a.score_weights:
                say(f"{name} score weights: " + ", ".join(f"{k} {v:.3f}" for k, v in a.score_weights.items()))
        for name, h in m.heads.items():
            say(f"head {name}: {h.kind} on {', '.join(h.blocks)} at steps {h.steps}, "
                f"{len(h.labels)} labels ({', '.join(h.labels[:5])}{', …' if len(h.labels) > 5 else ''})"
                + (f"; DifFeed feedback {', '.join(':'.join(p) for p in h.feedback)}, 2 UNet passes per step"
                   if h.feedback else ""))
            if h.training is not None:
                say(f"  {h.training.describe()}")
        if m.itc is not None:
            where = (f"CLIP towers ({m.itc.image_size}x{m.itc.image_size} images, {m.itc.max_length} tokens)"
                     if m.itc.kind == "clip" else f"{', '.join(m.itc.blocks)} at step {m.itc.noise_step}")
            say(f"itc (match --method itc): {where}, {m.itc.dim}-d, trained with {'+'.join(m.itc.objectives)}")
        say(f"defaults: {json.dumps(dataclasses.asdict(m.defaults))}")
        if m.diffdis is not None:
            d = m.diffdis
            say(f"diffdis: on {', '.join(d.blocks)} at t = {d.image_step}; default mode {d.mode} ({d.timesteps} shared "
                f"(t, ε); generate: {d.generate_steps} DDIM steps)")
        if m.calibration is not None:
            c = m.calibration
            say(f"int8: {c.method} on {c.samples} samples from {c.source}; {len(c.float_layers)} layers float"
                + (f"; gate {c.gate['agreement']:.2%} on {c.gate['images']} images" if c.gate else ""))
        from diffscore.engine.autoselect import auto_lines

        for line in auto_lines(m):
            say(line)
    if bad:
        raise EngineError(f"sha256 mismatch in {', '.join(bad)}: the engine directory is damaged; re-export it")
    if verify and fmt is Format.table:
        say(("all sha256 match", "green"))


@app.command()
def demo(
    limit: Optional[int] = typer.Option(None, min=1, help="classify only the first N held-out images"),
    backend: Backend = BackendOpt, precision: Precision = PrecisionOpt,
    stages: Optional[str] = typer.Option(None, help="override the demo's stages, e.g. 10:3,40:1"),
    strategy: Optional[Strategy] = StrategyOpt, z: Optional[float] = ZOpt, budget: Optional[int] = BudgetOpt,
):
    """The main job: zero-shot classification of held-out handwritten digits on the demo model."""
    require_torch("demo")  # the first run exports the demo model; the digits come from scikit-learn (same extra)
    import diffscore
    from diffscore.app.demo import demo_engine_dir, logistic_baseline, run_demo
    from diffscore.app.digits import load_digits_split

    stage_list = parse_stages(stages)
    engine_dir = demo_engine_dir(precisions=("fp32", precision.value) if precision is Precision.fp16 else ("fp32",))
    with diffscore.load(engine_dir, backend=backend.value, precision=precision.value) as eng:
        res = run_demo(eng, limit=limit, stages=stage_list, **race_options(strategy, z, budget))
        where = f"{eng.backend}, {precision.value}"
    baseline = logistic_baseline(load_digits_split())
    rows = [
        {"method": f"Diffusion Classifier, zero-shot ({where})", "accuracy": f"{res['accuracy']:.2%}",
         "UNet passes/image": res["passes_per_image"], "images/s": res["images_per_s"]},
        {"method": "logistic regression on pixels (trained)", "accuracy": f"{baseline:.2%}", "UNet passes/image": 0.0,
         "images/s": float("nan")},
    ]
    emit(rows, Format.table, f"held-out digits: {res['images']} images, wall {res['seconds']:.1f} s")


@app.command("defaults")
def defaults_command(
    engine: Path = typer.Argument(..., help="engine directory"),
    template: Optional[str] = DefaultTemplateOpt, strategy: Optional[Strategy] = DefaultStrategyOpt,
    stages: Optional[str] = DefaultStagesOpt, loss: Optional[Loss] = DefaultLossOpt,
    z: Optional[float] = DefaultZOpt, min_rounds: Optional[int] = MinRoundsOpt,
    round_size: Optional[int] = RoundSizeOpt, budget: Optional[int] = DefaultBudgetOpt,
    timesteps: Optional[int] = DefaultTimestepsOpt,
    reset: bool = typer.Option(False, "--reset", help="first go back to what a fresh export records"),
):
    """Show an engine's scoring defaults (what classify and match use when not told), or change them:
    the manifest is rewritten atomically, under the engine's writer lock."""
    from diffscore.app.defaults import change_defaults, describe
    from diffscore.engine.manifest import Manifest

    changes = flag_defaults(template, strategy, stages, loss, timesteps, z=z, min_rounds=min_rounds,
                            round_size=round_size, budget=budget)
    defaults = change_defaults(engine, changes, reset) if changes or reset else Manifest.load(engine).defaults
    if changes or reset:
        say(("changed ", "green"), f"the scoring defaults of {engine}: {', '.join(changes) or 'reset'}")
    for line in describe(defaults, Manifest.load(engine).timestep_profile):
        say(line)
