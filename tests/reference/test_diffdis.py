"""DiffDis, the torch side: module shapes and parameter names, the text query = CLIP's own pooler output,
the noising and the generation against diffusers' schedulers, training determinism."""

import numpy as np
import pytest
import torch

from diffscore.reference.diffdis import (DiffDis, DiffDisConfig, DiffDisTrainOptions, generate_schedule, load_diffdis,
                                         pooled_text, save_diffdis, timestep_embedding, train_diffdis, unique_images)
from diffscore.reference.loading import load_components

BLOCKS = ["down_blocks.1", "mid_block", "up_blocks.1"]


@pytest.fixture(scope="module")
def comp(tiny_models):
    return load_components(tiny_models["pixel"])


def tiny_config(comp, **kw) -> DiffDisConfig:
    return DiffDisConfig(blocks=BLOCKS, shapes=[[32, 4, 4], [32, 4, 4], [16, 8, 8]],
                         text_dim=int(comp.text_encoder.config.hidden_size),
                         num_train_timesteps=comp.num_train_timesteps,
                         eos_token_id=int(comp.tokenizer.eos_token_id), dim=16, heads=2, **kw)


def features(comp, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *s, generator=g) for s in tiny_config(comp).shapes]


def test_shapes_and_names(comp):
    model = DiffDis(tiny_config(comp), comp.alphas_cumprod).eval()
    names = set(model.state_dict())
    for name in ("tokens.0.proj.weight", "tokens.2.pos", "text_in.weight", "time_mlp.0.weight", "blocks.0.q.weight",
                 "blocks.1.kv.weight", "text_out.weight", "text_mean", "text_std", "sqrt_abar", "start_noise"):
        assert name in names, name
    B, Q, D = 3, 5, model.config.text_dim
    with torch.no_grad():
        error, similarity = model(features(comp, B), torch.randn(B, Q, D), torch.randn(B, Q, D),
                                  torch.randint(0, 1000, (B, Q)))
        memory = model.memory(features(comp, B))
    assert error.shape == similarity.shape == (B, Q)
    assert memory.shape == (B, 16 + 16 + 16, 16)  # 4x4 + 4x4 + 8x8 pooled to 4x4, width dim
    assert (error >= 0).all() and (similarity.abs() <= 1 + 1e-6).all()


def test_queries_are_independent(comp):
    """One query's result does not depend on the other queries of its image (they ride on one image pass)."""
    model = DiffDis(tiny_config(comp), comp.alphas_cumprod).eval()
    f, D = features(comp, 2), model.config.text_dim
    text, noise, t = torch.randn(2, 4, D), torch.randn(2, 4, D), torch.randint(0, 1000, (2, 4))
    with torch.no_grad():
        full, _ = model(f, text, noise, t)
        one, _ = model(f, text[:, 2:3], noise[:, 2:3], t[:, 2:3])
    torch.testing.assert_close(full[:, 2:3], one, rtol=1e-5, atol=1e-6)


def test_noising_and_error_by_hand(comp):
    """The error is the mean squared x0 error at x_t = sqrt(ā)e0 + sqrt(1−ā)ε with ā from diffusers' scheduler."""
    model = DiffDis(tiny_config(comp), comp.alphas_cumprod).eval()
    f, D = features(comp, 1), model.config.text_dim
    raw, eps, t = torch.randn(1, 2, D), torch.randn(1, 2, D), torch.tensor([[37, 803]])
    abar = comp.scheduler.alphas_cumprod.double()[t][..., None]
    e0 = (raw - model.text_mean) / model.text_std
    e_t = (abar.sqrt() * e0 + (1 - abar).sqrt() * eps).float()
    with torch.no_grad():
        want = (model.denoise(model.memory(f), e_t, t.float()) - e0).pow(2).mean(-1)
        got, _ = model(f, raw, eps, t.float())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_generation_is_diffusers_ddim(comp):
    """The generate mode's steps = diffusers' DDIMScheduler (η = 0, trailing spacing, x0-prediction)."""
    from diffusers import DDIMScheduler

    model = DiffDis(tiny_config(comp, generate_steps=4), comp.alphas_cumprod).eval()
    sched = DDIMScheduler.from_config(comp.scheduler.config, prediction_type="sample", timestep_spacing="trailing",
                                      set_alpha_to_one=True, clip_sample=False)
    sched.set_timesteps(4)
    assert [t for t, _ in generate_schedule(comp.num_train_timesteps, 4)] == sched.timesteps.tolist()
    f = features(comp, 2)
    with torch.no_grad():
        memory = model.memory(f)
        e = model.start_noise.expand(2, 1, -1).clone()
        for t in sched.timesteps:
            e0 = model.denoise(memory, e, torch.full((2, 1), float(t)))
            e = sched.step(e0, t, e, eta=0.0).prev_sample
        torch.testing.assert_close(model.generate(memory), e[:, 0], rtol=1e-4, atol=1e-5)


