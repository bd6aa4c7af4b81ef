"""The discffusion DSD preset reproduces Discffusion's scoring (eric-ai-lab/Discffusion pipeline_dsd.py and
unet_2d_condition.py), transcribed here pair by pair, and its prompt learning (dsd_train.py)."""


import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

import diffscore
from diffscore.errors import EngineError
from diffscore.export.onnx_export import export_engine
from diffscore.kernels import dsd_timesteps, shared_noise
from diffscore.reference.loading import encode_images, encode_prompts, load_components
from diffscore.reference.matching import match_reference
from diffscore.reference.prompt_learning import PromptLearningConfig, load_adapters, train_prompts, Pairs
from diffscore.reference.scoring_unet import ScoringUNet, discffusion_attention_layers
from diffscore.engine.images import preprocess_batch

TEXTS = ["a cat", "a dog", "a red car"]


def test_timesteps_are_999_minus_idx():
    # Discffusion: scheduler.timesteps (999 … 0) at idx in range(10, 990, 1000 // S), reversed
    assert dsd_timesteps(10, 1000, reverse=True) == [89, 189, 289, 389, 489, 589, 689, 789, 889, 989]
    assert dsd_timesteps(10, 1000) == [10, 110, 210, 310, 410, 510, 610, 710, 810, 910]


def test_layers_last_block_per_section_all_its_attentions(demo_model, tiny_models):
    demo = UNet2DConditionModel.from_pretrained(demo_model / "unet")
    tb = ".transformer_blocks.0.attn2"
    assert discffusion_attention_layers(demo) == [
        f"down_blocks.1.attentions.0{tb}", f"mid_block.attentions.0{tb}",
        f"up_blocks.1.attentions.0{tb}", f"up_blocks.1.attentions.1{tb}"]
    sd1 = load_components(tiny_models["sd1"]).unet  # CrossAttn down 0 only, CrossAttn up 1 only
    assert discffusion_attention_layers(sd1) == [
        f"down_blocks.0.attentions.0{tb}", f"mid_block.attentions.0{tb}",
        f"up_blocks.1.attentions.0{tb}", f"up_blocks.1.attentions.1{tb}"]


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory):
    return export_engine(tiny_models["sd1"], tmp_path_factory.mktemp("dsd") / "e", dsd_preset="discffusion",
                         show_progress=False)


def discffusion_score(comp, layers, image, text, steps, seed):
    """Their pipeline for one (image, text): batch [∅, text] at each t; ascore = mean over layers of the
    batch-mean score; bias = ||ε − ε̂_uncond|| − ||ε − ε̂_cond||; dbscore = ascore + bias; mean over t."""
    su = ScoringUNet(comp.unet, layers)
    x0 = encode_images(comp, torch.from_numpy(preprocess_batch([image], comp.image_size, 3)))[0]
    ts = [999 - idx for idx in range(10, 990, 1000 // steps)][::-1]
    noise = torch.from_numpy(shared_noise(seed, len(ts), tuple(x0.shape)))  # their noise_samples[sampling_step]
    emb = encode_prompts(comp, ["", text])
    t_scores = []
    with torch.no_grad():
        for k, t in enumerate(ts):
            abar = comp.alphas_cumprod[t]
            latents = (abar.sqrt() * x0 + (1 - abar).sqrt() * noise[k]).float()  # Euler add_noise + scale_model_input
            out, scores = su(torch.stack([latents, latents]), torch.tensor([float(t)] * 2), emb)
            ascore = sum(scores[:, i].mean() for i in range(len(layers))) / len(layers)
            noise_uncond, noise_cond = out.flatten(1).chunk(2)
            eps = noise[k].flatten()[None]
            bias = torch.norm(eps - noise_uncond, p=2, dim=1) - torch.norm(eps - noise_cond, p=2, dim=1)
            t_scores.append(ascore + bias)
    return float(torch.stack(t_scores).mean())


def test_engine_and_reference_equal_a_transcription_of_discffusion(engine, tiny_models):
    comp = load_components(tiny_models["sd1"])
    eng = diffscore.load(engine, backend="ort-cpu")
    assert eng.manifest.defaults.dsd_preset == "discffusion"
    assert eng.manifest.attention_layers == discffusion_attention_layers(comp.unet)
    rng = np.random.default_rng(4)
    imgs = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2)]
    got = eng.match(imgs, TEXTS, steps=4, seed=3)  # the preset's λ = 1 by default
    want = np.array([[discffusion_score(comp, eng.manifest.attention_layers, im, t, 4, 3) for t in TEXTS]
                     for im in imgs])
    np.testing.assert_allclose(got, want, rtol=1e-4)
    su = ScoringUNet(comp.unet, eng.manifest.attention_layers)
    ref = match_reference(comp, su, imgs, TEXTS, steps=4, seed=3, preset="discffusion")
    np.testing.assert_allclose(ref, want, rtol=1e-5)


