"""Attention-based prompt learning for DSD matching (DESIGN.md §3): a rank-4 LoRA on the q, k, v and
out projections of the UNet's attention modules, trained so that the DSD attention score of an image
with its own caption beats the score with its hardest wrong caption by a margin.

Why LoRA and why these modules: the DSD score is ``logsumexp_tokens(scale·QKᵀ)`` of the cross-attention
layers, so q and k shape it directly and v/out shape the features the later layers see. Everything
else stays frozen, which keeps a few-shot run from forgetting the diffusion model. The adapter merges
into the UNet weights (``merge_lora``), so an exported engine is a plain UNet and the runtime needs no
change (``export_engine(..., adapters=RUN_DIR)``).

Optionally (``score_weights``) it also learns per-layer weights of the score, a softmax over one logit
per scored layer starting from the plain mean: layers differ in how much class signal their attention
carries. The engine pools the layers with them (``kernels.pool_layer_scores``); export records them
in the manifest.

A run directory holds ``adapter.safetensors`` (the LoRA weights, peft key names) and
``training_log.json`` (settings, per-step loss, wall time, the learned score weights or null).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from diffscore.engine.images import preprocess_batch
from diffscore.errors import EngineError
from diffscore.engine.manifest import sha256_files
from diffscore.engine.progress import progress_bar
from diffscore.kernels import DEFAULT_DSD_PRESET, DSD_PRESETS, DsdPreset, dsd_preset
from diffscore.reference.loading import (Components, add_noise, encode_images, encode_prompts, epsilon_hat,
                                         load_components,
    require_sd_conditioning)
from diffscore.reference.matching import pool_layers
from diffscore.reference.scoring_unet import ScoringUNet, preset_attention_layers

log = logging.getLogger("diffscore")

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER_FILE = "adapter.safetensors"
LOG_FILE = "training_log.json"


@dataclass
class PromptLearningConfig:
    shots: int = 5  # training images per class (a class = a distinct caption)
    steps: int = 200  # optimiser steps, one random timestep each
    lr: float = 1e-4  # AdamW, as DESIGN §3 fixes it
    weight_decay: float = 0.01  # AdamW's default
    rank: int = 4
    margin: float = 0.1  # hinge margin on the hardest negative
    batch_size: int = 16  # images per step; each is scored against its caption and every negative
    max_negatives: int = 15  # cap on negatives per image when there are many captions (random subset)
    seed: int = 0
    attention_layers: list[str] | None = None  # scored layers; None = the preset's
    # DSD preset (kernels.dsd): its score, layers, noise sampling and gradient clipping
    preset: str = DEFAULT_DSD_PRESET
    score_weights: bool = False  # also learn how much each scored layer counts (softmax weights, start uniform)


# --- the pieces -----------------------------------------------------------------------------------
def hinge_loss(positive: torch.Tensor, negatives: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """mean_b max(0, margin − s(x_b, true) + max_n s(x_b, neg_n)); positive (B,), negatives (B, N)."""
    assert negatives.ndim == 2 and negatives.shape[0] == positive.shape[0], (
        f"negatives must be (B, N) with B={positive.shape[0]}, got {tuple(negatives.shape)}")
    return torch.relu(margin - positive + negatives.max(dim=1).values).mean()


def add_lora(unet: torch.nn.Module, rank: int = 4) -> list[torch.nn.Parameter]:
    """Inject a LoRA (B = 0, so the UNet is unchanged until trained); freeze everything else.

    Seed torch before calling: the A matrices are drawn from torch's global generator."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise EngineError("prompt learning needs peft: pip install 'peft>=0.17'") from None
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=list(TARGET_MODULES)))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    assert params, "no attention projections matched the LoRA target modules"
    return params


def merge_lora(unet: torch.nn.Module) -> torch.nn.Module:
    """Fold the LoRA into the base weights (W += B·A·alpha/r) and drop the adapter layers: a plain UNet."""
    unet.fuse_lora()
    unet.unload_lora()
    return unet


