"""Training commands (the torch extra): train-head, train-prompts, train-diffdis, finetune."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from diffscore.app.cli.options import (Backend, BackendOpt, DiffDisMode, DsdPresetChoice, HeadKind, LabelsFileOpt,
                                       LabelsOpt, ModelArg, PairsOpt, Sampler, Strategy, StrategyOpt, app, one_step,
                                       parse_steps, read_labels, require_torch, split)
from diffscore.app.render import say
from diffscore.app.threads import ThreadsOpt, set_threads
from diffscore.engine.options import MAX_SEED
from diffscore.errors import EngineError, UsageMistake
from diffscore.kernels.dsd import DEFAULT_DSD_PRESET


@app.command("train-head")
def train_head_command(
    model: Path = ModelArg,
    data: Optional[Path] = typer.Option(None, "--data", help="labelled image folder: one subfolder per class (folder "
                                                             "name = label)"),
    demo: bool = typer.Option(False, "--demo", help="the demo digits' training split (1,347 images) instead of --data"),
    kind: HeadKind = typer.Option(HeadKind.difformer.value, "--kind", help="the head's architecture"),
    blocks: str = typer.Option("down_blocks.1,mid_block", help="UNet blocks to read (diffusers module names), comma "
                                                               "separated"),
    noise_steps: str = typer.Option("50,200", "--noise-steps", help="noise steps, comma separated: one UNet pass each "
                                                                    "per image"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="head folder to write (default: head-<kind>); its name "
                                                               "names the head in an engine"),
    prompt: str = typer.Option("", help="conditioning of the feature passes (default: the empty prompt)"),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="seed of the fixed noise, the initialisation, the validation "
                                                          "split and shuffling"),
    epochs: int = typer.Option(100, min=1, help="at most; training stops early on a 10% validation split"),
    overwrite: bool = typer.Option(False, help="replace an existing head folder"),
    synthesize: Optional[int] = typer.Option(None, "--synthesize", min=1, help="no images needed: generate N images "
                                                                               "per "
                                             "label with the model itself and train on them (needs --labels)"),
    pseudo_label: Optional[Path] = typer.Option(None, "--pseudo-label", help="no labels needed: this engine's "
                                                                             "Diffusion "
                                                "Classifier labels the --data images (a folder of unlabelled images)"),
    labels: Optional[str] = LabelsOpt, labels_file: Optional[Path] = LabelsFileOpt,
    template: Optional[str] = typer.Option(None, help="--synthesize: the prompt per label, one {} (default {}); "
                                           "--pseudo-label: the DC's template (default: the engine's)"),
    sampler: Sampler = typer.Option("dpm-solver", help="--synthesize: the diffusers sampler (DPM-Solver++ or DDIM)"),
    sampling_steps: int = typer.Option(10, "--sampling-steps", min=1, help="--synthesize: denoising steps per image"),
    guidance: float = typer.Option(2.0, min=0.0, help="--synthesize: classifier-free guidance scale (≤ 1: none)"),
    save_samples: Optional[Path] = typer.Option(None, "--save-samples", help="--synthesize: also write the generated "
                                                "images to DIR/<label>/ (reuse them with --data DIR)"),
    min_confidence: Optional[float] = typer.Option(None, "--min-confidence", help="--pseudo-label: keep decisions at "
                                                   "least this many standard errors ahead of their best rival (default "
                                                   "1)"),
    strategy: Optional[Strategy] = StrategyOpt, backend: Backend = BackendOpt,
    feedback: bool = typer.Option(False, "--feedback", help="DifFeed: feed decoder outputs of a first UNet pass, "
                                                            "through "
                                  "small learned modules trained with the head, into the mirrored encoder blocks of a "
                                  "second pass whose features the head reads (2 UNet passes per noise step)"),
    feedback_pairs: Optional[str] = typer.Option(None, "--feedback-pairs", help="with --feedback: SOURCE:TARGET block "
                                                 "pairs, comma separated (default: every up_blocks.i into its mirrored "
                                                 "down block, where that reaches the head's blocks)"),
    threads: Optional[int] = ThreadsOpt,
):
    """Train a head on UNet block features (extracted once, cached); then `export --head-dir`.

    The training images come with labels (--data FOLDER/<label>/, --demo), from the model itself
    (--synthesize N --labels a,b,...), or labelled by an engine's Diffusion Classifier
    (--pseudo-label ENGINE --data FOLDER --labels a,b,...); the head records which. One UNet pass per
    noise step; with --feedback a DifFeed head (two passes per step, slower to train)."""
    out_dir = out_dir or Path(f"head-{kind.value}")
    if out_dir.exists() and not overwrite:
        raise EngineError(f"{out_dir} already exists; pass --overwrite to replace it")
    check_label_free_flags(data, demo, synthesize, pseudo_label, save_samples, min_confidence, strategy, template,
                           labels is not None or labels_file is not None)
    spec_blocks, steps = split(blocks) or [], parse_steps(noise_steps)
    classes = read_labels(labels, labels_file,
                          required=synthesize is not None or (pseudo_label is not None and not demo))
    if feedback_pairs is not None and not feedback:
        raise UsageMistake("--feedback-pairs needs --feedback")
    pairs = [[b.strip() for b in p.split(":")] for p in split(feedback_pairs) or []] if feedback else None
    require_torch("train-head")
    set_threads(threads)
    from diffscore.app.demo import cache_root
    from diffscore.app.label_free import training_set
    from diffscore.reference.features import FeatureSpec
    from diffscore.reference.head_training import TrainOptions, train_head_on_images
    from diffscore.reference.heads import save_head

    images, targets, classes, origin, comp = training_set(
        model, data, demo, classes, synthesize=synthesize, pseudo_label=pseudo_label, template=template,
        sampler=sampler.value, sampling_steps=sampling_steps, guidance=guidance, seed=seed, save_samples=save_samples,
        overwrite=overwrite, min_confidence=min_confidence, backend=backend.value,
        strategy=strategy.value if strategy else None)
    spec = FeatureSpec(blocks=spec_blocks, steps=steps, seed=seed, prompt=prompt)
    trained, config = train_head_on_images(model, images, targets, classes, kind.value, spec,
                                           TrainOptions(epochs=epochs, seed=seed), cache_root() / "features",
                                           progress=True,
                                           origin=origin, feedback=pairs, comp=comp)
    save_head(trained, config, out_dir)
    say(config.origin.describe())
    t = config.training
    val = (f"validation accuracy {t['val_accuracy']:.2%} on {t['val_images']} images" if t["val_images"]
           else "no validation split")
    fed = f" (DifFeed: {', '.join(':'.join(p) for p in config.feedback.pairs)} fed back)" if config.feedback else ""
    say(("wrote ", "green"), f"{out_dir}: {kind.value} head{fed} on {', '.join(spec.blocks)} at steps {spec.steps}, "
        f"{len(classes)} classes, {t['images']} training images, {val}, best epoch {t['best_epoch']} of {t['epochs']}")
    say(f"next: diffscore export {model} ENGINE_DIR --head-dir {out_dir}")


def check_label_free_flags(data, demo, synthesize, pseudo_label, save_samples, min_confidence, strategy, template,
                           labels_given: bool) -> None:
    """train-head's sources of training images, and the flags that belong to one of them, before any work."""
    if synthesize is not None and pseudo_label is not None:
        raise UsageMistake("--synthesize and --pseudo-label are two ways to train without labels; pick one")
    if synthesize is not None and (demo or data is not None):
        raise UsageMistake("--synthesize makes its own training images; drop --data/--demo")
    if synthesize is None and demo == (data is not None):
        raise UsageMistake("give exactly one of --data FOLDER, --demo, --synthesize N or --pseudo-label ENGINE --data "
                           "FOLDER")
    if save_samples is not None and synthesize is None:
        raise UsageMistake("--save-samples saves the images --synthesize makes; use it with --synthesize")
    if (min_confidence is not None or strategy is not None) and pseudo_label is None:
        raise UsageMistake("--min-confidence and --strategy choose the pseudo-labels; use them with --pseudo-label")
    if synthesize is None and pseudo_label is None and (template is not None or labels_given):
        raise UsageMistake("--labels and --template go with --synthesize or --pseudo-label; labelled folders name "
                          "their classes by subfolder")