def test_an_engine_scores_with_its_own_preset(engine):
    eng = diffscore.load(engine, backend="ort-cpu")
    with pytest.raises(EngineError, match="exported with the discffusion DSD preset.*--dsd-preset diffscore"):
        eng.match([np.zeros((16, 16, 3), np.uint8)], TEXTS, preset="diffscore")
    with pytest.raises(EngineError, match="unknown DSD preset"):
        export_engine("/nonexistent", engine.parent / "x", dsd_preset="clip")


def test_discffusion_prompt_learning(tiny_models, tmp_path):
    rng = np.random.default_rng(0)
    pairs = Pairs([rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(6)],
                  [t for t in TEXTS for _ in range(2)])
    cfg = PromptLearningConfig(shots=2, steps=3, lr=1e-2, batch_size=3, preset="discffusion")
    comp = load_components(tiny_models["sd1"])
    grads = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm):  # the norm before clipping, and that it clips at 1.0
        grads.append((float(clip(params, max_norm)), max_norm))
        return grads[-1][0]

    torch.nn.utils.clip_grad_norm_ = recording_clip
    try:
        run = train_prompts(tiny_models["sd1"], pairs, tmp_path / "run", cfg, progress=False, comp=comp)
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
    assert [m for _, m in grads] == [1.0] * 3
    assert run["config"]["preset"] == "discffusion" and run["clip_grad_norm"] == 1.0
    assert "per (image, caption) pair" in run["timestep_sampling"]
    assert run["config"]["attention_layers"] == discffusion_attention_layers(load_components(tiny_models["sd1"]).unet)
    engine_dir = export_engine(tiny_models["sd1"], tmp_path / "e", adapters=tmp_path / "run", show_progress=False)
    eng = diffscore.load(engine_dir, backend="ort-cpu")
    assert eng.manifest.defaults.dsd_preset == "discffusion"
    fresh = load_components(tiny_models["sd1"])
    load_adapters(fresh.unet, tmp_path / "run")
    imgs = pairs.images[:2]
    want = match_reference(fresh, ScoringUNet(fresh.unet, eng.manifest.attention_layers), imgs, TEXTS, steps=3,
                           preset="discffusion")
    np.testing.assert_allclose(eng.match(imgs, TEXTS, steps=3), want, rtol=1e-4)


def test_parity_scores_the_reference_with_the_engines_preset(tiny_models, tmp_path):
    """An adapter trained for the diffscore preset (not the default) passes the parity suite's match check."""
    from diffscore.engine.manifest import Manifest
    from diffscore.export.parity import match_parity, reference_components

    rng = np.random.default_rng(1)
    pairs = Pairs([rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(6)],
                  [t for t in TEXTS for _ in range(2)])
    train_prompts(tiny_models["sd1"], pairs, tmp_path / "run", progress=False,
                  config=PromptLearningConfig(shots=2, steps=2, lr=1e-2, batch_size=3, preset="diffscore"))
    engine_dir = export_engine(tiny_models["sd1"], tmp_path / "e", adapters=tmp_path / "run", show_progress=False)
    manifest = Manifest.load(engine_dir)
    assert manifest.defaults.dsd_preset == "diffscore"
    verdicts = match_parity(engine_dir, manifest, reference_components(manifest), pairs.images[:2])
    assert verdicts and all(v.passed for v in verdicts)


def test_default_timesteps_follow_the_preset(engine, tiny_models, tmp_path):
    """Discffusion's dsd_infer.py scores at --sampling_time_steps 30 by default: an export with its preset records
    30 (diffscore's own preset 10), `defaults --reset` keeps it, and match() without steps uses it."""
    from diffscore.app.defaults import change_defaults
    from diffscore.export.onnx_export import export_engine
    from diffscore.engine.manifest import Manifest
    from diffscore.kernels.dsd import DSD_PRESETS

    assert (DSD_PRESETS["discffusion"].steps, DSD_PRESETS["diffscore"].steps) == (30, 10)
    assert Manifest.load(engine).defaults.dsd_steps == 30
    own = export_engine(tiny_models["sd1"], tmp_path / "own", dsd_preset="diffscore", show_progress=False)
    assert Manifest.load(own).defaults.dsd_steps == 10
    change_defaults(engine, {"dsd_steps": 10})
    assert change_defaults(engine, {}, reset=True).dsd_steps == 30
    rng = np.random.default_rng(0)
    with diffscore.load(engine, backend="ort-cpu") as eng:
        assert len(eng.match([rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)], TEXTS).options.timesteps) == 30