def test_text_query_is_clip_pooler(comp):
    texts = ["a cat", "the number 7 on a page", ""]
    ids = comp.tokenizer(texts, padding="max_length", max_length=comp.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        want = comp.text_encoder(ids).pooler_output
    torch.testing.assert_close(pooled_text(comp, texts), want)


def test_unique_images():
    a, b = np.zeros((8, 8), np.uint8), np.ones((8, 8), np.uint8)
    distinct, index = unique_images([a, b, a.copy(), b, a])
    assert len(distinct) == 2 and index.tolist() == [0, 1, 0, 1, 0]


def test_training_is_deterministic_and_saved(comp, images_for, tmp_path):
    images = images_for(comp, 6)
    pairs_images = images + images  # each image twice, with two captions
    captions = [f"digit {i}" for i in range(6)] + [f"number {i}" for i in range(6)]
    options = DiffDisTrainOptions(epochs=3, batch_size=4, val_fraction=0.34)
    runs = [train_diffdis(comp, pairs_images, captions, tiny_config(comp, seed=s), options) for s in (0, 0, 1)]
    same, other = runs[0].state_dict(), runs[2].state_dict()
    for k, v in runs[1].state_dict().items():
        assert torch.equal(v, same[k]), k
    assert not torch.equal(same["text_in.weight"], other["text_in.weight"])
    t = runs[0].config.training
    assert t["epochs"] <= t["max_epochs"] == 3 and 1 <= t["best_epoch"] <= t["epochs"]
    assert t["images"] == 6 and t["captions"] == 12 and t["val_pairs"] == 4 and t["pairs"] == 8  # 2 images' 4 pairs
    save_diffdis(runs[0], tmp_path / "run")
    loaded = load_diffdis(tmp_path / "run")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, same[k]), k
    assert loaded.config.training == t


# --- unified training (the shared image branch) ---------------------------------------------------
def unified_config(comp, **kw) -> DiffDisConfig:
    from diffscore.reference.features import block_shapes, tappable_blocks

    blocks = tappable_blocks(comp.unet)
    shapes = block_shapes(comp, blocks)
    return DiffDisConfig(blocks=blocks, shapes=[shapes[b] for b in blocks],
                         text_dim=int(comp.text_encoder.config.hidden_size),
                         num_train_timesteps=comp.num_train_timesteps, eos_token_id=int(comp.tokenizer.eos_token_id),
                         dim=16, heads=2, fusion="stages", depth=len(blocks), unified=True, **kw)


def test_stages_fusion_reads_one_block_per_stage(comp):
    """fusion "stages": one fusion block per tapped block, block i reading only UNet block i's tokens."""
    cfg = unified_config(comp)
    model = DiffDis(cfg, comp.alphas_cumprod).eval()
    assert len(model.blocks) == len(cfg.blocks) == 5 and "memory_norms.4.weight" in model.state_dict()
    g = torch.Generator().manual_seed(0)
    f = [torch.randn(2, *s, generator=g) for s in cfg.shapes]
    with torch.no_grad():
        memory = model.memory(f)
        assert [m.shape[1] for m in memory] == [min(s[1], 4) * min(s[2], 4) for s in cfg.shapes]
        x = torch.randn(2, 3, cfg.text_dim, generator=g)
        t = torch.tensor([[5.0, 300.0, 900.0]] * 2)
        h = model.text_in(x) + model.time_mlp(timestep_embedding(t, cfg.dim))
        for block, mem in zip(model.blocks, memory):  # by hand: stage i attends to block i only
            h = block(h, mem)
        torch.testing.assert_close(model.denoise(memory, x, t), model.text_out(model.norm(h)))


