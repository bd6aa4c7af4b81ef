"""The one-pass classifier (DESIGN.md §3, DifFormer): heads trained on UNet block features.

The Diffusion Classifier needs classes × timesteps UNet passes per image; a head needs one pass per
chosen noise step. Features are the outputs of named UNet blocks (diffusers module names such as
``mid_block`` or ``up_blocks.1``) for the image noised once per step with a fixed ε (seeded, shared
by every image, from kernels/), conditioned on the empty prompt unless set.

Heads (each takes one (B, steps, C, h, w) tensor per block, in the order of ``blocks``):
- ``linear``: average-pool each map to 2×2, standardise, one linear layer (the probe).
- ``attention``: one block at one step: pool to ≤16×16 → LayerNorm → 1×1 conv to D → tokens (+ a
  learned position embedding) + CLS → 2 pre-LN transformer blocks → CLS → linear.
- ``difformer``: the tokens of every block of one step form one sequence; the transformer is shared
  across steps; the steps' CLS outputs are concatenated → linear.

Pooling is a product with fixed averaging matrices (exactly adaptive average pooling), so any map
size exports to ONNX as two MatMuls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffscore.engine.images import preprocess_batch
from diffscore.errors import EngineError
from diffscore.engine.progress import progress_bar
from diffscore.kernels import shared_noise
from diffscore.reference.loading import Components, encode_images, encode_prompts
from diffscore.reference.scoring_unet import ScoringUNet

log = logging.getLogger("diffscore")

HEAD_KINDS = ("linear", "attention", "difformer")
WEIGHTS, CONFIG = "head.safetensors", "head.json"


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


@torch.no_grad()
def extract_features(comp: Components, images, spec: FeatureSpec, batch_size: int = 256,
                     progress: bool = False) -> dict[str, torch.Tensor]:
    """{block: (N, steps, C, h, w)} block outputs of every image at every step (rows image-major)."""
    blocks = check_blocks(comp.unet, spec.blocks)
    steps = check_steps(spec.steps, comp.num_train_timesteps)
    pixels = preprocess_batch(images, comp.image_size, comp.image_channels)
    x0 = encode_images(comp, torch.from_numpy(pixels))  # (N, C, H, W)
    S = len(steps)
    eps = torch.from_numpy(shared_noise(spec.seed, S, tuple(x0.shape[1:])))  # (S, C, H, W)
    t = torch.tensor(steps)
    abar = comp.alphas_cumprod[t]
    a = abar.sqrt().float().view(-1, 1, 1, 1)
    s = (1 - abar).sqrt().float().view(-1, 1, 1, 1)
    emb = encode_prompts(comp, [spec.prompt])  # (1, L, D)
    unet = ScoringUNet(comp.unet, attention_layers=[], feature_blocks=blocks)
    per_image = max(1, batch_size // S)
    out: dict[str, list[torch.Tensor]] = {b: [] for b in blocks}
    try:
        with progress_bar("features", len(x0), progress) as advance:
            for lo in range(0, len(x0), per_image):
                x = x0[lo : lo + per_image]
                x_t = (a[None] * x[:, None] + s[None] * eps[None]).flatten(0, 1)  # (n*S, C, H, W), image-major
                _, _, *feats = unet(x_t, t.repeat(len(x)).float(), emb.expand(len(x_t), -1, -1))
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


# --- heads --------------------------------------------------------------------------------------
def pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) rows averaging the windows of adaptive average pooling (torch's bounds)."""
    m = torch.zeros(n_out, n_in)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, math.ceil((i + 1) * n_in / n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


class Pool(nn.Module):
    """(B, C, h, w) -> (B, C, min(h, size), min(w, size)): adaptive average pooling as two MatMuls."""

    def __init__(self, h: int, w: int, size: int):
        super().__init__()
        self.out = (min(h, size), min(w, size))
        self.register_buffer("rows", pool_matrix(h, self.out[0]), persistent=False)
        self.register_buffer("cols", pool_matrix(w, self.out[1]).T.contiguous(), persistent=False)
        self.identity = self.out == (h, w)

    def forward(self, x):
        return x if self.identity else self.rows @ x @ self.cols


class LinearProbe(nn.Module):
    """Each block's map avg-pooled to 2×2, all steps and blocks concatenated, standardised → linear."""

    def __init__(self, shapes: list[list[int]], n_steps: int, n_classes: int, pool: int = 2):
        super().__init__()
        self.pools = nn.ModuleList(Pool(h, w, pool) for _, h, w in shapes)
        n_in = sum(n_steps * c * p.out[0] * p.out[1] for (c, _, _), p in zip(shapes, self.pools))
        self.register_buffer("mean", torch.zeros(n_in))  # set from the training features by fit_inputs
        self.register_buffer("std", torch.ones(n_in))
        self.fc = nn.Linear(n_in, n_classes)

    def pooled(self, *features):
        return torch.cat([p(f.flatten(0, 1)).reshape(f.shape[0], -1) for p, f in zip(self.pools, features)], dim=1)

    def fit_inputs(self, *features) -> None:
        x = self.pooled(*features)
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-6))

    def forward(self, *features):
        return self.fc((self.pooled(*features) - self.mean) / self.std)


