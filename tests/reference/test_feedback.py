"""DifFeed heads in torch: the default wiring, the feedback modules' names and shapes, the second pass
against diffusers' own intrablock residuals (T2I-Adapter), seeded deterministic training that moves the
modules and leaves the UNet frozen, save/load, and one-line refusals."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffscore.errors import EngineError
from diffscore.reference.features import FeatureSpec, FeedbackSpec
from diffscore.reference.feedback import (FeedbackHead, FeedbackUNet, check_pairs, default_pairs, feedback_spec,
                                          mirror_pairs)
from diffscore.reference.head_training import TrainOptions, train_head_on_images
from diffscore.reference.heads import HeadConfig, head_logits_reference, load_head, save_head
from diffscore.reference.loading import encode_prompts, load_components
from diffscore.reference.scoring_unet import ScoringUNet

MIRROR = [["up_blocks.0", "down_blocks.1"], ["up_blocks.1", "down_blocks.0"]]


@pytest.fixture(scope="module")
def pixel(tiny_models):
    return load_components(tiny_models["pixel"])


def test_default_wiring_mirrors_the_decoder_into_the_encoder(pixel):
    assert mirror_pairs(pixel.unet) == MIRROR
    assert default_pairs(pixel.unet, ["mid_block"]) == MIRROR
    assert default_pairs(pixel.unet, ["down_blocks.0"]) == [MIRROR[1]]  # down_blocks.1 comes after what the head reads
    assert default_pairs(pixel.unet, ["down_blocks.1.attentions.0"]) == MIRROR  # a sub-module: its top-level block


def test_feedback_modules_names_and_shapes(pixel):
    spec = feedback_spec(pixel, MIRROR)
    assert spec.channels == [[32, 32], [16, 16]]  # up_blocks.0 and down_blocks.1: 32 channels; the outer pair 16
    head = HeadConfig(kind="linear", labels=["a", "b"], features=FeatureSpec(["mid_block"], [10]), shapes=[[32, 4, 4]],
                      feedback=spec).build()
    assert isinstance(head, FeedbackHead)
    conv, bn, relu = head.feedback[0]  # diffssl's C_B_R
    assert conv.weight.shape == (32, 32, 1, 1) and conv.bias is None
    assert isinstance(bn, torch.nn.BatchNorm2d) and isinstance(relu, torch.nn.ReLU)
    names = set(head.state_dict())
    assert {"feedback.0.0.weight", "feedback.1.1.running_mean", "head.fc.weight", "head.mean"} <= names
    assert not any(n.startswith("unet") for n in names)  # the frozen UNet is not part of what is saved


@torch.no_grad()
def test_second_pass_equals_diffusers_intrablock_residuals(pixel):
    """Feedback into down_blocks.1 (no downsampler) is what diffusers' T2I-Adapter residual does there."""
    torch.manual_seed(0)
    spec = FeedbackSpec(pairs=[["up_blocks.0", "down_blocks.1"]], channels=[[32, 32]])
    modules = FeedbackHead(torch.nn.Identity(), spec).feedback.eval()
    for p in modules.parameters():
        p.normal_()
    bn = modules[0][1]
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    x_t, t = torch.randn(3, 1, 8, 8), torch.tensor([10.0, 300.0, 900.0])
    emb = encode_prompts(pixel, [""]).expand(3, -1, -1)
    plain = ScoringUNet(pixel.unet, attention_layers=[], feature_blocks=["up_blocks.0"])
    _, _, up0 = plain(x_t, t, emb)  # pass 1's source, through the existing taps
    plain.remove_hooks()
    fb = F.interpolate(modules[0](up0), size=(4, 4), mode="bilinear", align_corners=False)  # 8×8 -> down_blocks.1's 4×4
    want = pixel.unet(x_t, t, encoder_hidden_states=emb, return_dict=False,
                      down_intrablock_additional_residuals=[torch.zeros(3, 16, 8, 8), fb])[0]
    fed = FeedbackUNet(pixel.unet, modules, spec, feature_blocks=[])  # no taps: the whole second pass runs
    try:
        eps, scores, *feats = fed(x_t, t, emb)
    finally:
        fed.remove_hooks()
    torch.testing.assert_close(eps, want, rtol=1e-5, atol=1e-6)
    assert scores.shape == (3, 0) and feats == []
    assert not torch.allclose(eps, pixel.unet(x_t, t, encoder_hidden_states=emb, return_dict=False)[0])


def digits(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(n)]


def train(model_dir, seed, kind="difformer", n=24):
    images = digits(n)
    labels = np.arange(n) % 3
    spec = FeatureSpec(["mid_block"], [50, 400], seed=0)
    return train_head_on_images(model_dir, images, labels, ["a", "b", "c"], kind, spec,
                                TrainOptions(epochs=2, batch_size=8, seed=seed), feedback=[], dim=16, heads=2)


def test_training_is_deterministic_moves_the_modules_and_keeps_the_unet_frozen(tiny_models, pixel):
    before = {k: v.clone() for k, v in pixel.unet.state_dict().items()}
    (a, cfg), (b, _), (c, _) = (train(tiny_models["pixel"], 1), train(tiny_models["pixel"], 1),
                                train(tiny_models["pixel"], 2))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    torch.manual_seed(1)  # the initialisation train() starts from
    init = cfg.build()
    moved = [not torch.equal(p, init.state_dict()[k]) for k, p in a.state_dict().items() if k.endswith("0.weight")
             and k.startswith("feedback")]
    assert moved == [True, True]  # gradients reach both modules through the frozen UNet's second pass
    assert cfg.feedback.pairs == MIRROR and cfg.training["unet_passes_per_step"] == 2
    after = load_components(tiny_models["pixel"]).unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_save_load_and_reference_logits(tiny_models, pixel, tmp_path):
    head, cfg = train(tiny_models["pixel"], 0, kind="linear", n=12)
    save_head(head, cfg, tmp_path / "h")
    loaded, cfg2 = load_head(tmp_path / "h")
    assert cfg2 == cfg and isinstance(cfg2.feedback, FeedbackSpec)
    images = digits(4, seed=5)
    want = head_logits_reference(pixel, head, cfg, images)
    torch.testing.assert_close(head_logits_reference(pixel, loaded, cfg2, images), want)
    plain = HeadConfig(**{**cfg.__dict__, "feedback": None})  # the same head without its feedback reads other features
    assert not torch.allclose(head_logits_reference(pixel, loaded.head, plain, images), want)


@pytest.mark.parametrize("pairs,read,message", [
    ([["down_blocks.0", "up_blocks.1"]], ["mid_block"], "from a later block to an earlier one"),
    ([["up_blocks.0", "down_blocks.1"]], ["down_blocks.0"], "cannot reach the blocks the head reads"),
    ([["up_blocks.9", "down_blocks.0"]], ["mid_block"], "is not SOURCE:TARGET"),
    ([["up_blocks.0"]], ["mid_block"], "is not SOURCE:TARGET"),
    ([MIRROR[0], MIRROR[0]], ["mid_block"], "duplicates"),
])
def test_bad_pairs_are_refused(pixel, pairs, read, message):
    with pytest.raises(EngineError, match=message):
        check_pairs(pixel.unet, pairs, read)
