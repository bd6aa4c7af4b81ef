"""Training the one-pass heads: seeded, AdamW, early stopping on a stratified validation split with
the best epoch's weights kept."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffscore.engine.progress import progress_bar
from diffscore.errors import EngineError
from diffscore.reference.features import (FeatureSpec, block_shapes, cached_features, check_blocks, check_steps,
                                          extract_features)
from diffscore.reference.heads import HeadConfig, LinearProbe, check_kind
from diffscore.reference.loading import Components

log = logging.getLogger("diffscore")


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
    return fit(head, lambda batch: head(*(x[batch] for x in inputs)), labels, tr, va, config, options, progress)


def fit(head: nn.Module, logits_of, labels: torch.Tensor, tr: torch.Tensor, va: torch.Tensor, config: HeadConfig,
        options: TrainOptions, progress: bool = False) -> nn.Module:
    """The epoch loop shared by every head: AdamW on logits_of(batch indices), early stopping on the
    validation indices va, the best epoch's weights kept; fills config.training."""
    lr = options.lr or (1e-2 if config.kind == "linear" else 1e-3)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=options.weight_decay)
    gen = torch.Generator().manual_seed(options.seed)
    best = (math.inf, 0, None, float("nan"))  # (val loss, epoch, state, val accuracy)
    epoch = 0
    with progress_bar(f"train {config.kind} head", options.epochs, progress) as advance:
        for epoch in range(1, options.epochs + 1):
            head.train()
            for batch in tr[torch.randperm(len(tr), generator=gen)].split(options.batch_size):
                loss = F.cross_entropy(logits_of(batch), labels[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
            if len(va) == 0:
                advance(note=f"loss {loss.item():.4f}")  # .item(): float() of a tensor with grad warns
                continue
            head.eval()
            with torch.no_grad():
                logits = logits_of(va)
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
                       **{k: v for k, v in asdict(options).items() if k != "epochs"}, "lr": lr,
                       "max_epochs": options.epochs}
    log.info("trained %s head: %s", config.kind, config.training)
    return head


def train_head_on_images(model_dir: str | Path, images, labels, class_names: list[str], kind: str, spec: FeatureSpec,
                         options: TrainOptions = TrainOptions(), cache_dir: Path | None = None, progress: bool = False,
                         feedback: list[list[str]] | None = None, comp: Components | None = None,
                         **head_options) -> tuple[nn.Module, HeadConfig]:
    """Load the model (unless `comp` is it, loaded already), extract (or reuse cached) features, train a head;
    head_options: dim, depth, heads, pool.

    feedback: a DifFeed head (reference/feedback.py) with these [source, target] block pairs; [] = the mirror
    pairs that reach the head's blocks; None = a one-pass head."""
    from diffscore.engine.manifest import folder_sha256
    from diffscore.reference.loading import load_components

    check_kind(kind, len(spec.blocks), len(spec.steps))
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(images) or not len(labels):
        raise EngineError(
            f"{len(images)} images and {len(labels)} labels; need one label per image, at least one image")
    comp = comp or load_components(model_dir)
    check_blocks(comp.unet, spec.blocks)
    check_steps(spec.steps, comp.num_train_timesteps)
    sha = folder_sha256(Path(model_dir))
    if feedback is not None:
        from diffscore.reference.feedback import check_pairs, default_pairs, feedback_spec, train_feedback_head

        pairs = check_pairs(comp.unet, feedback, spec.blocks) if feedback else default_pairs(comp.unet, spec.blocks)
        shapes = block_shapes(comp, spec.blocks)
        config = HeadConfig(kind=kind, labels=list(class_names), features=spec, source_sha256=sha,
                            shapes=[shapes[b] for b in spec.blocks], feedback=feedback_spec(comp, pairs),
                            **head_options)
        return train_feedback_head(comp, images, labels, config, options, cache_dir, sha, progress=progress), config
    if cache_dir is not None:
        feats = cached_features(comp, images, spec, cache_dir, sha, progress=progress)
    else:
        feats = extract_features(comp, images, spec, progress=progress)
    config = HeadConfig(kind=kind, labels=list(class_names), features=spec, source_sha256=sha,
                        shapes=[list(feats[b].shape[2:]) for b in spec.blocks], **head_options)
    return train_head(feats, labels, config, options, progress=progress), config
