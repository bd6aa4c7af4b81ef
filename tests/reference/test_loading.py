"""Loading a local diffusers folder: it works for each kind, and each user mistake is one clear line."""

import json
import shutil

import pytest

from diffscore.errors import EngineError
from diffscore.reference.loading import load_components


@pytest.mark.parametrize("kind", ["sd1", "sd2", "pixel"])
def test_loads_each_kind(tiny_models, kind):
    comp = load_components(tiny_models[kind])
    assert comp.pixel_space == (kind == "pixel")
    assert comp.image_size == (8 if kind == "pixel" else 16)
    assert comp.alphas_cumprod.shape == (1000,)


def test_missing_folder(tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        load_components(tmp_path / "nope")


def test_not_a_diffusers_folder(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(EngineError, match="not a diffusers model folder"):
        load_components(tmp_path)


def test_missing_component(tiny_models, tmp_path):
    broken = shutil.copytree(tiny_models["pixel"], tmp_path / "m")
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(EngineError, match="no text_encoder/ component"):
        load_components(broken)


def test_unknown_scheduler(tiny_models, tmp_path):
    broken = shutil.copytree(tiny_models["pixel"], tmp_path / "m")
    cfg = broken / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "_class_name": "WarpScheduler"}))
    with pytest.raises(EngineError, match="unknown scheduler 'WarpScheduler'"):
        load_components(broken)


def test_error_is_one_line(tmp_path):
    with pytest.raises(EngineError) as info:
        load_components(tmp_path / "missing")
    assert "\n" not in str(info.value)


def test_torch_noising_is_diffusers_add_noise():
    """reference.loading.add_noise = diffusers' DDPMScheduler.add_noise, per-row timesteps and one shared t."""
    import torch
    from diffusers import DDPMScheduler

    from diffscore.reference.loading import add_noise

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([1, 500, 999])
    want = sched.add_noise(x0.expand(3, -1, -1, -1), eps, t)
    torch.testing.assert_close(add_noise(x0, eps, sched.alphas_cumprod.double(), t), want, rtol=1e-6, atol=1e-6)
    batch = torch.randn(3, 4, 8, 8, generator=g)
    torch.testing.assert_close(add_noise(batch, eps, sched.alphas_cumprod.double(), 700),
                               sched.add_noise(batch, eps, torch.tensor([700] * 3)), rtol=1e-6, atol=1e-6)
