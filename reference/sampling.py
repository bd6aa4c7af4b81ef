"""Generating images with the model itself: a few-step diffusers sampler (DDIM or DPM-Solver++) with
classifier-free guidance, for heads trained without labelled images (`train-head --synthesize`).

The loop is StableDiffusionPipeline's (same text encoding, noise draw, guidance and scheduler steps), so
with the same scheduler, seeds and guidance it gives the pipeline's latents; it also runs pixel-space
models, which have no pipeline of their own. Image i starts from the noise of its own seeded generator,
so a sample does not depend on the batch it was drawn in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffscore.engine.manifest import HeadTraining
from diffscore.engine.manifest_checks import SAMPLERS as SAMPLER_NAMES
from diffscore.engine.progress import progress_bar
from diffscore.errors import EngineError
from diffscore.reference.loading import Components, encode_prompts, require_sd_conditioning

SAMPLERS = dict(zip(SAMPLER_NAMES, ("DPMSolverMultistepScheduler", "DDIMScheduler")))  # name -> diffusers scheduler


@dataclass
class SampleOptions:
    sampler: str = "dpm-solver"  # dpm-solver (DPM-Solver++ multistep) | ddim
    steps: int = 10  # denoising steps (UNet passes per image, twice that with guidance)
    guidance: float = 2.0  # classifier-free guidance scale; ≤ 1: conditional only, no empty-prompt pass
    seed: int = 0  # image i starts from torch.Generator().manual_seed(seed + i)'s noise
    batch_size: int = 128  # images per UNet call (twice that many rows with guidance)

    def check(self) -> "SampleOptions":
        if self.sampler not in SAMPLERS:
            raise EngineError(f"unknown sampler {self.sampler!r}; choose from {', '.join(SAMPLERS)}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise EngineError(f"sampling steps must be an integer ≥ 1, got {self.steps!r}")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise EngineError(f"guidance scale must be a finite number ≥ 0, got {self.guidance!r}")
        if self.batch_size < 1:
            raise EngineError(f"batch size must be ≥ 1, got {self.batch_size}")
        return self


def make_scheduler(comp: Components, sampler: str):
    """A fresh diffusers scheduler of the sampler's class on the model's own training schedule.

    DDIM runs without x̂0 clipping (DDPM configs such as the demo's set clip_sample): it clips x̂0 but
    keeps the unclipped ε̂, and once guidance amplifies ε̂ the two disagree and samples turn to noise."""
    import diffusers

    extra = {"clip_sample": False} if sampler == "ddim" else {}
    return getattr(diffusers, SAMPLERS[sampler]).from_config(comp.scheduler.config, **extra)


@torch.no_grad()
def sample(comp: Components, prompts: list[str], options: SampleOptions = SampleOptions(),
           seeds: list[int] | None = None, progress: bool = False, decode: bool = True) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1], one per prompt (decoded by the VAE in latent space).

    seeds: the initial noise's seed per image (default options.seed + i). decode=False: the final
    latents as they are (the pipeline's output_type="latent"; pixel space: unclamped pixels)."""
    options.check()
    require_sd_conditioning(comp, "--synthesize (sampling)")
    seeds = [options.seed + i for i in range(len(prompts))] if seeds is None else list(seeds)
    assert len(seeds) == len(prompts), f"{len(seeds)} seeds for {len(prompts)} prompts"
    unique = list(dict.fromkeys(prompts))
    emb = encode_prompts(comp, unique)  # (P, L, D)
    which = torch.tensor([unique.index(p) for p in prompts])
    guided = options.guidance > 1.0  # as the pipeline: no unconditional pass at scale ≤ 1
    empty = encode_prompts(comp, [""]) if guided else None  # (1, L, D)
    shape = (1, comp.unet.config.in_channels, comp.unet.config.sample_size, comp.unet.config.sample_size)
    out = []
    with progress_bar(f"sample ({options.sampler}, {options.steps} steps)", len(prompts), progress) as advance:
        for lo in range(0, len(prompts), options.batch_size):
            idx = slice(lo, lo + options.batch_size)
            cond = emb[which[idx]]  # (B, L, D)
            if guided:
                cond = torch.cat([empty.expand(len(cond), -1, -1), cond])  # (2B, L, D): empty first, as the pipeline
            noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds[idx]])
            out.append(denoise(comp, noise, cond, options))
            advance(len(noise))
    x = torch.cat(out)
    if not decode:
        return x
    if comp.vae is not None:
        x = comp.vae.decode(x / comp.latent_scaling + comp.latent_shift).sample
    return x.clamp(-1, 1)


