"""DifFeed heads (Mukhopadhyay et al., diffssl's feedback fusion): two UNet passes per noise step.

Pass 1 runs the frozen UNet on x_t; the outputs of chosen decoder blocks go through small learned
modules (diffssl's published ``C_B_R``: 1×1 conv to the target's channels, BatchNorm, ReLU), are resized
bilinearly to the target's map and added to the outputs of the mirrored encoder blocks in pass 2 over
the same x_t, t and prompt (for a down block: its hidden state and its last skip connection, which is
the same tensor). A head (linear / attention / DifFormer) reads pass 2's block outputs. The modules
and the head train together; the UNet stays frozen. Pass-1 outputs do not depend on anything trained,
so training extracts them once; pass 2 runs with gradients through the modules on every step.

diffusers' top-level blocks stand in for diffssl's finer ADM input/output blocks: by default every
``up_blocks.i`` feeds ``down_blocks.(n-1-i)``, its mirror (diffssl: decoder block b feeds encoder block
38 − b, for 6 of 18 decoder blocks).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffscore.engine.images import preprocess_batch
from diffscore.errors import EngineError
from diffscore.kernels import shared_noise
from diffscore.reference.features import (FeatureSpec, FeedbackSpec, block_shapes, cached_features, extract_features,
                                          tappable_blocks)
from diffscore.reference.loading import Components, add_noise, encode_images, encode_prompts, require_sd_conditioning

log = logging.getLogger("diffscore")


# --- which blocks feed which ----------------------------------------------------------------------
def mirror_pairs(unet: nn.Module) -> list[list[str]]:
    """[up_blocks.i, down_blocks.(n-1-i)] for every decoder block: the default DifFeed wiring."""
    n = len(unet.down_blocks)
    return [[f"up_blocks.{i}", f"down_blocks.{n - 1 - i}"] for i in range(len(unet.up_blocks)) if n - 1 - i >= 0]


def last_read(order: list[str], read_blocks: list[str]) -> int:
    """Position in `order` (the top-level blocks) of the last top-level block the head reads from."""
    top = lambda name: "mid_block" if name.startswith("mid_block") else ".".join(name.split(".")[:2])
    return max(order.index(top(b)) for b in read_blocks)


def check_pairs(unet: nn.Module, pairs: list[list[str]], read_blocks: list[str]) -> list[list[str]]:
    """Feedback goes from a later top-level block to an earlier one that the head's blocks come after."""
    order = tappable_blocks(unet)
    pairs = [list(p) for p in pairs]
    if not pairs:
        raise EngineError("no feedback pairs given; e.g. --feedback-pairs up_blocks.0:down_blocks.1")
    reach = last_read(order, read_blocks)
    for pair in pairs:
        if len(pair) != 2 or any(b not in order for b in pair):
            raise EngineError(f"feedback pair {':'.join(pair)} is not SOURCE:TARGET of this UNet's blocks "
                              f"({', '.join(order)})")
        src, tgt = pair
        if order.index(src) <= order.index(tgt):
            raise EngineError(f"feedback {src}:{tgt} must go from a later block to an earlier one (decoder to encoder)")
        if order.index(tgt) > reach:
            raise EngineError(f"feedback into {tgt} cannot reach the blocks the head reads ({', '.join(read_blocks)}): "
                              "they come before it")
    if len({tuple(p) for p in pairs}) != len(pairs):
        raise EngineError(f"feedback pairs {[':'.join(p) for p in pairs]} contain duplicates")
    return pairs


def default_pairs(unet: nn.Module, read_blocks: list[str]) -> list[list[str]]:
    """The mirror pairs whose target the head's blocks come after (the others could not change them)."""
    order = tappable_blocks(unet)
    reach = last_read(order, read_blocks)
    pairs = [p for p in mirror_pairs(unet) if order.index(p[1]) <= reach]
    if not pairs:
        raise EngineError(f"no encoder block before the head's blocks ({', '.join(read_blocks)}) to feed back into; "
                          "read a later block (e.g. mid_block)")
    return pairs


