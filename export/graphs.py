"""Each exported graph's input/output contract, written once: it feeds export, the manifest and
every runtime backend (names, dtypes, shapes with the symbolic batch axis)."""

from __future__ import annotations

import torch
from torch import nn

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


def graph_contracts(comp: Components, scoring_unet: ScoringUNet) -> dict:
    """{graph name: (module, sample inputs, input specs, output specs)} for the model's graphs."""
    L = int(comp.tokenizer.model_max_length)
    D = text_hidden_size(comp)
    size, ch = comp.image_size, comp.image_channels
    C, S = int(comp.unet.config.in_channels), int(comp.unet.config.sample_size)
    B = 2
    ids = [TensorSpec("input_ids", "int64", [BATCH, L])]
    text_out = [TensorSpec("last_hidden_state", "float32", [BATCH, L, D])]
    extra_in, extra_sample = [], ()  # SDXL's added conditioning inputs of the UNet graph
    if comp.conditioning == "sdxl":
        D2 = int(comp.text_encoder_2.config.projection_dim)
        ids.append(TensorSpec("input_ids_2", "int64", [BATCH, L]))
        text_out.append(TensorSpec("text_embeds", "float32", [BATCH, D2]))
        extra_in = [TensorSpec("text_embeds", "float32", [BATCH, D2]),
                    TensorSpec("time_ids", "float32", [BATCH, len(comp.time_ids)])]
        extra_sample = (torch.randn(B, D2), torch.tensor([comp.time_ids] * B))
    graphs = {
        "text_encoder": (
            text_encoder_graph(comp),
            tuple(torch.zeros(B, L, dtype=torch.int64) for _ in ids),
            ids,
            text_out,
        )
    }
    if comp.vae is not None:
        latent_c = int(comp.vae.config.latent_channels)
        graphs["vae_encoder"] = (
            VaeEncoderGraph(comp.vae),
            (torch.zeros(B, ch, size, size),),
            [TensorSpec("image", "float32", [BATCH, ch, size, size])],
            [TensorSpec("latent", "float32", [BATCH, latent_c, S, S])],
        )
    sample = (torch.randn(B, C, S, S), torch.tensor([10.0, 500.0]), torch.randn(B, L, D), *extra_sample)
    with torch.no_grad():
        outputs = scoring_unet(*sample)
    graphs["unet"] = (
        scoring_unet,
        sample,
        [
            TensorSpec("sample", "float32", [BATCH, C, S, S]),
            TensorSpec("timestep", "float32", [BATCH]),  # float: exact for integers, TensorRT-friendly
            TensorSpec("encoder_hidden_states", "float32", [BATCH, L, D]),
            *extra_in,
        ],
        [TensorSpec(n, "float32", [BATCH, *o.shape[1:]]) for n, o in zip(scoring_unet.output_names, outputs)],
    )
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

    C, S, n = int(comp.unet.config.in_channels), int(comp.unet.config.sample_size), len(config.features.steps)
    module = HeadGraph(comp.unet, head.eval(), config, encode_conditioning(comp, [config.features.prompt])).eval()
    return (module, (torch.randn(2, n, C, S, S),), [TensorSpec("sample", "float32", [BATCH, n, C, S, S])],
            [TensorSpec("logits", "float32", [BATCH, len(config.labels)])])