def save_adapters(unet: torch.nn.Module, run_dir: Path, training_log: dict) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    # Written beside, then renamed: an interrupted save never leaves a run that looks complete.
    save_file(state, str(run_dir / f".{ADAPTER_FILE}.tmp"), metadata={"lora_rank": str(training_log["config"]["rank"])})
    (run_dir / f".{LOG_FILE}.tmp").write_text(json.dumps(training_log, indent=1))
    (run_dir / f".{LOG_FILE}.tmp").replace(run_dir / LOG_FILE)
    (run_dir / f".{ADAPTER_FILE}.tmp").replace(run_dir / ADAPTER_FILE)  # last: its presence marks a finished run


def load_adapters(unet: torch.nn.Module, run_dir: str | Path) -> dict:
    """Add the run's LoRA to ``unet`` (unmerged); returns the run's training log."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if not (run_dir / ADAPTER_FILE).is_file() or not (run_dir / LOG_FILE).is_file():
        raise EngineError(f"{run_dir} is not a prompt-learning run: expected {ADAPTER_FILE} and {LOG_FILE} "
                          "made by `diffscore train-prompts`")
    training_log = json.loads((run_dir / LOG_FILE).read_text())
    add_lora(unet, training_log["config"]["rank"])
    result = set_peft_model_state_dict(unet, load_file(str(run_dir / ADAPTER_FILE)))
    if getattr(result, "unexpected_keys", None):
        raise EngineError(f"{run_dir / ADAPTER_FILE} does not fit this UNet: unexpected {result.unexpected_keys[:3]}")
    unet.requires_grad_(False)
    return training_log


def apply_adapters(comp: Components, run_dir: str | Path) -> dict:
    """Load a run's LoRA into the components' UNet and merge it: what export does right after loading."""
    training_log = load_adapters(comp.unet, run_dir)
    merge_lora(comp.unet)
    comp.unet.eval()
    return {**training_log, "adapter_sha256": sha256_files([Path(run_dir) / ADAPTER_FILE])}


# --- data ------------------------------------------------------------------------------------------
@dataclass
class Pairs:
    images: list  # paths or uint8 arrays, anything engine.images accepts
    captions: list[str]


def read_pairs(path: str | Path) -> Pairs:
    """A JSONL file of {"image": path, "caption": str} lines; relative paths are relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"pairs file {path} does not exist; give a JSONL of {{\"image\": ..., \"caption\": ...}} "
                          "lines, or `demo`")
    images, captions = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, text = Path(row["image"]), str(row["caption"]).strip()
        except (json.JSONDecodeError, KeyError, TypeError):
            raise EngineError(f"{path}:{n} is not a JSON object with \"image\" and \"caption\"") from None
        if not text:
            raise EngineError(f"{path}:{n} has an empty caption")
        images.append(image if image.is_absolute() else path.parent / image)
        captions.append(text)
    if len(set(captions)) < 2:
        raise EngineError(f"{path} has {len(set(captions))} distinct caption(s); prompt learning needs at least 2 "
                          "(the other captions are the negatives)")
    return Pairs(images, captions)


def select_shots(captions: list[str], shots: int, seed: int = 0) -> np.ndarray:
    """Indices of `shots` random pairs per distinct caption (all of a caption's pairs if it has fewer)."""
    if shots < 1:
        raise EngineError(f"--shots must be ≥ 1, got {shots}")
    rng = np.random.default_rng(seed)
    captions = np.asarray(captions)
    picked = [rng.permutation(np.flatnonzero(captions == c))[:shots] for c in dict.fromkeys(captions.tolist())]
    return np.sort(np.concatenate(picked))


