"""DiffDis (Huang et al., ICCV 2023, "DiffDis: Empowering Generative Diffusion Model with Cross-Modal
Discrimination Capability") on a diffscore model: image-text discrimination as a diffusion process over
the *text embedding*, conditioned on the image.

What the paper fixes and what we chose (measured in bench/diffdis.py, said in docs/methods.md):
- Image branch: the model's own UNet, **frozen** by default (the generative model is untouched), or, with
  ``unified`` (`train-diffdis --unified`, the paper's *unified training*), trained jointly: full fine-tuning
  of the UNet with ``generation_weight`` x diffusers' denoising loss + ``text_weight`` x the text-diffusion
  loss, its weights shipped with the text stream (``unet.*`` in the safetensors). Its block outputs (diffusers module
  names, default ``down_blocks.1, mid_block, up_blocks.1``: 4x4 and 8x8 maps on the demo) are tapped at
  one fixed noise step (t = 50, a fixed seeded ε shared by every image, the empty prompt), exactly as
  the one-pass heads tap them (reference/features.py).
- Text query: the caption's pooled embedding from the model's text encoder (the last hidden state at
  the first end-of-text token, CLIP's pooler), standardised per dimension with the training captions'
  mean and std (stored with the weights), so the diffusion runs on unit-scale values.
- Text stream, fusion "memory" (the frozen default): the noisy text query, projected to `dim` and summed with a
  sinusoidal embedding of its timestep, is one token that cross-attends to the tokens of every tapped
  block (each pooled to <= pool x pool, LayerNorm, linear, + a position embedding: several scales in
  one memory) in `depth` pre-LN blocks (cross-attention, MLP), then predicts the **clean** text query
  (x0-prediction, as the paper predicts the clean query). Loss: MSE to the clean query at a uniform
  t in [0, T) with the model's own ᾱ schedule (the diffusion loss; no contrastive term).
- Fusion "stages" (the unified default, the paper's dual stream): one fusion block per tapped block, in the
  UNet's forward order, block i reading only the tokens of UNet block i: the text stream advances with the
  UNet's pass, scale by scale (every down, mid and up block: all resolutions it runs at). The image stream
  does not read the text (DiffDis's fusion is one-way: text <- image), so hooks collect the block outputs in
  the one UNet pass and the stages run after it: the same numbers as interleaving them, and still one image
  pass for any number of texts.
- Inference (a) "denoise": per candidate text, the mean squared x0 error over `timesteps` shared
  (t, ε) (t on the Diffusion Classifier's grid, ε seeded and shared by all candidates and images):
  lowest wins; (b) "generate": the text query generated from a fixed seeded noise in `generate_steps`
  DDIM steps (η = 0, "trailing" spacing, x0-prediction), candidates ranked by cosine similarity; one
  image pass whatever the number of candidates in both modes.

Queries never attend to each other, so any number of (candidate, t, ε) queries ride on one image pass.
"""

from __future__ import annotations

import copy
import dataclasses
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

from diffscore.engine.scorers.diffdis import MODES, check_mode, eos_positions, score_timesteps  # noqa: F401  (one definition each)
from diffscore.engine.progress import progress_bar
from diffscore.errors import EngineError
from diffscore.kernels import shared_noise
from diffscore.engine.images import preprocess_batch
from diffscore.reference.features import (FeatureSpec, block_shapes, check_blocks, check_steps, extract_features,
                                          tappable_blocks)
from diffscore.reference.heads import Tokens
from diffscore.reference.loading import (Components, add_noise, encode_images, encode_prompts, epsilon_hat,
                                         require_sd_conditioning)
from diffscore.reference.scoring_unet import ScoringUNet

log = logging.getLogger("diffscore")

WEIGHTS, CONFIG = "diffdis.safetensors", "diffdis.json"
FROZEN_BLOCKS = ("down_blocks.1", "mid_block", "up_blocks.1")  # the frozen variant's default taps


