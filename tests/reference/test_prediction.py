"""Prediction types: ε̂ from the UNet output checked against diffusers' own schedulers, and a v-prediction
model scored on ε̂ by the runtime and the reference alike."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler

import diffscore
from diffscore.engine.manifest import MANIFEST_NAME, Manifest
from diffscore.export.onnx_export import export_engine
from diffscore.kernels import epsilon_from_output
from diffscore.reference.classifier import classify_reference
from diffscore.reference.loading import epsilon_hat, load_components
from diffscore.reference.matching import match_reference
from diffscore.reference.scoring_unet import ScoringUNet

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def scheduler_epsilon(cls, prediction_type, out, x_t, step_index):
    """ε̂ as the diffusers scheduler itself uses it in one denoising step (eta = 0, no churn)."""
    clip = {"clip_sample": False} if cls in (DDIMScheduler, DDPMScheduler) else {}  # no x0̂ clipping
    s = cls(**SD, **clip, prediction_type=prediction_type, timestep_spacing="leading")
    s.set_timesteps(10)
    t = int(s.timesteps[step_index])
    abar = s.alphas_cumprod
    if cls is DDIMScheduler:  # prev = sqrt(ā_prev)·x0̂ + sqrt(1−ā_prev)·ε̂
        r = s.step(out, t, x_t, eta=0.0)
        t_prev = t - 1000 // 10
        ap = abar[t_prev] if t_prev >= 0 else s.final_alpha_cumprod
        return t, (r.prev_sample - ap.sqrt() * r.pred_original_sample) / (1 - ap).sqrt()
    if cls is DDPMScheduler:  # x_t = sqrt(ā)·x0̂ + sqrt(1−ā)·ε̂
        x0 = s.step(out, t, x_t).pred_original_sample
        return t, (x_t - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()
    if cls is EulerDiscreteScheduler:  # σ-space sample x_t·sqrt(σ²+1); the step is x + ε̂·(σ_next − σ)
        sigma, sigma_next = s.sigmas[step_index], s.sigmas[step_index + 1]
        x = x_t * (sigma**2 + 1).sqrt()
        s._step_index = step_index
        return t, (s.step(out, s.timesteps[step_index], x).prev_sample - x) / (sigma_next - sigma)
    if cls is PNDMScheduler:  # _get_prev_sample is DDIM's step on its ε̂ (formula (9) of the PNDM paper)
        t_prev = t - 1000 // 10
        prev = s._get_prev_sample(x_t, t, t_prev, out)
        a, ap = abar[t].sqrt(), abar[t_prev].sqrt()
        sa, sp = (1 - abar[t]).sqrt(), (1 - abar[t_prev]).sqrt()
        return t, (prev - ap / a * x_t) / (sp - ap * sa / a)
    raise ValueError(cls)


@pytest.mark.parametrize("cls,prediction_type", [
    (DDIMScheduler, "v_prediction"), (DDIMScheduler, "sample"), (DDIMScheduler, "epsilon"),
    (DDPMScheduler, "v_prediction"), (DDPMScheduler, "sample"),
    (EulerDiscreteScheduler, "v_prediction"), (EulerDiscreteScheduler, "sample"),
    (PNDMScheduler, "v_prediction"),
])
@pytest.mark.parametrize("step_index", [1, 7])
def test_epsilon_matches_diffusers_scheduler(cls, prediction_type, step_index):
    g = torch.Generator().manual_seed(step_index)
    out, x_t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t, want = scheduler_epsilon(cls, prediction_type, out, x_t, step_index)
    abar = cls(**SD).alphas_cumprod.double()
    got = epsilon_from_output(out.numpy(), x_t.numpy(), np.full(2, abar[t].item()), prediction_type)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=2e-4)

    class Comp:  # what epsilon_hat reads of a loaded model
        alphas_cumprod = abar

    Comp.prediction_type = prediction_type
    np.testing.assert_allclose(epsilon_hat(Comp, out, x_t, torch.tensor([t, t])).numpy(), want.numpy(),
                               rtol=1e-4, atol=2e-4)


def with_scheduler(src, dst, cls, prediction_type):
    model = shutil.copytree(src, dst)
    shutil.rmtree(model / "scheduler")
    cls(**SD, prediction_type=prediction_type).save_pretrained(model / "scheduler")
    return model


@pytest.fixture(scope="module")
def vpred(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("vpred")
    model = with_scheduler(tiny_models["sd1"], root / "model", EulerDiscreteScheduler, "v_prediction")
    return model, export_engine(model, root / "engine", show_progress=False)


def test_vprediction_engine_equals_reference_on_epsilon(vpred, tiny_models):
    model, engine_dir = vpred
    comp = load_components(model)
    assert comp.prediction_type == "v_prediction" and Manifest.load(engine_dir).prediction_type == "v_prediction"
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    labels = ["cat", "dog", "bird"]
    opts = dict(stages=[(4, 2), (8, 1)], loss="l2", seed=1)
    eng = diffscore.load(engine_dir, backend="ort-cpu")
    got = eng.classify(imgs, labels, **opts)
    want = classify_reference(comp, imgs, labels, **opts)
    for g, w in zip(got, want):
        assert g.label == w.label
        np.testing.assert_allclose([s for _, s in g.ranking], [s for _, s in w.ranking], rtol=1e-4)
    # the same weights read as an ε-model score differently: the conversion is really applied
    eps_model = load_components(tiny_models["sd1"])
    raw = classify_reference(eps_model, imgs, labels, **opts)
    assert not np.allclose([r.scores["cat"] for r in raw], [w.scores["cat"] for w in want], rtol=1e-3)
    # DSD's denoising bias is on ε̂ too
    su = ScoringUNet(comp.unet, eng.manifest.attention_layers)
    np.testing.assert_allclose(eng.match(imgs, labels, steps=3, bias_weight=1.0),
                               match_reference(comp, su, imgs, labels, steps=3, bias_weight=1.0), rtol=1e-4)


def test_reference_error_is_on_epsilon_by_hand(vpred):
    """ε̂ of the real v-prediction UNet at one (x_t, t), recovered from DDPM's own x0̂."""
    model, _ = vpred
    comp = load_components(model)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn_like(x0)
    t = 501
    abar = comp.alphas_cumprod[t]
    x_t = (abar.sqrt() * x0 + (1 - abar).sqrt() * eps).float()
    emb = torch.zeros(1, 16, 16)
    out = comp.unet(x_t, torch.tensor([t]), encoder_hidden_states=emb).sample
    ddpm = DDPMScheduler(**SD, prediction_type="v_prediction", clip_sample=False)
    x0_hat = ddpm.step(out, t, x_t).pred_original_sample
    want = (x_t - abar.sqrt() * x0_hat) / (1 - abar).sqrt()
    np.testing.assert_allclose(epsilon_hat(comp, out, x_t, t).numpy(), want.numpy(), rtol=1e-4, atol=1e-5)


def test_older_manifest_without_prediction_type_loads_as_epsilon(vpred, tmp_path):
    engine_dir = shutil.copytree(vpred[1], tmp_path / "old")
    raw = json.loads((engine_dir / MANIFEST_NAME).read_text())
    del raw["prediction_type"]
    (engine_dir / MANIFEST_NAME).write_text(json.dumps(raw))
    assert Manifest.load(engine_dir).prediction_type == "epsilon"
