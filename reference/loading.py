"""Load the components of a local diffusers-layout model folder: never from a hub.

Every failure a user can cause (wrong path, missing component, unknown scheduler) is one line that
names what is wrong, raised as EngineError.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from diffscore.errors import EngineError

log = logging.getLogger("diffscore")


@dataclass
class Components:
    path: Path
    unet: "torch.nn.Module"
    text_encoder: "torch.nn.Module"
    tokenizer: object
    scheduler: object
    vae: "torch.nn.Module | None"  # None for pixel-space models

    @property
    def pixel_space(self) -> bool:
        return self.vae is None

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(torch.float64)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def image_size(self) -> int:
        """Pixel side the model expects: the UNet sample size, times the VAE's downsampling."""
        size = self.unet.config.sample_size
        if self.vae is not None:
            size *= 2 ** (len(self.vae.config.block_out_channels) - 1)
        return int(size)

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels if self.vae is not None else self.unet.config.in_channels)

    @property
    def latent_scaling(self) -> float | None:
        return None if self.vae is None else float(self.vae.config.scaling_factor)


def load_components(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> Components:
    """UNet, text encoder, tokenizer, scheduler and (optional) VAE from a local diffusers folder."""
    import diffusers
    import transformers
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    diffusers.utils.logging.disable_progress_bar()  # our own progress bars say what is happening
    transformers.utils.logging.disable_progress_bar()

    path = Path(model_dir)
    if not path.is_dir():
        raise EngineError(f"model folder {path} does not exist")
    if not (path / "model_index.json").is_file() and not (path / "unet" / "config.json").is_file():
        raise EngineError(
            f"{path} is not a diffusers model folder (no model_index.json and no unet/config.json)"
        )
    for component in ("unet", "text_encoder", "tokenizer", "scheduler"):
        if not (path / component).is_dir():
            raise EngineError(f"model folder {path} has no {component}/ component")

    scheduler_cfg = _read_json(path / "scheduler" / "scheduler_config.json")
    scheduler_cls = getattr(diffusers, str(scheduler_cfg.get("_class_name")), None)
    if scheduler_cls is None or not hasattr(scheduler_cls, "from_pretrained"):
        raise EngineError(
            f"unknown scheduler {scheduler_cfg.get('_class_name')!r} in {path / 'scheduler'}; "
            "expected a diffusers scheduler class such as DDPMScheduler or PNDMScheduler"
        )
    try:
        scheduler = scheduler_cls.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        unet = diffusers.UNet2DConditionModel.from_pretrained(
            path, subfolder="unet", torch_dtype=dtype, local_files_only=True
        )
        text_cls = CLIPTextModel
        if "WithProjection" in str(_read_json(path / "text_encoder" / "config.json").get("architectures")):
            text_cls = CLIPTextModelWithProjection
        text_encoder = text_cls.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        vae = None
        if (path / "vae").is_dir():
            vae = diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EngineError(f"cannot load model from {path}: {first}") from None
    for module in (unet, text_encoder, vae):
        if module is not None:
            module.eval().requires_grad_(False)
    log.info("loaded %s (%s space)", path, "pixel" if vae is None else "latent")
    return Components(path, unet, text_encoder, tokenizer, scheduler, vae)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise EngineError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineError(f"{path} is not valid JSON: {e}") from None


@torch.no_grad()
def encode_prompts(components: Components, prompts: list[str]) -> torch.Tensor:
    """(P, L, D) last hidden states: padded to max length, truncated, no attention mask (DESIGN §3)."""
    tok = components.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    return components.text_encoder(ids.input_ids)[0]


@torch.no_grad()
def encode_images(components: Components, pixels: torch.Tensor) -> torch.Tensor:
    """x0: the VAE posterior mean times the scaling factor (deterministic), or the pixels themselves."""
    if components.vae is None:
        return pixels
    return components.vae.encode(pixels).latent_dist.mean * components.vae.config.scaling_factor


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor, t) -> torch.Tensor:
    """x_t = sqrt(ā_t)·x0 + sqrt(1−ā_t)·ε (DESIGN §3), in float32: the torch twin of kernels.add_noise.

    t: one timestep for the whole batch, or a (K,) tensor with one timestep per row of `eps`;
    x0 broadcasts against eps (one image (C, H, W) against K noises, or a batch against a batch)."""
    abar = alphas_cumprod[t]
    shape = (-1,) + (1,) * (eps.dim() - 1) if abar.dim() else ()
    return abar.sqrt().float().reshape(shape) * x0 + (1 - abar).sqrt().float().reshape(shape) * eps