class Tokens(nn.Module):
    """(B, C, h, w) -> (B, n, D): pool to ≤16×16, LayerNorm over C, 1×1 conv (per-token linear) to D, + position."""

    def __init__(self, shape: list[int], dim: int, pool: int = 16):
        super().__init__()
        c, h, w = shape
        self.pool = Pool(h, w, pool)
        self.norm = nn.LayerNorm(c)
        self.proj = nn.Linear(c, dim)  # a 1×1 convolution on the token grid
        self.pos = nn.Parameter(torch.randn(1, self.pool.out[0] * self.pool.out[1], dim) * 0.02)

    def forward(self, x):
        x = self.pool(x).flatten(2).transpose(1, 2)  # (B, n, C)
        return self.proj(self.norm(x)) + self.pos


class Block(nn.Module):
    """Pre-LN transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} is not divisible by heads {heads}"
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        B, n, D = x.shape
        d = D // self.heads
        q, k, v = self.qkv(self.norm1(x)).reshape(B, n, 3, self.heads, d).permute(2, 0, 3, 1, 4)  # (B, heads, n, d) each
        att = ((q @ k.transpose(-1, -2)) * d**-0.5).softmax(dim=-1)  # (B, heads, n, n)
        x = x + self.out((att @ v).transpose(1, 2).reshape(B, n, D))
        return x + self.mlp(self.norm2(x))


class DifFormerHead(nn.Module):
    """Tokens of every block of a step + CLS → shared transformer; per-step CLS concatenated → linear."""

    def __init__(self, shapes: list[list[int]], n_steps: int, n_classes: int, dim: int = 64, depth: int = 2,
                 heads: int = 4, pool: int = 16):
        super().__init__()
        self.tokens = nn.ModuleList(Tokens(s, dim, pool) for s in shapes)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(n_steps * dim, n_classes)

    def forward(self, *features):  # each (B, S, C, h, w)
        B, S = features[0].shape[:2]
        x = torch.cat([tok(f.flatten(0, 1)) for tok, f in zip(self.tokens, features)], dim=1)  # (B*S, n, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        cls = self.norm(self.blocks(x)[:, 0])  # (B*S, D)
        return self.fc(cls.reshape(B, -1))  # (B, S*D) -> (B, classes)


class AttentionHead(DifFormerHead):
    """The per-block attention head: a DifFormer over one block at one step."""

    def __init__(self, shapes, n_steps, n_classes, **kw):
        check_kind("attention", len(shapes), n_steps)
        super().__init__(shapes, n_steps, n_classes, **kw)


def check_kind(kind: str, n_blocks: int, n_steps: int) -> None:
    if kind not in HEAD_KINDS:
        raise EngineError(f"unknown head {kind!r}; choose from {', '.join(HEAD_KINDS)}")
    if kind == "attention" and (n_blocks != 1 or n_steps != 1):
        raise EngineError(f"the attention head reads one block at one step, got {n_blocks} blocks and {n_steps} "
                          "steps; use --head difformer to fuse several")


@dataclass
class HeadConfig:
    kind: str  # linear | attention | difformer
    labels: list[str]  # class names, in logit order
    features: FeatureSpec
    shapes: list[list[int]]  # (C, h, w) of each block's output, in block order
    dim: int = 64  # token width D (attention, difformer)
    depth: int = 2  # transformer blocks
    heads: int = 4  # attention heads per block
    pool: int = 16  # token grid at most pool × pool (attention, difformer); the probe pools to 2×2
    source_sha256: str = ""  # content hash of the model folder the features came from
    training: dict = field(default_factory=dict)  # summary: images, epochs, validation accuracy

    def __post_init__(self):
        if isinstance(self.features, dict):
            self.features = FeatureSpec(**self.features)
        check_kind(self.kind, len(self.features.blocks), len(self.features.steps))

    def build(self) -> nn.Module:
        S, K = len(self.features.steps), len(self.labels)
        if self.kind == "linear":
            return LinearProbe(self.shapes, S, K)
        cls = AttentionHead if self.kind == "attention" else DifFormerHead
        return cls(self.shapes, S, K, dim=self.dim, depth=self.depth, heads=self.heads, pool=self.pool)


# --- training -----------------------------------------------------------------------------------
@dataclass
class TrainOptions:
    epochs: int = 100  # at most; early stopping on the validation loss usually ends sooner
    patience: int = 10  # epochs without a lower validation loss before stopping
    batch_size: int = 64
    lr: float | None = None  # AdamW; None: 1e-2 for the linear probe, 1e-3 for the transformer heads
    weight_decay: float = 0.05
    val_fraction: float = 0.1  # stratified and seeded; 0 trains every epoch, no early stopping
    seed: int = 0  # head initialisation, split and shuffling


def validation_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: round(fraction · n) of each class (at least 1 where a class has ≥ 2)."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = 0 if fraction <= 0 or len(idx) < 2 else min(len(idx) - 1, max(1, round(fraction * len(idx))))
        val.extend(idx[:n])
    val = np.sort(np.array(val, dtype=np.int64))
    return np.setdiff1d(np.arange(len(labels)), val), val


def train_head(features: dict[str, torch.Tensor], labels, config: HeadConfig, options: TrainOptions = TrainOptions(),
               progress: bool = False) -> nn.Module:
    """Train config's head on {block: (N, S, C, h, w)} features; seeded, early stopping, best weights kept.

    Fills config.training with the summary. Deterministic for a given seed and thread count.
    """
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    inputs = [features[b].float() for b in config.features.blocks]
    assert all(len(x) == len(labels) for x in inputs), f"{[len(x) for x in inputs]} features vs {len(labels)} labels"
    tr, va = (torch.from_numpy(i) for i in validation_split(labels.numpy(), options.val_fraction, options.seed))
    torch.manual_seed(options.seed)
    head = config.build()
    if isinstance(head, LinearProbe):
        head.fit_inputs(*(x[tr] for x in inputs))
    lr = options.lr or (1e-2 if config.kind == "linear" else 1e-3)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=options.weight_decay)
    gen = torch.Generator().manual_seed(options.seed)
    best = (math.inf, 0, None, float("nan"))  # (val loss, epoch, state, val accuracy)
    epoch = 0
    with progress_bar(f"train {config.kind} head", options.epochs, progress) as advance:
        for epoch in range(1, options.epochs + 1):
            head.train()
            for batch in tr[torch.randperm(len(tr), generator=gen)].split(options.batch_size):
                loss = F.cross_entropy(head(*(x[batch] for x in inputs)), labels[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
            if len(va) == 0:
                advance(note=f"loss {float(loss):.4f}")
                continue
            head.eval()
            with torch.no_grad():
                logits = head(*(x[va] for x in inputs))
            val_loss = float(F.cross_entropy(logits, labels[va]))
            advance(note=f"validation loss {val_loss:.4f}")
            if val_loss < best[0]:
                acc = float((logits.argmax(1) == labels[va]).float().mean())
                best = (val_loss, epoch, {k: v.clone() for k, v in head.state_dict().items()}, acc)
            elif epoch - best[1] >= options.patience:
                break
    if best[2] is not None:
        head.load_state_dict(best[2])
    head.eval()
    config.training = {"images": len(tr), "val_images": len(va), "epochs": epoch, "best_epoch": best[1] or epoch,
                       "val_loss": best[0] if len(va) else None, "val_accuracy": best[3] if len(va) else None,
                       **{k: v for k, v in asdict(options).items() if k != "epochs"}, "lr": lr, "max_epochs": options.epochs}
    log.info("trained %s head: %s", config.kind, config.training)
    return head


def train_head_on_images(model_dir: str | Path, images, labels, class_names: list[str], kind: str, spec: FeatureSpec,
                         options: TrainOptions = TrainOptions(), cache_dir: Path | None = None, progress: bool = False,
                         **head_options) -> tuple[nn.Module, HeadConfig]:
    """Load the model, extract (or reuse cached) features, train a head; head_options: dim, depth, heads, pool."""
    from diffscore.engine.manifest import folder_sha256
    from diffscore.reference.loading import load_components

    check_kind(kind, len(spec.blocks), len(spec.steps))
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(images) or not len(labels):
        raise EngineError(f"{len(images)} images and {len(labels)} labels; need one label per image, at least one image")
    comp = load_components(model_dir)
    check_blocks(comp.unet, spec.blocks)
    check_steps(spec.steps, comp.num_train_timesteps)
    sha = folder_sha256(Path(model_dir))
    if cache_dir is not None:
        feats = cached_features(comp, images, spec, cache_dir, sha, progress=progress)
    else:
        feats = extract_features(comp, images, spec, progress=progress)
    config = HeadConfig(kind=kind, labels=list(class_names), features=spec, source_sha256=sha,
                        shapes=[list(feats[b].shape[2:]) for b in spec.blocks], **head_options)
    return train_head(feats, labels, config, options, progress=progress), config


# --- saving, loading, the reference path ---------------------------------------------------------
def save_head(head: nn.Module, config: HeadConfig, out_dir: str | Path) -> Path:
    """head.safetensors (weights) + head.json (labels, features, sizes, training summary)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out_dir / WEIGHTS))
    (out_dir / CONFIG).write_text(json.dumps(asdict(config), indent=1))
    return out_dir


def load_head(head_dir: str | Path, weights: str = WEIGHTS, config: str = CONFIG) -> tuple[nn.Module, HeadConfig]:
    from safetensors.torch import load_file

    head_dir = Path(head_dir)
    for name in (config, weights):
        if not (head_dir / name).is_file():
            raise EngineError(f"{head_dir} is not a trained head (no {name}); make one with `diffscore train-head`")
    cfg = HeadConfig(**json.loads((head_dir / config).read_text()))
    head = cfg.build()
    head.load_state_dict(load_file(str(head_dir / weights)))
    return head.eval(), cfg


@torch.no_grad()
def head_logits_reference(comp: Components, head: nn.Module, config: HeadConfig, images) -> torch.Tensor:
    """(N, classes) logits: features through torch, then the head."""
    feats = extract_features(comp, images, config.features)
    return head(*(feats[b] for b in config.features.blocks))