# --- training --------------------------------------------------------------------------------------
def pair_scores(comp: Components, scoring_unet: ScoringUNet, x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor,
                eps: torch.Tensor, null_emb: torch.Tensor, preset: DsdPreset,
                layer_weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) DSD scores of B (x_t, t, caption) pairs as the preset scores them (kernels.dsd): the captured
    layers' attention score pooled by their mean (or ``layer_weights``), with the empty prompt's averaged in
    and λ·(||ε − ε̂(∅)|| − ||ε − ε̂(text)||) added where the preset says so."""
    out, scores, *_ = scoring_unet(x_t, t.float(), emb)
    a = pool_layers(scores, layer_weights)
    if not (preset.pool_unconditional or preset.bias_weight):
        return a
    null_out, null_scores, *_ = scoring_unet(x_t, t.float(), null_emb.expand(len(x_t), -1, -1))
    if preset.pool_unconditional:
        a = (a + pool_layers(null_scores, layer_weights)) / 2
    if preset.bias_weight:
        def dist(o):
            return (eps - epsilon_hat(comp, o, x_t, t)).flatten(1).norm(dim=1)

        a = a + preset.bias_weight * (dist(null_out) - dist(out))
    return a


def train_prompts(model_dir: str | Path, pairs: Pairs, out_dir: str | Path, config: PromptLearningConfig | None = None,
                  progress: bool = True, comp: Components | None = None, overwrite: bool = False) -> dict:
    """Few-shot prompt learning; writes adapter.safetensors + training_log.json into out_dir, returns the log.

    Each step draws a batch of shot images and one timestep t; each image has a fixed ε (drawn once
    from the seed, shared by its true and negative captions so the comparison is fair, as in scoring)
    and is scored against its own caption and the other captions; the loss is the hinge on the
    hardest negative. `comp` (already loaded) is modified: its UNet gets the LoRA. ``config.preset``
    discffusion scores as that preset does and draws a new (t, ε) per (image, caption) pair, clipping
    the gradient norm at 1.0, as Discffusion's dsd_train.py does.
    """
    cfg = config or PromptLearningConfig()
    if cfg.steps < 1:
        raise EngineError(f"--steps must be ≥ 1, got {cfg.steps}")
    if not cfg.lr > 0:
        raise EngineError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.preset not in DSD_PRESETS:
        raise EngineError(f"unknown DSD preset {cfg.preset!r}; choose from {', '.join(DSD_PRESETS)}")
    out_dir = Path(out_dir)
    if (out_dir / ADAPTER_FILE).exists() and not overwrite:
        raise EngineError(f"{out_dir} already holds a trained adapter; pass --overwrite to replace it")
    index = select_shots(pairs.captions, cfg.shots, cfg.seed)
    comp = comp or load_components(model_dir)
    require_sd_conditioning(comp, "prompt learning")
    captions = [pairs.captions[i] for i in index]
    vocab = list(dict.fromkeys(captions))  # the distinct captions: positives and negatives
    target = torch.tensor([vocab.index(c) for c in captions])
    emb = encode_prompts(comp, vocab)  # (P, L, D), frozen text encoder: computed once
    x0 = encode_images(comp, torch.from_numpy(preprocess_batch([pairs.images[i] for i in index], comp.image_size,
                                                               comp.image_channels)))
    torch.manual_seed(cfg.seed)
    params = add_lora(comp.unet, cfg.rank)
    preset = dsd_preset(cfg.preset)
    layers = cfg.attention_layers or preset_attention_layers(comp.unet, cfg.preset)
    scoring_unet = ScoringUNet(comp.unet, layers).eval()  # no dropout: the no-grad pass = the grad pass
    null_emb = encode_prompts(comp, [""])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(cfg.seed))  # one fixed ε per image
    pair_noise = torch.Generator().manual_seed(cfg.seed + 1)  # discffusion: a new ε per pair
    abar = comp.alphas_cumprod.float()
    logits = torch.zeros(len(scoring_unet.attention_layers), requires_grad=True) if cfg.score_weights else None

    def weights() -> torch.Tensor | None:
        return None if logits is None else logits.softmax(0)

    optimiser = torch.optim.AdamW(params + ([logits] if cfg.score_weights else []), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    B, P = min(cfg.batch_size, len(x0)), len(vocab)
    N = min(P - 1, cfg.max_negatives)
    losses = []
    start = time.perf_counter()
    with progress_bar("train-prompts", cfg.steps, enabled=progress) as advance:
        for _ in range(cfg.steps):
            batch = torch.from_numpy(rng.choice(len(x0), B, replace=False))
            # (B, 1 + N) pairs: own caption, then N negatives; each pair's t and ε
            if preset.noise_per_pair:
                t = torch.from_numpy(rng.integers(0, comp.num_train_timesteps, (B, 1 + N)))
            else:
                t = torch.full((B, 1 + N), int(rng.integers(0, comp.num_train_timesteps)))
            negatives = torch.stack([_negatives(rng, int(target[b]), P, N) for b in batch])  # (B, N) caption ids
            captions_bn = torch.cat([target[batch, None], negatives], dim=1)
            eps = (torch.randn((B, 1 + N, *x0.shape[1:]), generator=pair_noise) if preset.noise_per_pair
                   else noise[batch, None].expand(-1, 1 + N, *x0.shape[1:]))
            x_t = add_noise(x0[batch, None], eps, abar, t)  # (B, 1 + N, C, H, W)

            def score(rows, cols):
                return pair_scores(comp, scoring_unet, x_t[rows, cols], t[rows, cols], emb[captions_bn[rows, cols]],
                                   eps[rows, cols], null_emb, preset, weights())

            # The hinge's (sub)gradient flows only through the positive and the hardest negative, so find
            # that negative without a graph, then backpropagate through 2B pairs instead of B(N+1).
            rows = torch.arange(B)
            with torch.no_grad():
                neg = score(rows.repeat_interleave(N), torch.arange(1, 1 + N).repeat(B)).view(B, N)
            scores = score(torch.cat([rows, rows]),
                           torch.cat([torch.zeros(B, dtype=torch.long), 1 + neg.argmax(dim=1)]))
            loss = hinge_loss(scores[:B], scores[B:, None], cfg.margin)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if preset.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, preset.clip_grad_norm)
            optimiser.step()
            losses.append(loss.item())
            advance(note=f"loss {np.mean(losses[-20:]):.4f}")
    seconds = time.perf_counter() - start
    comp.unet.eval()
    training_log = {
        "model": str(Path(model_dir).resolve()),
        "config": {**asdict(cfg), "attention_layers": scoring_unet.attention_layers},
        "lora": {"rank": cfg.rank, "alpha": cfg.rank, "target_modules": list(TARGET_MODULES),
                 "trainable_params": sum(p.numel() for p in params)},
        "pairs": len(index), "captions": vocab, "shot_indices": index.tolist(),
        "timestep_sampling": f"uniform integer in [0, {comp.num_train_timesteps}) per "
                             f"{'(image, caption) pair' if preset.noise_per_pair else 'step'}",
        "noise": ("a new ε per (image, caption) pair from torch.Generator(seed + 1)" if preset.noise_per_pair else
                  "one fixed ε per training image from torch.Generator(seed), shared by its captions"),
        "clip_grad_norm": preset.clip_grad_norm,
        "score_weights": None if logits is None else dict(zip(scoring_unet.attention_layers, weights().tolist())),
        "loss": losses, "final_loss_mean20": float(np.mean(losses[-20:])),
        "wall_time_s": round(seconds, 2), "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    save_adapters(comp.unet, out_dir, training_log)
    log.info("trained prompts on %d pairs (%d captions) for %d steps in %.1f s -> %s", len(index), P, cfg.steps,
             seconds, out_dir)
    return training_log


def _negatives(rng: np.random.Generator, true: int, P: int, N: int) -> torch.Tensor:
    others = np.array([p for p in range(P) if p != true])
    return torch.from_numpy(others if N == len(others) else rng.choice(others, N, replace=False))