@torch.no_grad()
def feedback_spec(comp: Components, pairs: list[list[str]]) -> FeedbackSpec:
    shapes = block_shapes(comp, list(dict.fromkeys(b for p in pairs for b in p)))
    return FeedbackSpec(pairs=[list(p) for p in pairs], channels=[[shapes[s][0], shapes[t][0]] for s, t in pairs])


# --- modules --------------------------------------------------------------------------------------
def feedback_module(c_in: int, c_out: int) -> nn.Sequential:
    """diffssl's C_B_R: 1×1 conv (no bias) to the target's channels, BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class FeedbackHead(nn.Module):
    """A head on pass-2 features with the feedback modules it trained with: saved and exported together."""

    def __init__(self, head: nn.Module, spec: FeedbackSpec):
        super().__init__()
        self.feedback = nn.ModuleList(feedback_module(c_in, c_out) for c_in, c_out in spec.channels)
        self.head = head

    def forward(self, *features):
        return self.head(*features)


class _Enough(Exception):
    """Raised by a tap once a pass has produced everything wanted: the rest of the UNet is skipped."""


class FeedbackUNet(nn.Module):
    """forward(sample, timestep, encoder_hidden_states) -> (eps, attn_scores (B, 0), *features of pass 2).

    Same contract as ScoringUNet, so the head graph and the feature extraction take either. In torch a
    pass stops at its last wanted block; under ONNX tracing it runs whole (the exporter drops unused layers).
    """

    def __init__(self, unet: nn.Module, modules: nn.ModuleList, spec: FeedbackSpec, feature_blocks: list[str]):
        super().__init__()
        assert len(modules) == len(spec.pairs), f"{len(modules)} feedback modules for {len(spec.pairs)} pairs"
        self.unet, self.feedback = unet, modules
        self.pairs = [tuple(p) for p in spec.pairs]
        self.feature_blocks = list(feature_blocks)
        self.sources = list(dict.fromkeys(s for s, _ in self.pairs))
        named = dict(unet.named_modules())
        self._pass = 0  # 0: taps idle (the UNet is used elsewhere), 1 or 2: the pass running
        self._sources: dict[str, torch.Tensor] = {}
        self._features: dict[str, torch.Tensor] = {}
        self._extra: dict[str, list[torch.Tensor]] = {}
        # feedback is added before a block's output is tapped: these hooks come first on a shared block
        self._hooks = [named[t].register_forward_hook(self._add_feedback(t))
                       for t in dict.fromkeys(t for _, t in self.pairs)]
        self._hooks += [named[s].register_forward_hook(self._tap(s, 1, self._sources, self.sources))
                        for s in self.sources]
        self._hooks += [named[b].register_forward_hook(self._tap(b, 2, self._features, self.feature_blocks))
                        for b in self.feature_blocks]

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _tap(self, name: str, when: int, sink: dict, wanted: list[str]):
        def hook(module, args, output):
            if self._pass != when:
                return
            sink[name] = output[0] if isinstance(output, tuple) else output  # down blocks: (h, residuals)
            if len(sink) == len(wanted) and not torch.jit.is_tracing():
                raise _Enough

        return hook

    def _add_feedback(self, name: str):
        def hook(module, args, output):
            if self._pass != 2:
                return None
            h = output[0] if isinstance(output, tuple) else output
            new = h
            for fb in self._extra[name]:
                if tuple(fb.shape[-2:]) != tuple(h.shape[-2:]):
                    fb = F.interpolate(fb, size=tuple(h.shape[-2:]), mode="bilinear", align_corners=False)
                new = new + fb
            if isinstance(output, tuple):  # a down block: its last residual is h, the skip into the decoder
                _, residuals = output
                assert residuals[-1] is h, f"{name}: the last residual is not the block's output"
                return new, (*residuals[:-1], new)
            return new

        return hook

    def _run(self, pass_: int, sample, timestep, encoder_hidden_states):
        self._pass = pass_
        try:
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        except _Enough:
            return None
        finally:
            self._pass = 0

    def first_pass(self, sample, timestep, encoder_hidden_states) -> dict[str, torch.Tensor]:
        """{source block: output} of the plain UNet."""
        self._sources.clear()
        self._run(1, sample, timestep, encoder_hidden_states)
        return dict(self._sources)

    def second_pass(self, sample, timestep, encoder_hidden_states, sources: dict[str, torch.Tensor]):
        """(eps or None when stopped early, [pass-2 output of each feature block]) with the sources fed back."""
        self._extra = {t: [] for _, t in self.pairs}
        for (src, tgt), module in zip(self.pairs, self.feedback):
            self._extra[tgt].append(module(sources[src]))
        self._features.clear()
        try:
            eps = self._run(2, sample, timestep, encoder_hidden_states)
        finally:
            self._extra = {}
        return eps, [self._features[b] for b in self.feature_blocks]

    def forward(self, sample, timestep, encoder_hidden_states):
        sources = self.first_pass(sample, timestep, encoder_hidden_states)
        eps, feats = self.second_pass(sample, timestep, encoder_hidden_states, sources)
        return (eps, sample.new_zeros(sample.shape[0], 0), *feats)


def feedback_unet(unet: nn.Module, head: FeedbackHead, config) -> FeedbackUNet:
    """The two-pass UNet of a trained DifFeed head (HeadConfig with feedback)."""
    return FeedbackUNet(unet, head.feedback, config.feedback, config.features.blocks)


# --- training -------------------------------------------------------------------------------------
def train_feedback_head(comp: Components, images, labels, config, options, cache_dir: Path | None = None,
                        model_sha256: str = "", progress: bool = False) -> FeedbackHead:
    """Train config's feedback modules and head together (reference/head_training.fit: seeded, early stopping).

    Pass 1's source outputs are extracted once (cached under cache_dir like any features); each step runs
    pass 2 with gradients through the modules, up to the last block the head reads.
    """
    require_sd_conditioning(comp, "DifFeed (--feedback)")
    from diffscore.reference.head_training import fit, validation_split
    from diffscore.reference.heads import LinearProbe

    spec = config.features
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    first_spec = FeatureSpec(blocks=list(dict.fromkeys(s for s, _ in config.feedback.pairs)), steps=spec.steps,
                             seed=spec.seed, prompt=spec.prompt)
    if cache_dir is not None:
        first = cached_features(comp, images, first_spec, cache_dir, model_sha256, progress=progress)
    else:
        first = extract_features(comp, images, first_spec, progress=progress)
    S = len(spec.steps)
    with torch.no_grad():
        x0 = encode_images(comp, torch.from_numpy(preprocess_batch(images, comp.image_size, comp.image_channels)))
        emb = encode_prompts(comp, [spec.prompt])  # (1, L, D)
    eps = torch.from_numpy(shared_noise(spec.seed, S, tuple(x0.shape[1:])))  # (S, C, H, W): extract_features' ε
    t = torch.tensor(spec.steps)
    assert len(x0) == len(labels), f"{len(x0)} images vs {len(labels)} labels"
    tr, va = (torch.from_numpy(i) for i in validation_split(labels.numpy(), options.val_fraction, options.seed))
    torch.manual_seed(options.seed)
    model = config.build()
    comp.unet.requires_grad_(False)  # frozen: gradients flow through its activations only
    unet = feedback_unet(comp.unet, model, config)

    def features_of(idx: torch.Tensor) -> list[torch.Tensor]:
        x_t = torch.cat([add_noise(x0[i], eps, comp.alphas_cumprod, t) for i in idx])  # (n·S, C, H, W), image-major
        sources = {s: f[idx].flatten(0, 1) for s, f in first.items()}
        _, feats = unet.second_pass(x_t, t.repeat(len(idx)).float(), emb.expand(len(x_t), -1, -1), sources)
        return [f.reshape(len(idx), S, *f.shape[1:]) for f in feats]  # each (n, S, C, h, w)

    def logits_of(idx: torch.Tensor) -> torch.Tensor:
        return torch.cat([model(*features_of(chunk)) for chunk in idx.split(options.batch_size)])

    try:
        if isinstance(model.head, LinearProbe):  # standardise on pass-2 features with the initial modules
            model.eval()
            with torch.no_grad():
                chunks = [features_of(chunk) for chunk in tr.split(options.batch_size)]
            model.head.fit_inputs(*(torch.cat(c) for c in zip(*chunks)))
        fit(model, logits_of, labels, tr, va, config, options, progress)
    finally:
        unet.remove_hooks()
    config.training["unet_passes_per_step"] = 2
    return model