# --- the text stream ----------------------------------------------------------------------------
@dataclass
class DiffDisConfig:
    blocks: list[str]  # UNet blocks tapped (diffusers module names), several scales
    shapes: list[list[int]]  # (C, h, w) of each tapped block's output
    text_dim: int  # width of the text encoder's embedding
    num_train_timesteps: int  # T of the model's schedule (the text diffusion uses the same ᾱ)
    eos_token_id: int  # the pooled embedding is the hidden state at the first of these tokens
    image_step: int = 50  # the fixed noise step of the image branch
    seed: int = 0  # of the image ε, the generation's start noise, the initialisation, the split and shuffling
    prompt: str = ""  # conditioning of the image pass (the empty prompt)
    dim: int = 64  # width of the text stream
    depth: int = 2  # fusion blocks (cross-attention + MLP)
    heads: int = 4
    pool: int = 4  # image tokens per block at most pool x pool
    timesteps: int = 5  # mode "denoise": shared (t, ε) per candidate
    generate_steps: int = 4  # mode "generate": DDIM steps
    mode: str = "denoise"  # the default inference mode
    fusion: str = "memory"  # "memory": every block in one memory, `depth` blocks | "stages": one block per tapped block
    unified: bool = False  # the UNet was trained with the text stream (its weights ship as unet.* beside it)
    source_sha256: str = ""  # the model folder it was trained on
    training: dict = field(default_factory=dict)  # data, options and the training summary

    @property
    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(blocks=list(self.blocks), steps=[self.image_step], seed=self.seed, prompt=self.prompt)