def denoise(comp: Components, noise: torch.Tensor, cond: torch.Tensor, options: SampleOptions) -> torch.Tensor:
    """The sampler's loop from noise (B, C, h, w) under `cond` ((2B, L, D) empty-then-text with guidance)."""
    scheduler = make_scheduler(comp, options.sampler)  # fresh: multistep solvers keep state
    scheduler.set_timesteps(options.steps)
    x = noise * scheduler.init_noise_sigma
    guided = len(cond) == 2 * len(x)
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        pred = comp.unet(inp, t, encoder_hidden_states=cond).sample
        if guided:
            uncond, text = pred.chunk(2)
            pred = uncond + options.guidance * (text - uncond)
        x = scheduler.step(pred, t, x).prev_sample
    return x


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """[-1, 1] (N, C, H, W) -> uint8 (H, W) or (H, W, C) arrays, as a saved PNG holds them."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [a[..., 0] if a.shape[-1] == 1 else a for a in x]


def synthesize(comp: Components, labels: list[str], per_class: int, template: str = "{}",
               options: SampleOptions = SampleOptions(), progress: bool = False,
               ) -> tuple[list[np.ndarray], np.ndarray, HeadTraining]:
    """per_class generated images per label (class-major), their label indices, and the record.

    Image j of class c starts from seed options.seed + j·classes + c, so the first n per class of a
    larger set are exactly the set `per_class=n` gives."""
    from diffscore.engine.options import check_template

    if not isinstance(per_class, int) or per_class < 1:
        raise EngineError(f"--synthesize needs at least 1 image per label, got {per_class}")
    if len(labels) < 2:
        raise EngineError(f"a classifier needs at least two labels, got {labels}")
    template = check_template(template)
    K = len(labels)
    prompts = [template.format(label) for label in labels for _ in range(per_class)]
    seeds = [options.seed + j * K + c for c in range(K) for j in range(per_class)]
    images = to_uint8(sample(comp, prompts, options, seeds, progress))
    record = HeadTraining(source="synthetic", images=len(images), sampler=options.sampler, sampling_steps=options.steps,
                          guidance=options.guidance, per_class=per_class, template=template, sample_seed=options.seed)
    return images, np.repeat(np.arange(K), per_class), record


def save_samples(images: list[np.ndarray], labels: np.ndarray, names: list[str], record: HeadTraining,
                 out_dir: str | Path, overwrite: bool = False) -> Path:
    """out_dir/<label>/<index>.png (the `--data` layout) + synthesis.json (the record), written whole or not at all."""
    import dataclasses
    import json
    import shutil
    import tempfile

    from PIL import Image

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise EngineError(f"{out_dir} already exists; pass --overwrite to replace it")
    bad = [n for n in names if not n or n.startswith(".") or any(c in n for c in '/\\:')]
    if bad:
        raise EngineError(f"labels {bad} cannot name sample folders; use names without / \\ : or a leading dot")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        counts = dict.fromkeys(range(len(names)), 0)
        for image, label in zip(images, labels):
            folder = tmp / names[label]
            folder.mkdir(exist_ok=True)
            Image.fromarray(image).save(folder / f"{counts[label]:05d}.png")
            counts[label] += 1
        (tmp / SYNTHESIS).write_text(json.dumps(dataclasses.asdict(record), indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


SYNTHESIS = "synthesis.json"  # beside saved samples: how they were made, so a head trained on them says so


def saved_record(folder: str | Path) -> HeadTraining | None:
    """The record of a folder written by save_samples, else None."""
    import json

    path = Path(folder) / SYNTHESIS
    return HeadTraining(**json.loads(path.read_text())) if path.is_file() else None
