"""UniDiff-style joint fine-tuning (Dong et al. 2023, "UniDiff: Advancing Vision-Language Models with
Generative and Discriminative Learning"): three objectives trained at once on a small captioned set.

- ITC, image–text contrastive: a symmetric InfoNCE over the batch between an image embedding and a
  text embedding. Image: the UNet's block outputs (``blocks``) for the image noised once at a fixed
  step with a fixed, seeded ε (as the one-pass heads do), on the empty prompt, average-pooled over
  space, concatenated, a linear projection, L2-normalised. Text: the frozen text encoder's last
  hidden state averaged over the (padded) tokens, a linear projection, L2-normalised. Similarities
  are scaled by a learned logit scale (CLIP's: initialised at 1/0.07, capped at 100). A batch often
  holds several images of one caption: those pairs all count as positives (soft targets), so no
  true match is pushed away as a negative.
- IS, image synthesis: the model's own denoising loss, ‖ε − ε̂(x_t, t, caption)‖² with a uniform
  t and a fresh ε per image.
- RSC, reciprocal semantic consistency: the paper ties CLIP's visual features to the diffusion
  model's. A diffusers folder has no image encoder, so the two branches here are the contrastive
  branch's image embedding (fixed step, empty prompt) and the diffusion branch's visual features:
  the same blocks' outputs in the IS pass (random t, the caption), pooled and projected by their own
  linear map. RSC is a symmetric InfoNCE between the two over the batch, the same image being the
  only positive: each branch must pick its own image out of the other's. (The paper's full text was
  not available to us; its abstract names the objectives only, so this form is our choice.)

Trained: a LoRA (rank ``rank``) on the UNet's attention projections (prompt_learning.add_lora), the
three projections and the logit scale; the text encoder stays frozen (its LoRA is not built yet).

A run directory holds ``adapter.safetensors`` + ``training_log.json`` in prompt learning's format
(so ``diffscore export --adapters RUN`` merges the LoRA with no change) and ``itc_heads.safetensors``
(the projections; its presence makes export add the ITC graphs). The log records the objectives,
the per-step losses, the validation curve and the held-out-free settings.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffscore.engine.images import preprocess_batch
from diffscore.engine.progress import progress_bar
from diffscore.errors import EngineError
from diffscore.kernels import DEFAULT_DSD_PRESET, shared_noise
from diffscore.reference.features import block_shapes, check_blocks, check_steps
from diffscore.reference.loading import (Components, add_noise, encode_images, encode_prompts, epsilon_hat,
                                         load_components,
    require_sd_conditioning)
from diffscore.reference.prompt_learning import (ADAPTER_FILE, LOG_FILE, TARGET_MODULES, Pairs, add_lora, load_adapters,
                                                 save_adapters, select_shots)
from diffscore.reference.scoring_unet import ScoringUNet

log = logging.getLogger("diffscore")

OBJECTIVES = ("itc", "is", "rsc")
HEADS_FILE = "itc_heads.safetensors"
MAX_LOGIT_SCALE = 100.0  # CLIP's cap on exp(logit_scale)


@dataclass
class FinetuneConfig:
    objectives: tuple[str, ...] = OBJECTIVES  # any non-empty subset: the ablations
    shots: int = 10  # training pairs per caption
    steps: int = 300  # optimiser steps at most (early stopping may end sooner)
    lr: float = 3e-3  # AdamW, LoRA and heads alike (the demo's prompt learning rate)
    weight_decay: float = 0.01
    rank: int = 4  # LoRA rank on to_q, to_k, to_v, to_out.0
    batch_size: int = 32
    blocks: list[str] = field(default_factory=lambda: ["mid_block"])  # UNet blocks pooled into the image embedding
    noise_step: int = 50  # the contrastive branch's fixed noise step (one UNet pass per image at serving)
    dim: int = 64  # embedding size
    is_weight: float = 1.0  # loss = itc + is_weight · is + rsc_weight · rsc
    rsc_weight: float = 1.0
    clip: str | None = None  # a transformers CLIPModel folder: ITC on its towers, RSC against its image features
    clip_lr: float = 1e-4  # AdamW on the CLIP towers (--clip): full fine-tuning wants a smaller step than a LoRA
    val_shots: int = 2  # validation pairs per caption, drawn from pairs that are not shots (0: no early stopping)
    eval_every: int = 25  # steps between validation checks
    patience: int = 4  # checks without improvement before stopping; the best check's weights are kept
    seed: int = 0


# --- the objectives (each testable on a constructed batch) ---------------------------------------
def info_nce(a: torch.Tensor, b: torch.Tensor, positives: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE: ½ (CE over rows of scale·a bᵀ + CE over its columns), each row's target spread
    evenly over its positives. a (B, d), b (M, d) L2-normalised; positives (B, M) bool, none empty.
    With positives = identity this is CLIP's loss."""
    assert positives.shape == (len(a), len(b)), f"positives {tuple(positives.shape)} != ({len(a)}, {len(b)})"
    logits = scale * a @ b.T  # (B, M)
    p = positives.float()

    def ce(lg, target):
        return -(target / target.sum(1, keepdim=True) * lg.log_softmax(1)).sum(1).mean()

    return (ce(logits, p) + ce(logits.T, p.T)) / 2


