"""Feature taps for the one-pass heads (DESIGN.md §3, DifFormer): the outputs of named UNet blocks
(diffusers module names such as ``mid_block`` or ``up_blocks.1``) for the image noised once per step
with a fixed ε (seeded, shared by every image, from kernels/), conditioned on the empty prompt unless
set. Extracted once per (model, images, spec) and cached."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffscore.engine.images import preprocess_batch
from diffscore.engine.progress import progress_bar
from diffscore.errors import EngineError
from diffscore.kernels import shared_noise
from diffscore.reference.loading import Components, add_noise, encode_conditioning, encode_images, encode_prompts, take
from diffscore.reference.scoring_unet import ScoringUNet

log = logging.getLogger("diffscore")


# --- feature taps -------------------------------------------------------------------------------
def tappable_blocks(unet: nn.Module) -> list[str]:
    """The UNet's top-level blocks, in forward order: down_blocks.i, mid_block, up_blocks.i."""
    down = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    return down + ["mid_block"] + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]


def check_blocks(unet: nn.Module, blocks: list[str]) -> list[str]:
    modules = dict(unet.named_modules())
    if not blocks:
        raise EngineError(f"no feature blocks given; choose from {', '.join(tappable_blocks(unet))}")
    for b in blocks:
        if b not in modules or not b:
            raise EngineError(f"unknown block {b!r}: this UNet has {', '.join(tappable_blocks(unet))}")
    if len(set(blocks)) != len(blocks):
        raise EngineError(f"blocks {blocks} contain duplicates")
    return list(blocks)


@torch.no_grad()
def block_shapes(comp: Components, blocks: list[str]) -> dict[str, list[int]]:
    """(C, h, w) of each block's output, from one pass on zeros."""
    unet = ScoringUNet(comp.unet, attention_layers=[], feature_blocks=blocks)
    C, S = int(comp.unet.config.in_channels), int(comp.unet.config.sample_size)
    try:
        _, _, *feats = unet(torch.zeros(1, C, S, S), torch.zeros(1), encode_prompts(comp, [""]))
    finally:
        unet.remove_hooks()
    return {b: list(f.shape[1:]) for b, f in zip(blocks, feats)}


def check_steps(steps: list[int], num_train_timesteps: int) -> list[int]:
    """Noise steps are distinct integers in [0, T)."""
    steps = list(steps)
    if not steps:
        raise EngineError("no noise steps given; e.g. --steps 50,200")
    bad = [t for t in steps if not isinstance(t, (int, np.integer)) or not 0 <= t < num_train_timesteps]
    if bad:
        raise EngineError(f"noise steps {bad} are outside [0, {num_train_timesteps}) (the model's training timesteps)")
    if len(set(steps)) != len(steps):
        raise EngineError(f"noise steps {steps} contain duplicates")
    return [int(t) for t in steps]


@dataclass
class FeatureSpec:
    blocks: list[str]  # diffusers module names whose outputs are tapped
    steps: list[int]  # noise steps; one UNet pass per step per image
    seed: int = 0  # seed of the fixed ε: one per step, shared by every image
    prompt: str = ""  # the conditioning; the empty prompt unless set


@dataclass
class FeedbackSpec:
    """DifFeed (reference/feedback.py): each pair's first block's output in a first UNet pass goes through a
    small learned module and is added to the second block's output in a second pass over the same x_t, t."""

    pairs: list[list[str]]  # [source, target]: source (a decoder block) comes after target (an encoder block)
    channels: list[list[int]]  # [source channels, target channels] of each pair's module


@torch.no_grad()
def extract_features(comp: Components, images, spec: FeatureSpec, batch_size: int = 256,
                     progress: bool = False, scoring: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """{block: (N, steps, C, h, w)} block outputs of every image at every step (rows image-major).

    scoring: the UNet wrapper whose features to take (a DifFeed FeedbackUNet); default a ScoringUNet."""
    blocks = check_blocks(comp.unet, spec.blocks)
    steps = check_steps(spec.steps, comp.num_train_timesteps)
    pixels = preprocess_batch(images, comp.image_size, comp.image_channels)
    x0 = encode_images(comp, torch.from_numpy(pixels))  # (N, C, H, W)
    S = len(steps)
    eps = torch.from_numpy(shared_noise(spec.seed, S, tuple(x0.shape[1:])))  # (S, C, H, W)
    t = torch.tensor(steps)
    cond = encode_conditioning(comp, [spec.prompt])  # one prompt
    unet = scoring if scoring is not None else ScoringUNet(comp.unet, attention_layers=[], feature_blocks=blocks)
    per_image = max(1, batch_size // S)
    out: dict[str, list[torch.Tensor]] = {b: [] for b in blocks}
    try:
        with progress_bar("features", len(x0), progress) as advance:
            for lo in range(0, len(x0), per_image):
                x = x0[lo : lo + per_image]
                x_t = torch.cat([add_noise(xi, eps, comp.alphas_cumprod, t) for xi in x])  # (n*S, C, H, W), image-major
                _, _, *feats = unet(x_t, t.repeat(len(x)).float(), **take(cond, [0] * len(x_t)))
                for b, f in zip(blocks, feats):
                    out[b].append(f.reshape(len(x), S, *f.shape[1:]))
                advance(len(x))
    finally:
        unet.remove_hooks()
    return {b: torch.cat(v) for b, v in out.items()}


def feature_cache_key(model_sha256: str, pixels: np.ndarray, spec: FeatureSpec) -> str:
    digest = hashlib.sha256(model_sha256.encode())
    digest.update(json.dumps(asdict(spec), sort_keys=True).encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()[:24]


def cached_features(comp: Components, images, spec: FeatureSpec, cache_dir: Path, model_sha256: str,
                    progress: bool = False) -> dict[str, torch.Tensor]:
    """extract_features, stored once per (model, images, spec) under cache_dir as safetensors."""
    from safetensors.torch import load_file, save_file

    pixels = preprocess_batch(images, comp.image_size, comp.image_channels)
    path = Path(cache_dir) / f"{feature_cache_key(model_sha256, pixels, spec)}.safetensors"
    if path.is_file():
        log.info("features from cache %s", path)
        return load_file(str(path))
    feats = extract_features(comp, images, spec, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({b: f.contiguous() for b, f in feats.items()}, str(tmp))
    tmp.replace(path)
    return feats
