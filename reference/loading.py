"""Load the components of a local diffusers-layout model folder: never from a hub.

Every failure a user can cause (wrong path, missing component, unknown scheduler) is one line that
names what is wrong, raised as EngineError.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from diffscore.errors import EngineError, first_line

log = logging.getLogger("diffscore")


@dataclass
class Components:
    path: Path
    unet: "torch.nn.Module"
    text_encoder: "torch.nn.Module"
    tokenizer: object
    scheduler: object
    vae: "torch.nn.Module | None"  # None for pixel-space models
    text_encoder_2: "torch.nn.Module | None" = None  # SDXL's second (projected) text encoder
    tokenizer_2: object = None

    @property
    def conditioning(self) -> str:
        """"sd" (text hidden states only) or "sdxl" (+ the pooled embedding of encoder 2 and the size time ids)."""
        return "sd" if self.text_encoder_2 is None else "sdxl"

    @property
    def time_ids(self) -> list[float] | None:
        """SDXL's micro-conditioning for a scored image: original size, crop top-left, target size. The image
        is resized and centre-cropped to the model's square before encoding, so both sizes are that square."""
        if self.conditioning != "sdxl":
            return None
        return [float(self.image_size)] * 2 + [0.0, 0.0] + [float(self.image_size)] * 2

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

    @property
    def latent_shift(self) -> float:
        """The VAE's shift_factor (x0 = (mean − shift) · scale); 0 for VAEs without one."""
        return 0.0 if self.vae is None else float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def prediction_type(self) -> str:
        """What the UNet was trained to predict: epsilon, v_prediction or sample (scheduler config)."""
        return str(self.scheduler.config.get("prediction_type", "epsilon"))


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
    check_supported(path)
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
            path, subfolder="unet", torch_dtype=dtype, local_files_only=True, variant=weights_variant(path / "unet")
        )
        text_cls = CLIPTextModel
        if "WithProjection" in str(_read_json(path / "text_encoder" / "config.json").get("architectures")):
            text_cls = CLIPTextModelWithProjection
        text_encoder = text_cls.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype,
                                                local_files_only=True, variant=weights_variant(path / "text_encoder"))
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        text_encoder_2 = tokenizer_2 = None
        if unet.config.addition_embed_type == "text_time":  # SDXL: check_supported saw both folders
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                path, subfolder="text_encoder_2", torch_dtype=dtype, local_files_only=True,
                variant=weights_variant(path / "text_encoder_2"))
            tokenizer_2 = AutoTokenizer.from_pretrained(path / "tokenizer_2", local_files_only=True)
        vae = None
        if (path / "vae").is_dir():
            vae = diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype,
                                                          local_files_only=True, variant=weights_variant(path / "vae"))
    except (OSError, ValueError, KeyError) as e:
        raise EngineError(f"cannot load model from {path}: {first_line(e)}") from None
    for module in (unet, text_encoder, vae, text_encoder_2):
        if module is not None:
            module.eval().requires_grad_(False)
    if tokenizer_2 is not None and tokenizer_2.model_max_length != tokenizer.model_max_length:
        raise EngineError(f"{path}: tokenizer/ pads to {tokenizer.model_max_length} tokens and tokenizer_2/ to "
                          f"{tokenizer_2.model_max_length}; SDXL concatenates both encoders' states token by token")
    log.info("loaded %s (%s space)", path, "pixel" if vae is None else "latent")
    return Components(path, unet, text_encoder, tokenizer, scheduler, vae, text_encoder_2, tokenizer_2)


WEIGHT_FILE = re.compile(
    r"(?:diffusion_pytorch_model|model|pytorch_model)(?:\.([\w-]+))?\.(?:safetensors|bin)(?:\.index\.json)?")


def weights_variant(component: Path) -> str | None:
    """The weights variant of a component folder (`fp16` for `diffusion_pytorch_model.fp16.safetensors`):
    None when plain weights are there, else the one variant present; several and no plain: refused."""
    found = {m.group(1) for f in component.iterdir()
             if (m := WEIGHT_FILE.fullmatch(f.name))} if component.is_dir() else set()
    if not found or None in found:
        return None
    if len(found) > 1:
        raise EngineError(f"{component} holds the weight variants {', '.join(sorted(found))} and no plain weights; "
                          "keep the one variant to use")
    return found.pop()