def hooked_blocks(unet, blocks, sample, t, emb):
    """The blocks' outputs of one plain UNet call, taken with forward hooks registered here."""
    out, modules = {}, dict(unet.named_modules())
    hooks = [modules[b].register_forward_hook(
                 lambda m, a, o, b=b: out.__setitem__(b, o[0] if isinstance(o, tuple) else o))
             for b in blocks]
    try:
        unet(sample, t, encoder_hidden_states=emb)
    finally:
        for h in hooks:
            h.remove()
    return [out[b] for b in blocks]


def test_unified_loss_is_diffusers_loss_plus_text_loss(comp):
    """unified_loss = w_g · diffusers' text-to-image training loss (DDPMScheduler.add_noise, MSE of the UNet's
    noise prediction) + w_t · the text-diffusion loss on the blocks of the image's pass at the image step, and both
    terms send gradients into the shared UNet."""
    import copy

    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from diffscore.reference.diffdis import unified_loss
    from diffscore.reference.loading import encode_prompts
    from diffscore.reference.scoring_unet import ScoringUNet

    cfg = unified_config(comp)
    model = DiffDis(cfg, comp.alphas_cumprod).eval()
    unet = copy.deepcopy(comp.unet).requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    B, C, S, D = 3, int(unet.config.in_channels), int(unet.config.sample_size), cfg.text_dim
    x0, x_img, gen_eps = (torch.randn(B, C, S, S, generator=g) for _ in range(3))
    cond, empty = encode_prompts(comp, ["a cat", "a dog", ""]), encode_prompts(comp, [""])
    text, eps = torch.randn(B, 1, D, generator=g), torch.randn(B, 1, D, generator=g)
    gen_t, t = torch.tensor([3, 480, 977]), torch.tensor([[10], [500], [999]])
    scoring = ScoringUNet(unet, attention_layers=[], feature_blocks=cfg.blocks)
    total, gen, txt = unified_loss(model, scoring, comp, x0, x_img, cond, empty, text, gen_t, gen_eps, t, eps, 0.7, 1.3)
    scoring.remove_hooks()

    sched = DDPMScheduler.from_config(comp.scheduler.config)
    with torch.no_grad():
        noisy = sched.add_noise(x0, gen_eps, gen_t)
        want_gen = F.mse_loss(unet(noisy, gen_t, encoder_hidden_states=cond).sample.float(), gen_eps.float(),
                              reduction="mean")
        feats = hooked_blocks(unet, cfg.blocks, x_img, torch.full((B,), float(cfg.image_step)), empty.expand(B, -1, -1))
        abar = sched.alphas_cumprod.double()[t][..., None]
        e0 = (text - model.text_mean) / model.text_std
        e_t = (abar.sqrt() * e0 + (1 - abar).sqrt() * eps).float()
        want_txt = (model.denoise(model.memory(feats), e_t, t.float()) - e0).pow(2).mean()
    torch.testing.assert_close(gen, want_gen, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(txt, want_txt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, 0.7 * want_gen + 1.3 * want_txt, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(txt, [unet.down_blocks[0].resnets[0].conv1.weight, model.text_in.weight])
    assert all(gr.abs().sum() > 0 for gr in grads)  # the text loss trains the image branch too


def test_unified_training_saves_its_unet(comp, images_for, tmp_path):
    """Unified training leaves comp.unet as it is, ships the trained UNet beside the text stream, and the image
    branch rebuilt from the files is that UNet."""
    from diffscore.reference.diffdis import image_branch

    before = {k: v.clone() for k, v in comp.unet.state_dict().items()}
    images = images_for(comp, 6)
    options = DiffDisTrainOptions(epochs=2, batch_size=4, val_fraction=0.34, unet_lr=1e-3, generation_weight=0.5)
    model = train_diffdis(comp, images + images, [f"digit {i}" for i in range(12)], unified_config(comp), options)
    for k, v in comp.unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, before[k]) for k, v in model.unet_state.items())
    t = model.config.training
    assert t["generation_weight"] == 0.5 and {"val_generation", "val_text"} <= set(t)
    save_diffdis(model, tmp_path / "run")
    loaded = load_diffdis(tmp_path / "run")
    assert loaded.config.unified and loaded.config.fusion == "stages"
    for k, v in image_branch(comp, loaded).state_dict().items():
        assert torch.equal(v, model.unet_state[k]), k
    assert image_branch(comp, DiffDis(tiny_config(comp))) is comp.unet  # the frozen variant reads the model's own
