"""The one-pass classifier (DESIGN.md §3, DifFormer): heads on UNet block features.

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

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from diffscore.engine.manifest import HeadTraining
from diffscore.engine.manifest_checks import HEAD_KINDS
from diffscore.errors import EngineError
from diffscore.reference.features import FeatureSpec, FeedbackSpec, extract_features
from diffscore.reference.loading import Components

log = logging.getLogger("diffscore")

WEIGHTS, CONFIG = "head.safetensors", "head.json"


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
        # (B, heads, n, d) each
        q, k, v = self.qkv(self.norm1(x)).reshape(B, n, 3, self.heads, d).permute(2, 0, 3, 1, 4)
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
    # how the training images were labelled (people, the model's samples, its DC); the manifest records it
    origin: HeadTraining = field(default_factory=HeadTraining)
    feedback: FeedbackSpec | None = None  # DifFeed: features of a second UNet pass fed back from the first

    def __post_init__(self):
        if isinstance(self.features, dict):
            self.features = FeatureSpec(**self.features)
        if isinstance(self.origin, dict):
            self.origin = HeadTraining(**self.origin)
        if isinstance(self.feedback, dict):
            self.feedback = FeedbackSpec(**self.feedback)
        check_kind(self.kind, len(self.features.blocks), len(self.features.steps))

    def build(self) -> nn.Module:
        S, K = len(self.features.steps), len(self.labels)
        if self.kind == "linear":
            head = LinearProbe(self.shapes, S, K)
        else:
            cls = AttentionHead if self.kind == "attention" else DifFormerHead
            head = cls(self.shapes, S, K, dim=self.dim, depth=self.depth, heads=self.heads, pool=self.pool)
        if self.feedback is None:
            return head
        from diffscore.reference.feedback import FeedbackHead

        return FeedbackHead(head, self.feedback)


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
    """(N, classes) logits: features through torch (a DifFeed head's: of the second pass), then the head."""
    scoring = None
    if config.feedback is not None:
        from diffscore.reference.feedback import feedback_unet

        scoring = feedback_unet(comp.unet, head, config)
    feats = extract_features(comp, images, config.features, scoring=scoring)
    return head(*(feats[b] for b in config.features.blocks))