def check_supported(path: Path) -> None:
    """Refuse, from the config files alone and before any weights are read, the families diffscore cannot score
    correctly: one line that names the reason."""
    from diffscore.kernels import PREDICTION_TYPES

    index = _read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    if (path / "transformer").is_dir() or "transformer" in index:
        raise EngineError(f"{path} has a transformer denoiser ({index.get('_class_name', 'transformer/')}: SD3, Flux, "
                          "PixArt ...); diffscore scores UNet (UNet2DConditionModel) models only")
    unet_cfg = _read_json(path / "unet" / "config.json") if (path / "unet").is_dir() else {}
    name = unet_cfg.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
        raise EngineError(f"{path / 'unet'} is a {name}; diffscore scores text-conditioned UNet2DConditionModel models "
                          f"only")
    if unet_cfg.get("class_embed_type") or unet_cfg.get("num_class_embeds"):
        raise EngineError(f"{path / 'unet'} is class-conditional "
                          f"(class_embed_type={unet_cfg.get('class_embed_type')!r}, "
                          f"num_class_embeds={unet_cfg.get('num_class_embeds')!r}): its extra class input has no "
                          "text-prompt meaning, so it cannot be scored")
    if unet_cfg.get("addition_embed_type") not in (None, "text_time"):
        raise EngineError(f"{path / 'unet'} needs addition_embed_type={unet_cfg['addition_embed_type']!r} inputs, "
                          "which diffscore does not build (it builds SDXL's text_time conditioning)")
    if unet_cfg.get("addition_embed_type") == "text_time":
        if not (path / "text_encoder").is_dir() and (path / "text_encoder_2").is_dir():
            raise EngineError(f"{path} is an SDXL refiner (text_encoder_2/ only; its time ids carry an aesthetic "
                              "score): diffscore scores SDXL base-layout models (two text encoders)")
        for component in ("text_encoder_2", "tokenizer_2"):
            if not (path / component).is_dir():
                raise EngineError(f"{path / 'unet'} has SDXL text_time conditioning but {path} has no {component}/ "
                                  "component")
    if (path / "vae").is_dir():
        latent = _read_json(path / "vae" / "config.json").get("latent_channels", 4)
        if unet_cfg.get("in_channels", 4) != latent:
            raise EngineError(f"{path / 'unet'} takes {unet_cfg.get('in_channels')} input channels but the VAE makes "
                              f"{latent}: an inpainting / depth / image-conditioned UNet, which needs inputs besides "
                              "the noised image and cannot be scored")
    if unet_cfg.get("in_channels", 4) != unet_cfg.get("out_channels", 4):
        raise EngineError(f"{path / 'unet'} takes {unet_cfg.get('in_channels')} channels and predicts "
                          f"{unet_cfg.get('out_channels')}: an image-conditioned UNet, which cannot be scored")
    sched = _read_json(path / "scheduler" / "scheduler_config.json") if (path / "scheduler").is_dir() else {}
    if "FlowMatch" in str(sched.get("_class_name")):
        raise EngineError(f"{path / 'scheduler'} is a flow-matching scheduler ({sched['_class_name']}); diffscore "
                          f"scores "
                          "DDPM-style (ᾱ_t) diffusion models only")
    if sched.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
        raise EngineError(f"{path / 'scheduler'} has prediction_type {sched['prediction_type']!r}; diffscore "
                          f"understands {', '.join(PREDICTION_TYPES)}")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise EngineError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineError(f"{path} is not valid JSON: {e}") from None


def token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(P, L) ids padded to the tokenizer's max length, truncated (DESIGN §3)."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_prompts(components: Components, prompts: list[str]) -> torch.Tensor:
    """(P, L, D) text hidden states, no attention mask (DESIGN §3): the last hidden state (SD), or SDXL's
    penultimate hidden states of both encoders concatenated (encode_conditioning has SDXL's other inputs)."""
    return encode_conditioning(components, prompts)["encoder_hidden_states"]


