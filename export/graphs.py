"""The torch modules of the exported graphs, each built to the runtime's graph contract
(engine/graph_contract.py: names, dtypes, shapes with the symbolic batch axis, sample feeds)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from diffscore.engine.graph_contract import (TEXT_ENCODER, UNET, VAE_ENCODER, GraphContract, ModelDims,
                                             head_graph_contract)
from diffscore.engine.graph_contract import graph_contracts as runtime_contracts
from diffscore.engine.manifest import BATCH, TensorSpec
from diffscore.reference.loading import Components, sdxl_text
from diffscore.reference.scoring_unet import ScoringUNet


class TextEncoderGraph(nn.Module):
    """input_ids (B, L) int64 -> last_hidden_state (B, L, D); no attention mask (DESIGN §3)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=False)[0]


class SdxlTextEncoderGraph(nn.Module):
    """input_ids, input_ids_2 (B, L) int64 (each encoder's own tokenizer) -> last_hidden_state (B, L, D1 + D2),
    both encoders' penultimate hidden states concatenated, and text_embeds (B, D2), encoder 2's pooled projection:
    what StableDiffusionXLPipeline.encode_prompt builds (reference.loading.encode_conditioning)."""

    def __init__(self, text_encoder: nn.Module, text_encoder_2: nn.Module):
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2

    def forward(self, input_ids, input_ids_2):
        return sdxl_text(self.text_encoder, self.text_encoder_2, input_ids, input_ids_2)


def text_encoder_graph(comp: Components) -> nn.Module:
    """The text encoder graph's module for the model's conditioning ("sd" or "sdxl")."""
    if comp.conditioning == "sdxl":
        return SdxlTextEncoderGraph(comp.text_encoder, comp.text_encoder_2)
    return TextEncoderGraph(comp.text_encoder)


def text_hidden_size(comp: Components) -> int:
    """D of encoder_hidden_states: one encoder's width, or both encoders' together (SDXL)."""
    return sum(int(te.config.hidden_size) for te in (comp.text_encoder, comp.text_encoder_2) if te is not None)


class VaeEncoderGraph(nn.Module):
    """image (B, 3, H, W) in [-1, 1] -> x0 = (posterior mean − shift factor) * scaling factor (deterministic)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae, self.scaling = vae, float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def forward(self, image):
        return (self.vae.encode(image).latent_dist.mean - self.shift) * self.scaling


def model_dims(comp: Components, attention_layers: int) -> ModelDims:
    """The runtime contract's sizes (engine/graph_contract.py), read from the torch model."""
    pooled = int(comp.text_encoder_2.config.projection_dim) if comp.conditioning == "sdxl" else None
    S = int(comp.unet.config.sample_size)
    return ModelDims(int(comp.tokenizer.model_max_length), text_hidden_size(comp),
                     (int(comp.unet.config.in_channels), S, S), comp.image_channels, comp.image_size,
                     len(comp.alphas_cumprod), attention_layers, comp.pixel_space, pooled,
                     None if comp.time_ids is None else tuple(comp.time_ids))


def torch_feed(contract: GraphContract, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """The contract's sample feed as the torch inputs the graph is traced with, in input order."""
    feed = contract.sample_feed(batch, np.random.default_rng(seed))
    return tuple(torch.from_numpy(feed[name]) for name in contract.input_names)


def to_export(module: nn.Module, contract: GraphContract, outputs: list | None = None) -> tuple:
    """(module, sample inputs, input specs, output specs): what export_graph takes, to the contract."""
    return module, torch_feed(contract), list(contract.inputs), list(outputs or contract.outputs)


def graph_contracts(comp: Components, scoring_unet: ScoringUNet) -> dict:
    """{graph name: (module, sample inputs, input specs, output specs)} for the model's graphs, each to the
    runtime's contract; the scoring UNet adds its feature maps after the contract's outputs."""
    contracts = runtime_contracts(model_dims(comp, len(scoring_unet.attention_layers)))
    vae = {VAE_ENCODER: VaeEncoderGraph(comp.vae)} if comp.vae is not None else {}
    modules = {TEXT_ENCODER: text_encoder_graph(comp), **vae, UNET: scoring_unet}
    graphs = {role: to_export(module, contracts[role]) for role, module in modules.items()}
    module, sample, inputs, _ = graphs[UNET]
    with torch.no_grad():
        traced = scoring_unet(*sample)
    graphs[UNET] = module, sample, inputs, [TensorSpec(n, "float32", [BATCH, *o.shape[1:]])
                                            for n, o in zip(scoring_unet.output_names, traced)]
    return graphs


class HeadGraph(nn.Module):
    """x_t (B, steps, C, H, W) -> logits (B, classes): the UNet at the head's steps, on its prompt (baked in),
    and the head, as one graph. The exporter keeps only the UNet layers the head reads."""

    def __init__(self, unet: nn.Module, head: nn.Module, config, conditioning: dict[str, torch.Tensor]):
        super().__init__()
        if config.feedback is not None:  # DifFeed: both passes and the feedback modules in the graph
            from diffscore.reference.feedback import feedback_unet

            self.unet = feedback_unet(unet, head, config)
        else:
            self.unet = ScoringUNet(unet, attention_layers=[], feature_blocks=config.features.blocks)
        self.head = head
        self.register_buffer("t", torch.tensor(config.features.steps, dtype=torch.float32))
        self.names = list(conditioning)  # encode_conditioning of the head's prompt: (1, ...) each
        for name, value in conditioning.items():
            self.register_buffer(f"cond_{name}", value)

    def forward(self, sample):
        B, S = sample.shape[:2]
        x = sample.flatten(0, 1)  # (B·S, C, H, W), image-major
        cond = {n: getattr(self, f"cond_{n}") for n in self.names}
        # x.shape[0], not len(x): the batch stays symbolic in the traced graph
        _, _, *feats = self.unet(x, self.t.repeat(B),
                                 **{n: v.expand(x.shape[0], *v.shape[1:]) for n, v in cond.items()})
        return self.head(*(f.reshape(B, S, *f.shape[1:]) for f in feats))  # each (B, S, C, h, w)


def head_contract(comp: Components, head: nn.Module, config) -> tuple:
    """A trained head's graph: the image noised at each of the head's steps -> logits.

    Measured on the demo (bench/heads.py): one graph runs 2.2x faster than the head as its own graph
    fed by the shared UNet graph's feature outputs, because it skips the UNet layers after the last
    block read (and the attention scores); the price is a copy of those layers' weights per head.
    """
    from diffscore.reference.loading import encode_conditioning

    contract = head_graph_contract(model_dims(comp, 0), len(config.features.steps), len(config.labels))
    module = HeadGraph(comp.unet, head.eval(), config, encode_conditioning(comp, [config.features.prompt])).eval()
    return to_export(module, contract)
