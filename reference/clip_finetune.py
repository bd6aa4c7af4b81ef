"""UniDiff with CLIP (`diffscore finetune --clip CLIP_DIR`): the three objectives of Dong et al. 2023 on a
local transformers ``CLIPModel`` folder beside the diffusion model.

- ITC: CLIP's own contrastive loss on its image and text embeddings (``get_image_features`` /
  ``get_text_features``, L2-normalised, CLIP's learned logit scale), every same-caption pair of the batch a
  positive (finetune.itc_loss).
- IS: the diffusion model's denoising loss on the caption, as without CLIP (finetune.is_loss).
- RSC: CLIP's visual embedding of an image and the UNet's visual features of the same image (the blocks
  ``cfg.blocks`` in the IS pass, averaged over space, mapped into CLIP's embedding space by a linear
  projection) are each other's only positive in a symmetric InfoNCE over the batch (finetune.rsc_loss):
  "reciprocal" as both directions count and gradients reach both models. Only the paper's abstract was
  available to us; it names the objectives and says RSC acts "on visual features from CLIP and diffusion
  models", so this form is our choice, recorded in the run's log.

Trained: CLIP's two towers and projections in full (ITC is a loss on them; a LoRA would hide the collapse the
paper's RSC is meant to prevent), at ``clip_lr``; the UNet's attention LoRA and the RSC projection at ``lr``.
The diffusion model's own text encoder stays frozen (it conditions the UNet; CLIP's text tower is a separate copy).

A run directory holds ``clip/`` (the fine-tuned CLIPModel with its tokenizer and image-processor config,
save_pretrained), ``rsc_head.safetensors`` (training only) and prompt learning's ``adapter.safetensors`` +
``training_log.json`` (so ``export --adapters RUN`` merges the UNet LoRA and, finding ``clip/``, exports the
CLIP towers as the ITC graphs: export/clip_itc.py).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffscore.engine.images import preprocess_batch
from diffscore.errors import EngineError
from diffscore.kernels import DEFAULT_DSD_PRESET
from diffscore.reference.features import block_shapes
from diffscore.reference.finetune import (Branches, FinetuneConfig, check_config, is_loss, itc_loss, pool_features,
                                          rsc_loss, split_pairs, train_loop)
from diffscore.reference.loading import Components, encode_images, load_components, require_sd_conditioning
from diffscore.reference.prompt_learning import ADAPTER_FILE, TARGET_MODULES, Pairs, add_lora, save_adapters

log = logging.getLogger("diffscore")

CLIP_SUBDIR = "clip"
RSC_HEAD_FILE = "rsc_head.safetensors"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # when unstated
MAX_LOGIT_SCALE = 100.0


@dataclass
class ClipInput:
    """How images and texts reach the CLIP towers (the engine's ItcSpec records the same)."""

    image_size: int
    image_channels: int
    image_mean: list[float]
    image_std: list[float]
    max_length: int


def load_clip(path: str | Path):
    """(CLIPModel, its fast tokenizer, ClipInput) from a local folder; one line when it is not a CLIP folder."""
    from transformers import AutoTokenizer, CLIPModel

    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise EngineError(f"--clip expects a transformers CLIPModel folder (config.json + weights), got {path}; "
                          "save one with CLIPModel.save_pretrained")
    kind = json.loads(config.read_text()).get("model_type")
    if kind != "clip":
        raise EngineError(f"--clip expects a CLIPModel folder (model_type 'clip'), {config} says {kind!r}")
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise EngineError(f"could not load the CLIP folder {path}: {str(e).splitlines()[0]} (it needs the weights and "
                          "a tokenizer: tokenizer.json, or vocab.json + merges.txt)") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise EngineError(f"the tokenizer in {path} has no fast (tokenizers) backend; save a tokenizer.json beside it")
    pre_file = path / "preprocessor_config.json"
    pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
    vision, text = model.config.vision_config, model.config.text_config
    spec = ClipInput(image_size=int(vision.image_size), image_channels=int(vision.num_channels),
                     image_mean=[float(v) for v in pre.get("image_mean", CLIP_MEAN)][: vision.num_channels],
                     image_std=[float(v) for v in pre.get("image_std", CLIP_STD)][: vision.num_channels],
                     max_length=int(min(tokenizer.model_max_length, text.max_position_embeddings)))
    return model.eval(), tokenizer, spec


def _pooled(out) -> torch.Tensor:
    """get_*_features return a tensor (transformers 4) or an output whose pooler_output it is (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def image_features(clip, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, projection_dim) CLIPModel.get_image_features: the pooled, projected visual embedding (not normalised)."""
    return _pooled(clip.get_image_features(pixel_values=pixel_values))


def text_features(clip, input_ids: torch.Tensor) -> torch.Tensor:
    return _pooled(clip.get_text_features(input_ids=input_ids))


def clip_pixels(images, spec: ClipInput) -> torch.Tensor:
    """(N, C, S, S) pixel_values: the engine's resize + centre crop in [-1, 1], then CLIP's normalisation."""
    x = torch.from_numpy(preprocess_batch(list(images), spec.image_size, spec.image_channels))
    mean = torch.tensor(spec.image_mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.image_std).view(1, -1, 1, 1)
    return ((x + 1) / 2 - mean) / std


def clip_ids(tokenizer, texts: list[str], spec: ClipInput) -> torch.Tensor:
    """(T, L) input ids padded to max_length (CLIP pools the first end-of-text token; padding after it is inert)."""
    return tokenizer(list(texts), padding="max_length", max_length=spec.max_length, truncation=True,
                     return_tensors="pt").input_ids


def clip_scale(clip) -> torch.Tensor:
    return clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)