@app.command("train-prompts")
def train_prompts(
    model: Path = ModelArg,
    data: Optional[Path] = PairsOpt,
    demo: bool = typer.Option(False, "--demo", help="the demo digits' training split instead of --data"),
    shots: int = typer.Option(..., "--shots", "-k", min=1, help="training pairs per class (a class = a distinct "
                                                                "caption)"),
    out_dir: Path = typer.Option(..., "--out", help="run directory: adapter.safetensors + training_log.json"),
    train_steps: int = typer.Option(200, "--train-steps", min=1, help="optimiser steps, one random timestep each"),
    lr: float = typer.Option(1e-4, min=0.0, help="AdamW learning rate (DESIGN's 1e-4; on the demo 3e-3 learns in ~300 "
                                                 "steps)"),
    batch_size: int = typer.Option(16, min=1, help="images per step"),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="seed of the shots, timesteps, noise and LoRA init"),
    score_weights: bool = typer.Option(False, "--score-weights", help="also learn how much each scored attention layer "
                                                                      "counts (the engine pools the layers with these "
                                                                      "weights)"),
    overwrite: bool = typer.Option(False, help="replace an existing run directory's adapter"),
    preset: DsdPresetChoice = typer.Option(DEFAULT_DSD_PRESET, help="DSD preset trained for: discffusion (the default: "
                                                                    "attention + bias, a new "
                                                   "t and ε per pair, gradients clipped at 1.0) | diffscore (attention "
                                                   "score)"),
    threads: Optional[int] = ThreadsOpt,
):
    """Few-shot prompt learning for DSD matching: a rank-4 LoRA on the attention projections (export with
    --adapters)."""
    if demo == (data is not None):
        raise UsageMistake("give exactly one of --data PAIRS.jsonl or --demo")
    require_torch("train-prompts")
    set_threads(threads)
    from diffscore.app.digits import demo_pairs
    from diffscore.reference.prompt_learning import PromptLearningConfig, read_pairs
    from diffscore.reference.prompt_learning import train_prompts as run_training

    pairs = demo_pairs() if demo else read_pairs(data)
    cfg = PromptLearningConfig(shots=shots, steps=train_steps, lr=lr, batch_size=batch_size, seed=seed,
                               score_weights=score_weights, preset=preset.value)
    run = run_training(model, pairs, out_dir, cfg, overwrite=overwrite)
    say(("wrote ", "green"), f"{out_dir} ({run['pairs']} pairs, {len(run['captions'])} captions, {train_steps} steps, "
        f"loss {run['loss'][0]:.4f} -> {run['final_loss_mean20']:.4f} (mean of last 20), {run['wall_time_s']:.0f} s)")