def itc_loss(z_image: torch.Tensor, z_text: torch.Tensor, caption_ids: torch.Tensor, scale) -> torch.Tensor:
    """ITC over a batch: every (image, text) pair with the same caption is a positive."""
    return info_nce(z_image, z_text, caption_ids[:, None] == caption_ids[None, :], scale)


def rsc_loss(z_contrastive: torch.Tensor, z_diffusion: torch.Tensor, scale) -> torch.Tensor:
    """RSC: the two branches' embeddings of the same image are each other's only positive."""
    return info_nce(z_contrastive, z_diffusion, torch.eye(len(z_contrastive), dtype=torch.bool), scale)


def is_loss(eps: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
    """The denoising loss: mean squared error between the noise and its prediction."""
    return F.mse_loss(eps_hat, eps)


def pool_features(features: list[torch.Tensor]) -> torch.Tensor:
    """(B, ΣC): each block's (B, C, h, w) map averaged over space, concatenated in block order."""
    return torch.cat([f.mean(dim=(2, 3)) for f in features], dim=1)


class ItcHeads(nn.Module):
    """The projections: image (pooled block features), text (mean hidden state), diffusion branch (RSC)."""

    def __init__(self, feature_dim: int, text_dim: int, dim: int):
        super().__init__()
        self.image = nn.Linear(feature_dim, dim)
        self.text = nn.Linear(text_dim, dim)
        self.diffusion = nn.Linear(feature_dim, dim)  # training only: RSC's diffusion-branch projection
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def embed_image(self, features: list[torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.image(pool_features(features)), dim=-1)

    def embed_text(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(hidden.mean(dim=1)), dim=-1)  # (B, L, D) -> (B, dim)

    def embed_diffusion(self, features: list[torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.diffusion(pool_features(features)), dim=-1)


# --- the branches ----------------------------------------------------------------------------------
class Branches:
    """The UNet tapped at ``blocks``, the fixed contrastive noise, and the frozen text states."""

    def __init__(self, comp: Components, cfg: FinetuneConfig, captions: list[str]):
        self.comp, self.cfg = comp, cfg
        self.tap = ScoringUNet(comp.unet, attention_layers=[], feature_blocks=cfg.blocks).eval()
        shape = tuple(int(s) for s in (comp.unet.config.in_channels, comp.unet.config.sample_size,
                                       comp.unet.config.sample_size))
        self.eps0 = torch.from_numpy(shared_noise(cfg.seed, 1, shape)[0])  # the contrastive branch's fixed ε
        self.null = encode_prompts(comp, [""])  # (1, L, D)
        self.hidden = encode_prompts(comp, captions)  # (P, L, D), frozen text encoder: once
        self.abar = comp.alphas_cumprod

    def contrastive(self, x0: torch.Tensor) -> list[torch.Tensor]:
        """Block features of x0 noised at the fixed step with the fixed ε, on the empty prompt."""
        t = self.cfg.noise_step
        x_t = add_noise(x0, self.eps0, self.abar, t)
        _, _, *feats = self.tap(x_t, torch.full((len(x0),), float(t)), self.null.expand(len(x0), -1, -1))
        return feats

    def diffusion(self, x0, caption_ids, t, eps):
        """ε̂ and block features of x0 noised at t with ε, on each image's caption (the IS pass)."""
        x_t = add_noise(x0, eps, self.abar, t)
        out, _, *feats = self.tap(x_t, t.float(), self.hidden[caption_ids])
        return epsilon_hat(self.comp, out, x_t, t), feats

    def losses(self, heads: ItcHeads, x0, caption_ids, t, eps) -> dict[str, torch.Tensor]:
        """The enabled objectives on one batch."""
        on, out = set(self.cfg.objectives), {}
        scale = heads.scale()
        z_i = heads.embed_image(self.contrastive(x0)) if on & {"itc", "rsc"} else None
        if "itc" in on:
            out["itc"] = itc_loss(z_i, heads.embed_text(self.hidden[caption_ids]), caption_ids, scale)
        if on & {"is", "rsc"}:
            eps_hat, feats = self.diffusion(x0, caption_ids, t, eps)
            if "is" in on:
                out["is"] = is_loss(eps, eps_hat)
            if "rsc" in on:
                out["rsc"] = rsc_loss(z_i, heads.embed_diffusion(feats), scale)
        return out

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        w = {"itc": 1.0, "is": self.cfg.is_weight, "rsc": self.cfg.rsc_weight}
        return sum(w[k] * v for k, v in parts.items())


def check_config(cfg: FinetuneConfig, comp: Components | None = None) -> FinetuneConfig:
    """Every user mistake in the settings, one line each, before any work."""
    objectives = tuple(dict.fromkeys(cfg.objectives))
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives:
        raise EngineError(f"unknown objective(s) {', '.join(bad) or '(none given)'}; choose a comma-separated subset "
                          f"of {','.join(OBJECTIVES)}")
    for name in ("shots", "steps", "rank", "batch_size", "dim", "eval_every", "patience"):
        if getattr(cfg, name) < 1:
            raise EngineError(f"{name} must be ≥ 1, got {getattr(cfg, name)}")
    if cfg.val_shots < 0:
        raise EngineError(f"val_shots must be ≥ 0, got {cfg.val_shots}")
    if not cfg.lr > 0:
        raise EngineError(f"--lr must be > 0, got {cfg.lr}")
    if not cfg.clip_lr > 0:
        raise EngineError(f"--clip-lr must be > 0, got {cfg.clip_lr}")
    cfg.objectives = objectives
    if comp is not None:
        check_blocks(comp.unet, cfg.blocks)
        check_steps([cfg.noise_step], comp.num_train_timesteps)
    return cfg


# --- training --------------------------------------------------------------------------------------
def finetune(model_dir: str | Path, pairs: Pairs, out_dir: str | Path, config: FinetuneConfig | None = None,
             progress: bool = True, comp: Components | None = None, overwrite: bool = False) -> dict:
    """Fine-tune with the configured objectives; writes the run directory and returns its log.

    `comp` (already loaded) is modified: its UNet gets the LoRA (unmerged)."""
    cfg = check_config(config or FinetuneConfig())
    if cfg.clip is not None:  # UniDiff with CLIP's towers: reference/clip_finetune.py
        from diffscore.reference.clip_finetune import finetune_clip

        return finetune_clip(model_dir, pairs, out_dir, cfg, progress=progress, comp=comp, overwrite=overwrite)
    out_dir = Path(out_dir)
    if (out_dir / ADAPTER_FILE).exists() and not overwrite:
        raise EngineError(f"{out_dir} already holds a trained run; pass --overwrite to replace it")
    comp = comp or load_components(model_dir)
    require_sd_conditioning(comp, "finetune")
    check_config(cfg, comp)
    shots, val, vocab = split_pairs(pairs, cfg)

    def load(index):
        x0 = encode_images(comp, torch.from_numpy(preprocess_batch([pairs.images[i] for i in index], comp.image_size,
                                                                   comp.image_channels)))
        return x0, torch.tensor([vocab.index(pairs.captions[i]) for i in index])

    x0, cap = load(shots)
    branches = Branches(comp, cfg, vocab)
    torch.manual_seed(cfg.seed)
    params = add_lora(comp.unet, cfg.rank)
    shapes = block_shapes(comp, cfg.blocks)
    heads = ItcHeads(sum(shapes[b][0] for b in cfg.blocks), branches.hidden.shape[-1], cfg.dim)
    optimiser = torch.optim.AdamW(params + list(heads.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 2)  # the IS / RSC passes' t and ε
    T = comp.num_train_timesteps
    val_batch = None
    if len(val):
        vx0, vcap = load(val)
        vgen = torch.Generator().manual_seed(cfg.seed + 3)  # one fixed (t, ε) per validation image
        val_batch = (vx0, vcap, torch.randint(0, T, (len(vx0),), generator=vgen),
                     torch.randn(vx0.shape, generator=vgen))

    def step_losses(idx):
        t = torch.randint(0, T, (len(idx),), generator=gen)
        eps = torch.randn((len(idx), *x0.shape[1:]), generator=gen)
        return branches.losses(heads, x0[idx], cap[idx], t, eps)

    loop = train_loop(cfg, len(x0), optimiser, step_losses, branches.total,
                      None if val_batch is None else lambda: branches.losses(heads, *val_batch),
                      lambda step: _snapshot(params, heads, step), lambda state: _restore(params, heads, state),
                      progress)
    step, seconds, history, curve = loop["steps_run"], loop["seconds"], loop["history"], loop["validation"]
    comp.unet.eval()
    training_log = {
        "kind": "finetune",
        "model": str(Path(model_dir).resolve()),
        # prompt learning's keys, so `export --adapters` merges this LoRA as it merges theirs (DSD keeps its preset)
        "config": {**asdict(cfg), "objectives": list(cfg.objectives), "attention_layers": None,
                   "preset": DEFAULT_DSD_PRESET},
        "lora": {"rank": cfg.rank, "alpha": cfg.rank, "target_modules": list(TARGET_MODULES),
                 "trainable_params": sum(p.numel() for p in params)},
        "heads": {"file": HEADS_FILE, "feature_dim": heads.image.in_features, "text_dim": heads.text.in_features,
                  "dim": cfg.dim, "logit_scale": float(heads.scale().detach())},
        "pairs": len(shots), "captions": vocab, "shot_indices": shots.tolist(), "val_indices": val.tolist(),
        "objective_forms": {
            "itc": "symmetric InfoNCE over the batch, same-caption pairs positive (soft targets), learned logit scale",
            "is": "mean squared error of ε̂(x_t, t, caption), t uniform in [0, T), fresh ε",
            "rsc": "symmetric InfoNCE between the contrastive and diffusion branches' embeddings of the same image",
        },
        "steps_run": step, "best_step": loop["best_step"], "stopped_early": step < cfg.steps, "validation": curve,
        "loss": history, "wall_time_s": round(seconds, 2), "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    branches.tap.remove_hooks()
    save_run(comp.unet, heads, out_dir, training_log)
    log.info("fine-tuned (%s) on %d pairs for %d steps in %.1f s -> %s", ",".join(cfg.objectives), len(shots), step,
             seconds, out_dir)
    return training_log


def split_pairs(pairs: Pairs, cfg: FinetuneConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(shot indices, validation indices, captions trained on): `shots` pairs per caption, and `val_shots` more
    per caption from the rest for early stopping (only captions that have shots)."""
    shots = select_shots(pairs.captions, cfg.shots, cfg.seed)
    rest = np.setdiff1d(np.arange(len(pairs.captions)), shots)
    val = rest[:0]
    if cfg.val_shots and len(rest):
        val = rest[select_shots([pairs.captions[i] for i in rest], cfg.val_shots, cfg.seed + 1)]
    vocab = list(dict.fromkeys(pairs.captions[i] for i in shots))
    val = np.array([i for i in val if pairs.captions[i] in vocab], dtype=np.int64)  # captions it trains on
    return shots, val, vocab


def train_loop(cfg: FinetuneConfig, n: int, optimiser, step_losses, total, val_losses, snapshot, restore,
               progress: bool) -> dict:
    """The optimisation loop both fine-tunings share: seeded batches of `n` training pairs, the objectives'
    losses per step (`step_losses(index) -> {objective: loss}`), a validation check every `eval_every` steps
    (`val_losses()`, None: none), early stopping after `patience` checks without improvement, the best check's
    weights restored (`snapshot(step) -> state`, `restore(state)`)."""
    rng = np.random.default_rng(cfg.seed)
    B = min(cfg.batch_size, n)
    history: dict[str, list[float]] = {k: [] for k in cfg.objectives}
    curve, best, best_state, since_best = [], math.inf, None, 0
    start = time.perf_counter()
    step = 0
    with progress_bar("finetune", cfg.steps, enabled=progress) as advance:
        for step in range(1, cfg.steps + 1):
            parts = step_losses(torch.from_numpy(rng.choice(n, B, replace=False)))
            loss = total(parts)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            for k, v in parts.items():
                history[k].append(round(v.item(), 6))
            advance(note=" ".join(f"{k} {np.mean(v[-20:]):.3f}" for k, v in history.items()))
            if val_losses is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                with torch.no_grad():
                    vparts = val_losses()
                    vloss = total(vparts).item()
                curve.append({"step": step, "loss": round(vloss, 6),
                              **{k: round(v.item(), 6) for k, v in vparts.items()}})
                if vloss < best:
                    best, since_best = vloss, 0
                    best_state = snapshot(step)
                else:
                    since_best += 1
                    if since_best >= cfg.patience:
                        break
    seconds = time.perf_counter() - start
    if best_state is not None:
        restore(best_state)
    return {"steps_run": step, "best_step": best_state["step"] if best_state else step, "history": history,
            "validation": curve, "seconds": seconds}


def _snapshot(params, heads: ItcHeads, step: int) -> dict:
    return {"step": step, "lora": [p.detach().clone() for p in params],
            "heads": {k: v.detach().clone() for k, v in heads.state_dict().items()}}


def _restore(params, heads: ItcHeads, state: dict) -> None:
    with torch.no_grad():
        for p, saved in zip(params, state["lora"]):
            p.copy_(saved)
    heads.load_state_dict(state["heads"])


def save_run(unet: nn.Module, heads: ItcHeads, run_dir: Path, training_log: dict) -> None:
    """The heads first, then prompt learning's adapter + log (the adapter last marks a finished run)."""
    from safetensors.torch import save_file

    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{HEADS_FILE}.tmp"
    save_file({k: v.detach().contiguous() for k, v in heads.state_dict().items()}, str(tmp))
    tmp.replace(run_dir / HEADS_FILE)
    save_adapters(unet, run_dir, training_log)


def is_finetune_run(run_dir: str | Path) -> bool:
    return (Path(run_dir) / HEADS_FILE).is_file()


def load_run_heads(run_dir: str | Path) -> ItcHeads:
    """The run's projections (the LoRA is loaded apart: load_run, or export's apply_adapters)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if not is_finetune_run(run_dir):
        raise EngineError(f"{run_dir} is not a `diffscore finetune` run (no {HEADS_FILE})")
    h = read_run_log(run_dir)["heads"]
    heads = ItcHeads(h["feature_dim"], h["text_dim"], h["dim"])
    heads.load_state_dict(load_file(str(run_dir / HEADS_FILE)))
    return heads.eval()


def load_run(comp: Components, run_dir: str | Path) -> tuple[ItcHeads, dict]:
    """Add the run's LoRA to comp's UNet as an adapter (prompt_learning.apply_adapters merges) and rebuild its heads."""
    heads = load_run_heads(run_dir)
    training_log = load_adapters(comp.unet, run_dir)
    comp.unet.eval()
    return heads, training_log


# --- evaluation (torch truth) ----------------------------------------------------------------------
@torch.no_grad()
def itc_similarity(comp: Components, heads: ItcHeads, cfg: dict, images, texts: list[str]) -> np.ndarray:
    """(images, texts) cosine similarities of the ITC embeddings: what `Engine.match(method="itc")` serves."""
    c = FinetuneConfig(**{k: v for k, v in cfg.items() if k in FinetuneConfig.__dataclass_fields__})
    branches = Branches(comp, c, list(texts))
    try:
        x0 = encode_images(comp, torch.from_numpy(preprocess_batch(list(images), comp.image_size, comp.image_channels)))
        z_i = heads.embed_image(branches.contrastive(x0))
        z_t = heads.embed_text(branches.hidden)
    finally:
        branches.tap.remove_hooks()  # comp's UNet is the caller's: leave no feature hooks on it
    return (z_i @ z_t.T).double().numpy()


@torch.no_grad()
def denoising_loss(comp: Components, images, captions: list[str], timesteps: int = 4, seed: int = 0,
                   batch_size: int = 256) -> float:
    """Mean ‖ε − ε̂(x_t, t, caption)‖² over the images, `timesteps` seeded (t, ε) per image: the IS loss
    on held-out pairs, the "semantic collapse" check (it rises when fine-tuning forgets how to denoise)."""
    x0 = encode_images(comp, torch.from_numpy(preprocess_batch(list(images), comp.image_size, comp.image_channels)))
    vocab = list(dict.fromkeys(captions))
    emb = encode_prompts(comp, vocab)
    ids = torch.tensor([vocab.index(c) for c in captions]).repeat_interleave(timesteps)
    gen = torch.Generator().manual_seed(seed)
    x0 = x0.repeat_interleave(timesteps, dim=0)
    t = torch.randint(0, comp.num_train_timesteps, (len(x0),), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    total = 0.0
    for lo in range(0, len(x0), batch_size):
        sl = slice(lo, lo + batch_size)
        x_t = add_noise(x0[sl], eps[sl], comp.alphas_cumprod, t[sl])
        out = comp.unet(x_t, t[sl].float(), encoder_hidden_states=emb[ids[sl]], return_dict=False)[0]
        total += float(((epsilon_hat(comp, out, x_t, t[sl]) - eps[sl]) ** 2).mean(dim=(1, 2, 3)).sum())
    return total / len(x0)


def read_run_log(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / LOG_FILE).read_text())