class ClipBranches:
    """CLIP's towers for ITC, the UNet's IS pass (finetune.Branches) for IS and RSC's diffusion side."""

    def __init__(self, comp: Components, cfg: FinetuneConfig, captions: list[str], clip, tokenizer, spec: ClipInput):
        self.cfg, self.clip = cfg, clip
        self.unet = Branches(comp, cfg, captions)
        self.ids = clip_ids(tokenizer, captions, spec)

    def losses(self, head: nn.Module, x0, pixels, caption_ids, t, eps) -> dict[str, torch.Tensor]:
        on, out = set(self.cfg.objectives), {}
        scale = clip_scale(self.clip)
        z_i = F.normalize(image_features(self.clip, pixels), dim=-1) if on & {"itc", "rsc"} else None
        if "itc" in on:
            z_t = F.normalize(text_features(self.clip, self.ids[caption_ids]), dim=-1)
            out["itc"] = itc_loss(z_i, z_t, caption_ids, scale)
        if on & {"is", "rsc"}:
            eps_hat, feats = self.unet.diffusion(x0, caption_ids, t, eps)
            if "is" in on:
                out["is"] = is_loss(eps, eps_hat)
            if "rsc" in on:
                out["rsc"] = rsc_loss(z_i, F.normalize(head(pool_features(feats)), dim=-1), scale)
        return out

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.unet.total(parts)


def finetune_clip(model_dir: str | Path, pairs: Pairs, out_dir: str | Path, cfg: FinetuneConfig, progress: bool = True,
                  comp: Components | None = None, overwrite: bool = False) -> dict:
    """finetune() with cfg.clip set: writes the run directory (see the module docstring) and returns its log."""
    out_dir = Path(out_dir)
    if (out_dir / ADAPTER_FILE).exists() and not overwrite:
        raise EngineError(f"{out_dir} already holds a trained run; pass --overwrite to replace it")
    clip, tokenizer, spec = load_clip(cfg.clip)
    comp = comp or load_components(model_dir)
    require_sd_conditioning(comp, "finetune")
    check_config(cfg, comp)
    shots, val, vocab = split_pairs(pairs, cfg)

    def load(index):
        images = [pairs.images[i] for i in index]
        x0 = encode_images(comp, torch.from_numpy(preprocess_batch(images, comp.image_size, comp.image_channels)))
        return x0, clip_pixels(images, spec), torch.tensor([vocab.index(pairs.captions[i]) for i in index])

    x0, px, cap = load(shots)
    branches = ClipBranches(comp, cfg, vocab, clip, tokenizer, spec)
    torch.manual_seed(cfg.seed)
    lora = add_lora(comp.unet, cfg.rank)
    shapes = block_shapes(comp, cfg.blocks)
    head = nn.Linear(sum(shapes[b][0] for b in cfg.blocks), int(clip.config.projection_dim))  # UNet -> CLIP space
    clip.train()
    clip.requires_grad_(True)
    optimiser = torch.optim.AdamW([{"params": list(clip.parameters()), "lr": cfg.clip_lr},
                                   {"params": lora + list(head.parameters()), "lr": cfg.lr}],
                                  weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 2)  # the IS / RSC pass's t and ε
    T = comp.num_train_timesteps
    val_batch = None
    if len(val):
        vx0, vpx, vcap = load(val)
        vgen = torch.Generator().manual_seed(cfg.seed + 3)  # one fixed (t, ε) per validation image
        val_batch = (vx0, vpx, vcap, torch.randint(0, T, (len(vx0),), generator=vgen),
                     torch.randn(vx0.shape, generator=vgen))

    def step_losses(idx):
        t = torch.randint(0, T, (len(idx),), generator=gen)
        eps = torch.randn((len(idx), *x0.shape[1:]), generator=gen)
        return branches.losses(head, x0[idx], px[idx], cap[idx], t, eps)

    def val_losses():
        clip.eval()  # dropout off for the check (a tiny CLIP has none; a pretrained one may)
        try:
            return branches.losses(head, *val_batch)
        finally:
            clip.train()

    def snapshot(step):
        return {"step": step, "clip": {k: v.detach().clone() for k, v in clip.state_dict().items()},
                "lora": [p.detach().clone() for p in lora],
                "head": {k: v.detach().clone() for k, v in head.state_dict().items()}}

    def restore(state):
        clip.load_state_dict(state["clip"])
        head.load_state_dict(state["head"])
        with torch.no_grad():
            for p, saved in zip(lora, state["lora"]):
                p.copy_(saved)

    loop = train_loop(cfg, len(x0), optimiser, step_losses, branches.total, val_losses if val_batch else None,
                      snapshot, restore, progress)
    clip.eval()
    comp.unet.eval()
    branches.unet.tap.remove_hooks()
    step = loop["steps_run"]
    training_log = {
        "kind": "finetune",
        "model": str(Path(model_dir).resolve()),
        "config": {**asdict(cfg), "objectives": list(cfg.objectives), "clip": str(Path(cfg.clip).resolve()),
                   "attention_layers": None, "preset": DEFAULT_DSD_PRESET},
        "lora": {"rank": cfg.rank, "alpha": cfg.rank, "target_modules": list(TARGET_MODULES),
                 "trainable_params": sum(p.numel() for p in lora)},
        "clip": {"dir": CLIP_SUBDIR, "input": asdict(spec), "projection_dim": int(clip.config.projection_dim),
                 "trainable_params": sum(p.numel() for p in clip.parameters()),
                 "logit_scale": float(clip_scale(clip).detach())},
        "rsc_head": {"file": RSC_HEAD_FILE, "feature_dim": head.in_features},
        "trained": "CLIP's towers and projections in full (lr clip_lr), the UNet's attention LoRA and the RSC "
                   "projection (lr lr); the diffusion model's text encoder frozen",
        "pairs": len(shots), "captions": vocab, "shot_indices": shots.tolist(), "val_indices": val.tolist(),
        "objective_forms": {
            "itc": "CLIP's symmetric InfoNCE on its L2-normalised image and text embeddings, same-caption pairs "
                   "positive (soft targets), CLIP's learned logit scale",
            "is": "mean squared error of ε̂(x_t, t, caption), t uniform in [0, T), fresh ε",
            "rsc": "symmetric InfoNCE between CLIP's image embedding and the UNet's pooled block features (IS pass) "
                   "projected into CLIP's space, the same image the only positive",
        },
        "steps_run": step, "best_step": loop["best_step"], "stopped_early": step < cfg.steps,
        "validation": loop["validation"], "loss": loop["history"], "wall_time_s": round(loop["seconds"], 2),
        "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
    }
    save_clip_run(comp.unet, clip, tokenizer, Path(cfg.clip), head, out_dir, training_log)
    log.info("fine-tuned with CLIP (%s) on %d pairs for %d steps -> %s", ",".join(cfg.objectives), len(shots), step,
             out_dir)
    return training_log