@torch.no_grad()
def encode_conditioning(components: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The UNet's text conditioning per prompt, keyed by the UNet graph's input names: encoder_hidden_states
    (P, L, D); SDXL adds text_embeds (P, D2), the pooled projected embedding of encoder 2, and time_ids (P, 6),
    as StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids build them (no clip skip)."""
    ids = token_ids(components.tokenizer, prompts)
    if components.conditioning == "sd":
        return {"encoder_hidden_states": components.text_encoder(ids)[0]}
    states, pooled = sdxl_text(components.text_encoder, components.text_encoder_2, ids,
                               token_ids(components.tokenizer_2, prompts))
    return {"encoder_hidden_states": states, "text_embeds": pooled,
            "time_ids": torch.tensor([components.time_ids], dtype=pooled.dtype).expand(len(prompts), -1)}


def sdxl_text(text_encoder, text_encoder_2, input_ids, input_ids_2) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning from each encoder's ids: both encoders' penultimate hidden states concatenated
    (P, L, D1 + D2), and encoder 2's pooled projected embedding (P, D2)."""
    first = text_encoder(input_ids, output_hidden_states=True)
    second = text_encoder_2(input_ids_2, output_hidden_states=True)
    return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds


def require_sd_conditioning(components: Components, what: str) -> None:
    """One line instead of a deep traceback where a method is built for SD's text conditioning only."""
    if components.conditioning != "sd":
        raise EngineError(f"{what} does not build {components.conditioning} (SDXL) conditioning yet; score this model "
                          "zero-shot (classify, match) or with a one-pass head")


def take(conditioning: dict[str, torch.Tensor], rows) -> dict[str, torch.Tensor]:
    """The conditioning of the given prompt rows (an index tensor or list: one row per UNet sample)."""
    return {name: value[rows] for name, value in conditioning.items()}


def unet_output(components: Components, sample, timestep, conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
    """The raw UNet output for rows of conditioning (encode_conditioning's names, already per sample)."""
    extra = {k: v for k, v in conditioning.items() if k != "encoder_hidden_states"}
    return components.unet(sample, timestep, encoder_hidden_states=conditioning["encoder_hidden_states"],
                           added_cond_kwargs=extra or None, return_dict=False)[0]


@torch.no_grad()
def encode_images(components: Components, pixels: torch.Tensor) -> torch.Tensor:
    """x0: (VAE posterior mean − shift factor) × scaling factor (deterministic), or the pixels themselves."""
    if components.vae is None:
        return pixels
    return (components.vae.encode(pixels).latent_dist.mean - components.latent_shift) * components.latent_scaling


def epsilon_hat(components: Components, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """ε̂ from the UNet output `out` at x_t (B, ...) and timesteps t (DESIGN §3; numpy twin: kernels.prediction).

    epsilon: out; v_prediction: sqrt(ā)·out + sqrt(1−ā)·x_t; sample: (x_t − sqrt(ā)·out) / sqrt(1−ā)."""
    kind = components.prediction_type
    if kind == "epsilon":
        return out
    abar = components.alphas_cumprod[torch.as_tensor(t).long()].reshape(-1, *([1] * (out.ndim - 1)))
    a, s = abar.sqrt().to(out.dtype), (1 - abar).sqrt().to(out.dtype)
    if kind == "v_prediction":
        return a * out + s * x_t
    return (x_t - a * out) / s


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor, t) -> torch.Tensor:
    """x_t = sqrt(ā_t)·x0 + sqrt(1−ā_t)·ε (DESIGN §3), in float32: the torch twin of kernels.add_noise.

    t: one timestep for the whole batch, or a tensor of timesteps indexing the leading axes of `eps`
    ((K,) for K noises, (B, P) for B images x P pairs); x0 broadcasts against eps (one image (C, H, W)
    against K noises, a batch against a batch, or (B, 1, C, H, W) against (B, P, C, H, W))."""
    abar = alphas_cumprod[t]
    shape = tuple(abar.shape) + (1,) * (eps.dim() - abar.dim())
    return abar.sqrt().float().reshape(shape) * x0 + (1 - abar).sqrt().float().reshape(shape) * eps