@app.command("train-diffdis")
def train_diffdis(
    model: Path = ModelArg,
    data: Optional[Path] = PairsOpt,
    demo: bool = typer.Option(False, "--demo", help="the demo digits' training split, captioned with 6 of the 8 "
                              "templates (2 held out for the zero-shot benchmark) instead of --data"),
    out_dir: Path = typer.Option(..., "--out", help="run directory: diffdis.safetensors + diffdis.json"),
    blocks: Optional[str] = typer.Option(None, help="UNet blocks the text stream reads (several scales), comma "
                                         "separated (default: down_blocks.1,mid_block,up_blocks.1; --unified: all)"),
    noise_steps: str = typer.Option("50", "--noise-steps", help="the image's fixed noise step (one)"),
    epochs: int = typer.Option(150, min=1, help="at most; training stops early on a 10% validation split of the "
                                                "images"),
    batch_size: int = typer.Option(128, min=1, help="pairs per optimiser step"),
    lr: float = typer.Option(1e-3, min=0.0, help="AdamW learning rate"),
    timesteps: int = typer.Option(5, "--timesteps", min=1, help="default shared (t, ε) per candidate of the denoise "
                                                                "mode"),
    generate_steps: int = typer.Option(4, "--sampling-steps", min=1, help="DDIM steps of the generate mode (baked "
                                       "into the exported graph)"),
    mode: DiffDisMode = typer.Option(DiffDisMode.denoise.value, help="the engine's default inference mode"),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="seed of the fixed noises, the initialisation, the split and "
                                                          "shuffling"),
    overwrite: bool = typer.Option(False, help="replace an existing run"),
    threads: Optional[int] = ThreadsOpt,
    # --- unified training (issue 30) ---
    unified: bool = typer.Option(False, "--unified", help="train the UNet too (full fine-tune), with the denoising "
                                 "loss and the text-diffusion loss; the text stream fused stage by stage with every "
                                 "block"),
    generation_weight: Optional[float] = typer.Option(None, help="--unified: weight of the denoising loss (default 1)"),
    text_weight: Optional[float] = typer.Option(None, help="--unified: weight of the text-diffusion loss (default 1)"),
    unet_lr: Optional[float] = typer.Option(None, help="--unified: AdamW learning rate of the UNet (default 1e-4)"),
):
    """Train DiffDis: a text stream that denoises the caption's text embedding with cross-attention to the frozen
    UNet's block features (several scales) at a fixed noise step; --unified trains the UNet with it (the paper's
    unified training); then `export --diffdis RUN`."""
    if demo == (data is not None):
        raise UsageMistake("give exactly one of --data PAIRS.jsonl or --demo")
    if not lr > 0:
        raise UsageMistake(f"--lr must be > 0, got {lr}")
    from diffscore.app.diffdis_options import unified_options

    unified_extra = unified_options(unified, generation_weight, text_weight, unet_lr)
    image_step = one_step(noise_steps)
    require_torch("train-diffdis")
    set_threads(threads)
    from diffscore.reference.diffdis import DiffDisTrainOptions, train_diffdis_run
    from diffscore.reference.prompt_learning import read_pairs

    if demo:
        from diffscore.app.digits import DIFFDIS_HELD_OUT_TEMPLATES, diffdis_demo_pairs

        pairs, note = diffdis_demo_pairs(), {"source": "demo digits, training split",
                                             "held_out_templates": list(DIFFDIS_HELD_OUT_TEMPLATES)}
    else:
        pairs, note = read_pairs(data), {"source": str(data)}
    model_ = train_diffdis_run(model, pairs.images, pairs.captions, out_dir,
                               blocks=None if blocks is None else split(blocks) or [], unified=unified,
                               image_step=image_step, seed=seed, overwrite=overwrite, data=note,
                               options=DiffDisTrainOptions(epochs=epochs, batch_size=batch_size, lr=lr,
                                                           **unified_extra),
                               timesteps=timesteps, generate_steps=generate_steps, mode=mode.value)
    t = model_.config.training
    say(("wrote ", "green"), f"{out_dir}: {'unified ' if unified else ''}DiffDis on {', '.join(model_.config.blocks)} "
        f"at t = {image_step}, {t['pairs']} training pairs ({t['images']} images, {t['captions']} captions), "
        f"validation loss {t['val_loss']:.4f}, "
        f"best epoch {t['best_epoch']} of {t['epochs']}, {t['wall_time_s']:.0f} s")
    say(f"next: diffscore export {model} ENGINE_DIR --diffdis {out_dir}")