def save_clip_run(unet, clip, tokenizer, source: Path, head: nn.Module, run_dir: Path, training_log: dict) -> None:
    """clip/ and the RSC head first (each written beside, then renamed), the adapter + log last (a finished run)."""
    from safetensors.torch import save_file

    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{CLIP_SUBDIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    clip.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if (source / "preprocessor_config.json").is_file():
        shutil.copyfile(source / "preprocessor_config.json", tmp / "preprocessor_config.json")
    shutil.rmtree(run_dir / CLIP_SUBDIR, ignore_errors=True)
    tmp.replace(run_dir / CLIP_SUBDIR)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()},
              str(run_dir / f".{RSC_HEAD_FILE}.tmp"))
    (run_dir / f".{RSC_HEAD_FILE}.tmp").replace(run_dir / RSC_HEAD_FILE)
    save_adapters(unet, run_dir, training_log)


def is_clip_run(run_dir: str | Path) -> bool:
    """A `finetune --clip` run (its CLIP towers are the ITC graphs)."""
    return (Path(run_dir) / CLIP_SUBDIR / "config.json").is_file() and (Path(run_dir) / ADAPTER_FILE).is_file()


@torch.no_grad()
def clip_similarity(clip_dir: str | Path, images, texts: list[str]) -> np.ndarray:
    """(images, texts) cosine similarities of a CLIP folder's embeddings, in torch with transformers' tokenizer:
    what `Engine.match(method="itc")` serves for a `finetune --clip` run (parity's reference)."""
    clip, tokenizer, spec = load_clip(clip_dir)
    z_i = F.normalize(image_features(clip, clip_pixels(images, spec)), dim=-1)
    z_t = F.normalize(text_features(clip, clip_ids(tokenizer, texts, spec)), dim=-1)
    return (z_i @ z_t.T).double().numpy()


@torch.no_grad()
def clip_image_embeddings(clip_dir: str | Path, images) -> np.ndarray:
    """(N, projection_dim) L2-normalised CLIP image embeddings (the collapse measures read these)."""
    clip, _, spec = load_clip(clip_dir)
    return F.normalize(image_features(clip, clip_pixels(images, spec)), dim=-1).double().numpy()
