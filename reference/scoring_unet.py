"""ScoringUNet: a diffusers UNet that also returns DSD attention scores and block features.

Scores are captured by installing an attention *processor* on the selected cross-attention layers
(the diffusers extension point), not by forking the UNet: the module keeps its weights, the
processor does the math and records ``logsumexp_tokens(scale · QKᵀ)`` averaged over heads and
pixels. Layers not selected keep diffusers' fast fused-attention path. Block features are taken with
forward hooks on named modules.
"""

from __future__ import annotations

import torch
from torch import nn

from diffscore.errors import EngineError


class ScoreCapturingProcessor:
    """Plain (unfused) attention that also records the DSD score of this layer, per sample."""

    def __init__(self, sink: dict, name: str):
        self.sink, self.name = sink, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert encoder_hidden_states is not None, f"{self.name} is not a cross-attention layer"
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        B, N, _ = hidden_states.shape
        q = attn.to_q(hidden_states)
        k = attn.to_k(encoder_hidden_states)
        v = attn.to_v(encoder_hidden_states)
        d = k.shape[-1] // attn.heads
        q = q.view(B, -1, attn.heads, d).transpose(1, 2)  # (B, heads, N, d)
        k = k.view(B, -1, attn.heads, d).transpose(1, 2)  # (B, heads, L, d)
        v = v.view(B, -1, attn.heads, d).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if attn.upcast_attention:
            q, k = q.float(), k.float()
        logits = (q @ k.transpose(-1, -2)) * attn.scale  # (B, heads, N, L), pre-softmax
        if attention_mask is not None:
            logits = logits + attn.prepare_attention_mask(attention_mask, k.shape[2], B).view(B, attn.heads, 1, -1)
        self.sink[self.name] = torch.logsumexp(logits.float(), dim=-1).mean(dim=(1, 2))  # (B,)
        probs = logits.softmax(dim=-1).to(v.dtype)
        out = (probs @ v).transpose(1, 2).reshape(B, N, attn.heads * d)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Names of every cross-attention module (``...attn2``) of the UNet, in forward order."""
    return [name for name, m in unet.named_modules() if name.endswith("attn2") and hasattr(m, "to_k")]


def default_attention_layers(unet: nn.Module) -> list[str]:
    """The last cross-attention layer of each down, mid and up block that has one (DESIGN §3)."""
    last_per_block: dict[str, str] = {}
    for name in cross_attention_layers(unet):
        parts = name.split(".")
        block = parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])  # down_blocks.1 / mid_block
        last_per_block[block] = name
    section = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(last_per_block.values(), key=lambda n: section[n.split(".")[0]])  # stable: forward order


def discffusion_attention_layers(unet: nn.Module) -> list[str]:
    """Discffusion's layers: per down/mid/up section, the last block with cross-attention, every attention
    (Transformer2D) of it, the last transformer block of each (its unet_2d_condition.py forward)."""
    last_block: dict[str, str] = {}
    for name in cross_attention_layers(unet):
        parts = name.split(".")
        last_block[parts[0]] = parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])
    chosen: dict[str, str] = {}  # attention module -> its last transformer block's attn2, in forward order
    for name in cross_attention_layers(unet):
        section = name.split(".")[0]
        if name.startswith(last_block[section] + ".attentions."):
            chosen[name.split(".transformer_blocks.")[0]] = name
    section = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(chosen.values(), key=lambda n: section[n.split(".")[0]])  # stable: forward order


def preset_attention_layers(unet: nn.Module, preset: str) -> list[str]:
    """The attention layers a DSD preset (kernels.dsd) scores."""
    from diffscore.kernels import dsd_preset

    rule = dsd_preset(preset).layers
    return discffusion_attention_layers(unet) if rule == "last-block-per-section" else default_attention_layers(unet)


class ScoringUNet(nn.Module):
    """forward(sample, timestep, encoder_hidden_states[, text_embeds, time_ids]) -> (eps, attn_scores (B, layers),
    *features); the graph's inputs are the same names (export/graphs.py)."""

    def __init__(self, unet: nn.Module, attention_layers: list[str] | None = None, feature_blocks: list[str] = ()):
        super().__init__()
        self.unet = unet
        self.attention_layers = list(default_attention_layers(unet) if attention_layers is None else attention_layers)
        self.feature_blocks = list(feature_blocks)
        modules = dict(unet.named_modules())
        known = set(cross_attention_layers(unet))
        for name in self.attention_layers:
            if name not in known:
                raise EngineError(f"{name!r} is not a cross-attention layer of this UNet; choose from {sorted(known)}")
        for name in self.feature_blocks:
            if name not in modules:
                raise EngineError(f"{name!r} is not a module of this UNet (e.g. 'mid_block', 'up_blocks.1')")
        self._scores: dict[str, torch.Tensor] = {}
        self._features: dict[str, torch.Tensor] = {}
        for name in self.attention_layers:
            modules[name].set_processor(ScoreCapturingProcessor(self._scores, name))
        self._hooks = [modules[name].register_forward_hook(self._feature_hook(name)) for name in self.feature_blocks]

    def remove_hooks(self) -> None:
        """Detach the feature taps from the UNet (it may be wrapped again with other blocks)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _feature_hook(self, name):
        def hook(module, args, output):
            self._features[name] = output[0] if isinstance(output, tuple) else output  # down blocks: (h, res)

        return hook

    @property
    def output_names(self) -> list[str]:
        return ["eps", "attn_scores"] + [f"features.{b}" for b in self.feature_blocks]

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        """text_embeds, time_ids: SDXL's added conditioning (reference.loading.encode_conditioning), else None."""
        self._scores.clear()
        self._features.clear()
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        eps = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                        return_dict=False)[0]
        if self.attention_layers:
            scores = torch.stack([self._scores[n] for n in self.attention_layers], dim=1)  # (B, layers)
        else:
            scores = eps.new_zeros(eps.shape[0], 0)
        return (eps, scores, *(self._features[b] for b in self.feature_blocks))