@app.command("finetune")
def finetune_command(
    model: Path = ModelArg,
    data: Optional[Path] = PairsOpt,
    demo: bool = typer.Option(False, "--demo", help="the demo digits' training split instead of --data"),
    objectives: str = typer.Option("itc,is,rsc", help="comma-separated subset of itc (image-text contrastive), is "
                                   "(denoising loss) and rsc (consistency of the contrastive and diffusion branches)"),
    shots: int = typer.Option(..., "--shots", "-k", min=1, help="training pairs per class (a class = a distinct "
                                                                "caption)"),
    out_dir: Path = typer.Option(..., "--out", help="run directory: adapter.safetensors, itc_heads.safetensors, "
                                                    "training_log.json (with --clip: clip/ and rsc_head.safetensors "
                                                    "instead of itc_heads)"),
    train_steps: int = typer.Option(300, "--train-steps", min=1, help="optimiser steps at most (early stopping may end "
                                                                      "sooner)"),
    lr: float = typer.Option(3e-3, min=0.0, help="AdamW learning rate of the LoRA and the projections"),
    batch_size: int = typer.Option(32, min=1, help="images per step (the contrastive batch)"),
    blocks: str = typer.Option("mid_block", help="UNet blocks pooled into the image embedding, comma separated"),
    noise_steps: str = typer.Option("50", "--noise-steps", help="the image embedding's fixed noise step (one)"),
    val_shots: int = typer.Option(2, min=0, help="validation pairs per caption for early stopping, from pairs that "
                                  "are not shots (0: train every step)"),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="seed of the shots, noise, timesteps and initialisation"),
    overwrite: bool = typer.Option(False, help="replace an existing run directory's weights"),
    threads: Optional[int] = ThreadsOpt,
    clip: Optional[Path] = typer.Option(None, "--clip", help="a local transformers CLIPModel folder: ITC on its image "
                                        "and text towers (trained in full), RSC between its image features and the "
                                        "UNet's (UniDiff as published; models/demo-clip for the demo)"),
    clip_lr: float = typer.Option(1e-4, "--clip-lr", min=0.0, help="AdamW learning rate of the CLIP towers (--clip)"),
):
    """UniDiff-style fine-tuning: LoRA + projections with ITC, IS and RSC (then `export --adapters RUN`,
    `match --method itc`)."""
    if demo == (data is not None):
        raise UsageMistake("give exactly one of --data PAIRS.jsonl or --demo")
    if clip is not None and not clip.is_dir():
        raise UsageMistake(f"--clip expects a local CLIPModel folder, got {clip} (no such folder)")
    noise_step = one_step(noise_steps)
    require_torch("finetune")
    set_threads(threads)
    from diffscore.app.digits import demo_pairs
    from diffscore.reference.finetune import FinetuneConfig, check_config, finetune
    from diffscore.reference.prompt_learning import read_pairs

    cfg = check_config(FinetuneConfig(objectives=tuple(split(objectives) or ()), shots=shots, steps=train_steps, lr=lr,
                                      batch_size=batch_size, blocks=split(blocks) or [], noise_step=noise_step,
                                      val_shots=val_shots, seed=seed, clip=None if clip is None else str(clip),
                                      clip_lr=clip_lr))
    pairs = demo_pairs() if demo else read_pairs(data)
    run = finetune(model, pairs, out_dir, cfg, overwrite=overwrite)
    stop = f", stopped early, best step {run['best_step']}" if run["stopped_early"] else ""
    losses = ", ".join(f"{k} {v[0]:.3f} -> {sum(v[-20:]) / len(v[-20:]):.3f}" for k, v in run["loss"].items())
    say(("wrote "
         "", "green"), f"{out_dir} ({run['pairs']} pairs, {len(run['captions'])} captions, {run['steps_run']} steps"
        f"{stop}; {losses}; {run['wall_time_s']:.0f} s)")
    say(f"next: diffscore export {model} ENGINE_DIR --adapters {out_dir}")
