"""ScoringUNet: ε̂ is the plain UNet's, each captured score equals an independent computation from
the layer's own inputs, feature taps have the right names and shapes, bad names are refused."""

import pytest
import torch

from diffscore.errors import EngineError
from diffscore.reference.loading import load_components
from diffscore.reference.scoring_unet import ScoringUNet, cross_attention_layers, default_attention_layers


def inputs(comp, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    C, S = comp.unet.config.in_channels, comp.unet.config.sample_size
    D = comp.unet.config.cross_attention_dim
    return (torch.randn(B, C, S, S, generator=g), torch.tensor([3.0, 400.0, 990.0][:B]),
            torch.randn(B, 16, D, generator=g))


@pytest.mark.parametrize("kind", ["sd1", "sd2", "pixel"])
@torch.no_grad()
def test_scores_match_an_independent_computation(tiny_models, kind):
    comp = load_components(tiny_models[kind])
    x, t, c = inputs(comp)
    plain = comp.unet(x, t, encoder_hidden_states=c).sample
    layers = cross_attention_layers(comp.unet)
    modules = dict(comp.unet.named_modules())
    seen = {}
    hooks = [modules[n].register_forward_pre_hook(
                 lambda m, a, kw, n=n: seen.__setitem__(n, (a[0], kw["encoder_hidden_states"])), with_kwargs=True)
             for n in layers]
    su = ScoringUNet(comp.unet, attention_layers=layers)
    eps, scores = su(x, t, c)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(eps, plain, rtol=1e-4, atol=1e-5)
    assert scores.shape == (3, len(layers))
    for j, name in enumerate(layers):
        attn, (hs, ehs) = modules[name], seen[name]
        q, k = attn.to_q(hs), attn.to_k(ehs)
        h = attn.heads
        q = q.view(3, -1, h, q.shape[-1] // h)  # (B, N, heads, d)
        k = k.view(3, -1, h, k.shape[-1] // h)  # (B, L, heads, d)
        logits = torch.einsum("bnhd,blhd->bhnl", q, k) / q.shape[-1] ** 0.5
        want = logits.logsumexp(-1).mean(dim=(1, 2))
        torch.testing.assert_close(scores[:, j], want, rtol=1e-5, atol=1e-5)


def test_default_layers_are_the_last_of_each_block(tiny_models):
    comp = load_components(tiny_models["sd2"])
    assert default_attention_layers(comp.unet) == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "mid_block.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    ]


@torch.no_grad()
def test_feature_taps(tiny_models):
    comp = load_components(tiny_models["pixel"])
    su = ScoringUNet(comp.unet, feature_blocks=["down_blocks.0", "mid_block", "up_blocks.1"])
    assert su.output_names == ["eps", "attn_scores", "features.down_blocks.0", "features.mid_block",
                               "features.up_blocks.1"]
    _, _, down, mid, up = su(*inputs(comp))
    assert down.shape == (3, 16, 4, 4) and mid.shape == (3, 32, 4, 4) and up.shape == (3, 16, 8, 8)


def test_unknown_names_are_refused(tiny_models):
    comp = load_components(tiny_models["pixel"])
    with pytest.raises(EngineError, match="not a cross-attention layer"):
        ScoringUNet(comp.unet, attention_layers=["mid_block.attentions.0.transformer_blocks.0.attn1"])
    with pytest.raises(EngineError, match="not a module"):
        ScoringUNet(comp.unet, feature_blocks=["middle_block"])