FUSIONS = ("memory", "stages")


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(...,) timesteps -> (..., dim) sinusoidal embedding (sin half, cos half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class FusionBlock(nn.Module):
    """Pre-LN: q + cross-attention(LN(q), image tokens), then q + MLP(LN(q)). Queries do not see each other."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} is not divisible by heads {heads}"
        self.heads = heads
        self.norm_q, self.norm_m, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x, memory):  # x (B, Q, D), memory (B, N, D)
        B, Q, D = x.shape
        N, d = memory.shape[1], D // self.heads
        q = self.q(self.norm_q(x)).reshape(B, Q, self.heads, d).transpose(1, 2)  # (B, heads, Q, d)
        k, v = self.kv(self.norm_m(memory)).reshape(B, N, 2, self.heads, d).permute(2, 0, 3, 1, 4)  # (B, heads, N, d)
        att = ((q @ k.transpose(-1, -2)) * d**-0.5).softmax(dim=-1)  # (B, heads, Q, N)
        x = x + self.out((att @ v).transpose(1, 2).reshape(B, Q, D))
        return x + self.mlp(self.norm2(x))


class DiffDis(nn.Module):
    """The text stream + its fixed parts (text standardisation, ᾱ, the generation's start noise).

    forward(features, text, noise, timestep) -> (error, similarity), features one (B, C, h, w) map per
    block, text (B, Q, text_dim) raw pooled embeddings, noise (B, Q, text_dim), timestep (B, Q):
    error (B, Q) = mean squared x0 error of each query at its (t, ε) (mode "denoise"),
    similarity (B, Q) = cosine of the generated text query with each standardised text (mode "generate").
    """

    def __init__(self, config: DiffDisConfig, alphas_cumprod: torch.Tensor | None = None):
        super().__init__()
        c = config
        self.config = c
        if c.fusion not in FUSIONS:
            raise EngineError(f"unknown DiffDis fusion {c.fusion!r}; choose from {', '.join(FUSIONS)}")
        self.tokens = nn.ModuleList(Tokens(s, c.dim, c.pool) for s in c.shapes)
        if c.fusion == "memory":
            self.memory_norm = nn.LayerNorm(c.dim)
        else:
            self.memory_norms = nn.ModuleList(nn.LayerNorm(c.dim) for _ in c.shapes)
        self.text_in = nn.Linear(c.text_dim, c.dim)
        self.time_mlp = nn.Sequential(nn.Linear(c.dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        n_blocks = c.depth if c.fusion == "memory" else len(c.shapes)
        self.blocks = nn.ModuleList(FusionBlock(c.dim, c.heads) for _ in range(n_blocks))
        self.unet_state: dict[str, torch.Tensor] | None = None  # unified: the trained UNet's weights (not a module)
        self.norm = nn.LayerNorm(c.dim)
        self.text_out = nn.Linear(c.dim, c.text_dim)
        abar = (torch.zeros(c.num_train_timesteps, dtype=torch.float64) if alphas_cumprod is None
                else alphas_cumprod.double())
        # computed in float64, kept in float32: kernels.add_noise's numbers
        self.register_buffer("sqrt_abar", abar.sqrt().float())
        self.register_buffer("sqrt_one_minus_abar", (1 - abar).sqrt().float())
        self.register_buffer("text_mean", torch.zeros(c.text_dim))  # set from the training captions
        self.register_buffer("text_std", torch.ones(c.text_dim))
        self.register_buffer("start_noise", torch.from_numpy(shared_noise(c.seed + 1, 1, (c.text_dim,))[0]))

    # the pieces
    def memory(self, features):
        """fusion "memory": (B, N, dim), the image tokens of every block, several scales in one sequence;
        "stages": one (B, n_i, dim) per tapped block, read by the fusion block of the same index."""
        tokens = [tok(f) for tok, f in zip(self.tokens, features)]
        if self.config.fusion == "memory":
            return self.memory_norm(torch.cat(tokens, dim=1))
        return [norm(t) for norm, t in zip(self.memory_norms, tokens)]

    def denoise(self, memory, e_t, t) -> torch.Tensor:
        """ê0 (B, Q, text_dim) of noisy standardised text queries e_t (B, Q, text_dim) at timesteps t (B, Q)."""
        x = self.text_in(e_t) + self.time_mlp(timestep_embedding(t, self.config.dim))
        memories = memory if isinstance(memory, list) else [memory] * len(self.blocks)
        for block, mem in zip(self.blocks, memories):
            x = block(x, mem)
        return self.text_out(self.norm(x))

    def standardise(self, text) -> torch.Tensor:
        return (text - self.text_mean) / self.text_std

    def noised(self, e0, noise, t) -> torch.Tensor:
        t = t.long()
        return self.sqrt_abar[t][..., None] * e0 + self.sqrt_one_minus_abar[t][..., None] * noise

    def generate(self, memory) -> torch.Tensor:
        """(B, text_dim) standardised text query generated from the fixed start noise: DDIM, η = 0."""
        B = (memory[0] if isinstance(memory, list) else memory).shape[0]
        e = self.start_noise.expand(B, 1, -1)
        for t, prev in generate_schedule(self.config.num_train_timesteps, self.config.generate_steps):
            e0 = self.denoise(memory, e, torch.full((B, 1), float(t), device=e.device))
            eps = (e - self.sqrt_abar[t] * e0) / self.sqrt_one_minus_abar[t]
            e = e0 if prev < 0 else self.sqrt_abar[prev] * e0 + self.sqrt_one_minus_abar[prev] * eps
        return e[:, 0]

    def error(self, memory, e0, noise, timestep) -> torch.Tensor:
        """(B, Q) denoising error of the standardised queries e0 noised with `noise` at `timestep`."""
        return (self.denoise(memory, self.noised(e0, noise, timestep), timestep) - e0).pow(2).mean(-1)

    def forward(self, features, text, noise, timestep):
        memory = self.memory(features)
        e0 = self.standardise(text)  # (B, Q, D)
        error = self.error(memory, e0, noise, timestep)
        similarity = F.cosine_similarity(self.generate(memory)[:, None], e0, dim=-1, eps=1e-8)  # (B, Q)
        return error, similarity


def generate_schedule(T: int, steps: int) -> list[tuple[int, int]]:
    """(t, previous t) pairs of a `steps`-step DDIM with "trailing" spacing: t = T−1, T−1−T/steps, ...;
    the last step's previous t is −1 (ᾱ = 1: the output is ê0)."""
    ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    return [(int(t), int(ts[i + 1]) if i + 1 < len(ts) else -1) for i, t in enumerate(ts)]


def score_noise(seed: int, n: int, text_dim: int) -> np.ndarray:
    """(n, text_dim) ε of the n shared timesteps of mode "denoise", shared by every candidate and image."""
    return shared_noise(seed, n, (text_dim,))


# --- text queries ---------------------------------------------------------------------------------
@torch.no_grad()
def pooled_text(comp: Components, texts: list[str]) -> torch.Tensor:
    """(P, text_dim) raw text queries: the last hidden state at the first end-of-text token (CLIP's pooler)."""
    tok = comp.tokenizer
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    hidden = comp.text_encoder(ids)[0]  # (P, L, D)
    pos = torch.from_numpy(eos_positions(ids.numpy(), int(tok.eos_token_id)))
    return hidden[torch.arange(len(texts)), pos]


# --- training -------------------------------------------------------------------------------------
@dataclass
class DiffDisTrainOptions:
    epochs: int = 150  # at most; early stopping on the validation loss usually ends sooner
    patience: int = 15  # epochs without a lower validation loss before stopping
    batch_size: int = 128
    lr: float = 1e-3  # AdamW, the text stream
    weight_decay: float = 0.01
    val_fraction: float = 0.1  # of the distinct images (all captions of an image on one side), seeded
    # unified training only (config.unified): loss = generation_weight x denoising + text_weight x text diffusion
    generation_weight: float = 1.0
    text_weight: float = 1.0
    unet_lr: float = 1e-4  # AdamW on every UNet weight (no weight decay): a fine-tune of a trained model
    caption_dropout: float = 0.1  # the generation loss's empty caption, so the unconditional model stays trained


def unique_images(images) -> tuple[list, np.ndarray]:
    """(distinct images, index of each input's distinct image): an image captioned several times (the same
    path, or equal pixel arrays) goes through the UNet once."""
    seen: dict = {}
    index = []
    for img in images:
        key = str(Path(img).resolve()) if isinstance(img, (str, Path)) else (
            np.asarray(img).shape, np.asarray(img).dtype.str, np.ascontiguousarray(img).tobytes())
        index.append(seen.setdefault(key, len(seen)))
    first = {v: i for i, v in reversed(list(enumerate(index)))}
    return [images[first[u]] for u in range(len(seen))], np.array(index, dtype=np.int64)


def unified_loss(model: DiffDis, scoring: ScoringUNet, comp: Components, x0, x_img, cond, empty, text, gen_t, gen_eps,
                 t, eps, generation_weight: float = 1.0, text_weight: float = 1.0):
    """(total, generation, text) losses of one unified batch of B pairs, both tasks in ONE pass of the shared UNet
    (2B rows, the blocks' outputs taken by `scoring`'s hooks):
    generation = diffusers' text-to-image training loss, MSE(ε̂(x_t, t, caption), ε) at x_t = add_noise(x0, ε, t);
    text = the text-diffusion loss, MSE of the text stream's ê0 to the standardised caption query, reading the
    blocks of the image's pass at the image step (x_img, the fixed ε, the empty prompt: what the engine runs).
    x0, gen_eps (B, C, H, W); x_img (B, C, H, W); cond (B, L, D); empty (1, L, D); text, eps (B, 1, text_dim);
    gen_t (B,); t (B, 1)."""
    B = len(x0)
    x_t = add_noise(x0, gen_eps, comp.alphas_cumprod, gen_t)
    timestep = torch.cat([gen_t.float(), torch.full((B,), float(model.config.image_step))])
    out, _, *feats = scoring(torch.cat([x_t, x_img]), timestep, torch.cat([cond, empty.expand(B, -1, -1)]))
    generation = F.mse_loss(epsilon_hat(comp, out[:B], x_t, gen_t), gen_eps)
    text_loss = model.error(model.memory([f[B:] for f in feats]), model.standardise(text), eps, t).mean()
    return generation_weight * generation + text_weight * text_loss, generation, text_loss


def train_diffdis(comp: Components, images, captions: list[str], config: DiffDisConfig,
                  options: DiffDisTrainOptions = DiffDisTrainOptions(), progress: bool = False) -> DiffDis:
    """Train the text stream on (image, caption) pairs: on the frozen UNet's features (computed once), or with
    config.unified together with a copy of the UNet (unified_loss; comp.unet is left as it is). Seeded, early
    stopping on a validation split of the images with the best epoch's weights kept. Fills config.training.
    Deterministic for a given seed and thread count."""
    if len(images) != len(captions) or len(images) < 2:
        raise EngineError(f"{len(images)} images and {len(captions)} captions: need one caption per image, "
                          f"at least 2 pairs")
    check_blocks(comp.unet, config.blocks)
    check_steps([config.image_step], comp.num_train_timesteps)
    start = time.perf_counter()
    distinct, image_of = unique_images(images)
    vocab = list(dict.fromkeys(captions))
    text = pooled_text(comp, vocab)  # (V, D)
    caption_of = torch.tensor([vocab.index(c) for c in captions])
    rng = np.random.default_rng(config.seed)
    val_images = rng.permutation(len(distinct))[: int(round(options.val_fraction * len(distinct)))]
    is_val = np.isin(image_of, val_images)
    tr, va = torch.from_numpy(np.flatnonzero(~is_val)), torch.from_numpy(np.flatnonzero(is_val))
    torch.manual_seed(config.seed)
    model = DiffDis(config, comp.alphas_cumprod)
    train_text = text[caption_of[tr]]
    model.text_mean.copy_(train_text.mean(0))
    model.text_std.copy_(train_text.std(0).clamp_min(1e-6))
    image_of = torch.from_numpy(image_of)
    T, D = comp.num_train_timesteps, config.text_dim
    if config.unified:
        unet = copy.deepcopy(comp.unet).train().requires_grad_(True)
        scoring = ScoringUNet(unet, attention_layers=[], feature_blocks=list(config.blocks))
        x0 = encode_images(comp, torch.from_numpy(preprocess_batch(distinct, comp.image_size, comp.image_channels)))
        image_eps = torch.from_numpy(shared_noise(config.seed, 1, tuple(x0.shape[1:])))  # the engine's fixed ε
        x_img = add_noise(x0, image_eps, comp.alphas_cumprod, config.image_step)
        with torch.no_grad():
            cond, empty = encode_prompts(comp, vocab), encode_prompts(comp, [""])
        params = [{"params": model.parameters(), "lr": options.lr, "weight_decay": options.weight_decay},
                  {"params": unet.parameters(), "lr": options.unet_lr, "weight_decay": 0.0}]
    else:
        unet = None
        feats = extract_features(comp, distinct, config.feature_spec, progress=progress)
        feats = [feats[b][:, 0] for b in config.blocks]  # (U, C, h, w) each
        params = [{"params": model.parameters()}]
    gen = torch.Generator().manual_seed(config.seed)

    def draw(n, g):
        """The random part of n pairs' loss: the text's (t, ε); unified: the image's (t, ε), caption dropout."""
        d = {"t": torch.randint(0, T, (n, 1), generator=g), "eps": torch.randn(n, 1, D, generator=g)}
        if unet is not None:
            d.update(gen_t=torch.randint(0, T, (n,), generator=g), gen_eps=torch.randn(n, *x0.shape[1:], generator=g),
                     drop=torch.rand(n, generator=g) < options.caption_dropout)
        return d

    val_draws = draw(len(va), torch.Generator().manual_seed(config.seed + 2))  # fixed per validation pair: stable
    opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)

    def loss_of(rows, d):
        """(the loss to minimise, its parts)"""
        if unet is None:
            queries = text[caption_of[rows]][:, None]
            return model_error(model, [f[image_of[rows]] for f in feats], queries, d["eps"], d["t"]).mean(), {}
        img = image_of[rows]
        c = torch.where(d["drop"][:, None, None], empty, cond[caption_of[rows]])
        total, g_loss, t_loss = unified_loss(model, scoring, comp, x0[img], x_img[img], c, empty,
                                             text[caption_of[rows]][:, None], d["gen_t"], d["gen_eps"],
                                             d["t"], d["eps"],
                                             options.generation_weight, options.text_weight)
        return total, {"generation": g_loss.item(), "text": t_loss.item()}

    def state():
        return ({k: v.clone() for k, v in model.state_dict().items()},
                None if unet is None else {k: v.detach().clone() for k, v in unet.state_dict().items()})

    best = (math.inf, 0, None, {})
    epoch, losses = 0, []
    title = "train-diffdis" + (" --unified" if unet is not None else "")
    with progress_bar(title, options.epochs, progress) as advance:
        for epoch in range(1, options.epochs + 1):
            model.train()
            for batch in tr[torch.randperm(len(tr), generator=gen)].split(options.batch_size):
                loss, _ = loss_of(batch, draw(len(batch), gen))
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            if not len(va):
                advance(note=f"loss {np.mean(losses[-20:]):.4f}")
                continue
            model.eval()
            with torch.no_grad():
                val_loss, parts = loss_of(va, val_draws)
                val_loss = float(val_loss)
            advance(note=f"validation loss {val_loss:.4f}" + "".join(f", {k} {v:.4f}" for k, v in parts.items()))
            if val_loss < best[0]:
                best = (val_loss, epoch, state(), parts)
            elif epoch - best[1] >= options.patience:
                break
    if best[2] is not None:
        model.load_state_dict(best[2][0])
        if unet is not None:
            unet.load_state_dict(best[2][1])
    if unet is not None:
        scoring.remove_hooks()
        model.unet_state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    model.eval()
    config.training = {**config.training, "pairs": len(tr), "val_pairs": len(va), "images": len(distinct),
                       "captions": len(vocab), "epochs": epoch, "best_epoch": best[1] or epoch,
                       "val_loss": best[0] if len(va) else None,
                       "final_train_loss_mean20": float(np.mean(losses[-20:])),
                       **({"val_" + k: v for k, v in best[3].items()}),
                       **{k: v for k, v in asdict(options).items() if k != "epochs"}, "max_epochs": options.epochs,
                       "wall_time_s": round(time.perf_counter() - start, 2),
                       "torch_threads": torch.get_num_threads()}
    log.info("trained DiffDis: %s", config.training)
    return model


def image_branch(comp: Components, model: DiffDis) -> nn.Module:
    """The UNet the text stream reads: the model's own (frozen DiffDis) or a copy with the unified run's weights."""
    if not model.config.unified:
        return comp.unet
    if model.unet_state is None:
        raise EngineError("this unified DiffDis run has no UNet weights (unet.* in its safetensors); retrain it")
    unet = copy.deepcopy(comp.unet)
    unet.load_state_dict(model.unet_state)
    return unet.eval()


def model_error(model: DiffDis, features, text, noise, t) -> torch.Tensor:
    """model.forward's denoising error without the generation (training needs only it)."""
    return model.error(model.memory(features), model.standardise(text), noise, t)


# --- files ----------------------------------------------------------------------------------------
def save_diffdis(model: DiffDis, out_dir: str | Path) -> Path:
    """diffdis.safetensors (weights and fixed buffers) + diffdis.json (config + training summary); the
    weights file is renamed into place last, so a folder with it is complete."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f".{CONFIG}.tmp").write_text(json.dumps(asdict(model.config), indent=1))
    (out_dir / f".{CONFIG}.tmp").replace(out_dir / CONFIG)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"unet.{k}": v.contiguous() for k, v in (model.unet_state or {}).items()})  # unified
    save_file(tensors, str(out_dir / f".{WEIGHTS}.tmp"))
    (out_dir / f".{WEIGHTS}.tmp").replace(out_dir / WEIGHTS)
    return out_dir


def load_diffdis(folder: str | Path, weights: str = WEIGHTS, config: str = CONFIG) -> DiffDis:
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (config, weights):
        if not (folder / name).is_file():
            raise EngineError(f"{folder} is not a DiffDis run (no {name}); make one with `diffscore train-diffdis`")
    try:
        cfg = DiffDisConfig(**json.loads((folder / config).read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise EngineError(
            f"{folder / config} is not a DiffDis config ({e}); retrain with `diffscore train-diffdis`") from None
    model = DiffDis(cfg)
    tensors = load_file(str(folder / weights))
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("unet.")})
    if cfg.unified:
        model.unet_state = {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}
    return model.eval()


# --- the torch reference of both inference modes --------------------------------------------------
@torch.no_grad()
def diffdis_scores_reference(comp: Components, model: DiffDis, images, texts: list[str], mode: str | None = None,
                             timesteps: int | None = None, seed: int = 0) -> np.ndarray:
    """(images, texts) scores, higher = better: −mean x0 error over the shared (t, ε) ("denoise") or the
    cosine similarity with the generated text query ("generate"). The engine computes the same."""
    cfg = model.config
    mode = check_mode(mode or cfg.mode)
    comp = dataclasses.replace(comp, unet=image_branch(comp, model))
    feats = extract_features(comp, images, cfg.feature_spec)
    feats = [feats[b][:, 0] for b in cfg.blocks]
    text = pooled_text(comp, texts)  # (P, D)
    N, P = len(feats[0]), len(texts)
    if mode == "generate":
        _, sim = model(feats, text.expand(N, -1, -1), torch.zeros(N, P, cfg.text_dim), torch.zeros(N, P))
        return sim.double().numpy()
    ts = score_timesteps(cfg.num_train_timesteps, timesteps or cfg.timesteps)
    eps = torch.from_numpy(score_noise(seed, len(ts), cfg.text_dim))  # (K, D)
    K = len(ts)
    q_text = text.repeat_interleave(K, 0).expand(N, -1, -1)  # (N, P·K, D), candidate-major
    q_eps = eps.repeat(P, 1).expand(N, -1, -1)
    q_t = torch.tensor(ts, dtype=torch.float32).repeat(P).expand(N, -1)
    error = model_error(model, feats, q_text, q_eps, q_t)
    return -error.double().reshape(N, P, K).mean(-1).numpy()


def train_diffdis_run(model_dir: str | Path, images, captions: list[str], out_dir: str | Path, *,
                      blocks: list[str] | None = None, image_step: int = 50, seed: int = 0, unified: bool = False,
                      options: DiffDisTrainOptions = DiffDisTrainOptions(), overwrite: bool = False,
                      progress: bool = True, data: dict | None = None, **model_options) -> DiffDis:
    """`diffscore train-diffdis`: load the model, train, write out_dir (diffdis.safetensors + diffdis.json).
    blocks: default FROZEN_BLOCKS, or with `unified` every block the UNet runs (all resolutions).
    model_options: dim, depth, heads, pool, timesteps, generate_steps, mode, fusion (default "stages" when
    unified, else "memory"). data: a note on the data kept in the config's training record."""
    from diffscore.engine.manifest import folder_sha256
    from diffscore.reference.loading import load_components

    out_dir = Path(out_dir)
    if (out_dir / WEIGHTS).exists() and not overwrite:
        raise EngineError(f"{out_dir} already holds a DiffDis run; pass --overwrite to replace it")
    if "mode" in model_options:
        check_mode(model_options["mode"])
    comp = load_components(model_dir)
    require_sd_conditioning(comp, "DiffDis")
    blocks = check_blocks(comp.unet, list(blocks or (tappable_blocks(comp.unet) if unified else FROZEN_BLOCKS)))
    check_steps([image_step], comp.num_train_timesteps)
    model_options.setdefault("fusion", "stages" if unified else "memory")
    if model_options["fusion"] == "stages":
        model_options["depth"] = len(blocks)  # one fusion block per tapped block
    shapes = block_shapes(comp, blocks)
    config = DiffDisConfig(blocks=blocks, shapes=[shapes[b] for b in blocks],
                           text_dim=int(comp.text_encoder.config.hidden_size),
                           num_train_timesteps=comp.num_train_timesteps, eos_token_id=int(comp.tokenizer.eos_token_id),
                           image_step=image_step, seed=seed, source_sha256=folder_sha256(Path(model_dir)),
                           unified=unified, training={"data": data or {}}, **model_options)
    score_timesteps(config.num_train_timesteps, config.timesteps)  # a bad count fails before training
    model = train_diffdis(comp, images, captions, config, options, progress=progress)
    save_diffdis(model, out_dir)
    return model
