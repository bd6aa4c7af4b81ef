"""Shared fixtures: tiny diffusers model folders built in the test (SD 1.x-style, SD 2.x-style,
pixel space) and the shipped demo model. Tiny means seconds, not minutes, on 2 CPU cores."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The checkout root *is* the diffscore package (pyproject maps it), so with the root on sys.path its folders are
# importable as top-level names: `python -m pytest` puts it there, and our `kernels/` then shadows Hugging Face's
# `kernels` package, which transformers imports ("cannot import name 'CUDAProperties' from 'kernels'"). Tests
# import diffscore from the install only; PYTHONSAFEPATH keeps the root off the path of `python -m` subprocesses.
os.environ["PYTHONSAFEPATH"] = "1"
sys.path[:] = [p for p in sys.path if p not in ("", ".") and Path(p).resolve() != REPO]
DEMO_MODEL = REPO / "models" / "demo"
KINDS = ("sd1", "sd2", "pixel")


def build_tiny_model(path: Path, kind: str, seed: int = 0) -> Path:
    """A random-weight model folder in the diffusers layout; `kind` picks the UNet flavour."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    common = dict(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=16, norm_num_groups=8
    )
    if kind == "sd1":
        unet = UNet2DConditionModel(
            in_channels=4, out_channels=4, attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **common,
        )
    elif kind == "sd2":  # linear projections, per-block head dims, upcast attention
        unet = UNet2DConditionModel(
            in_channels=4, out_channels=4, attention_head_dim=(2, 4), use_linear_projection=True,
            upcast_attention=True,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), **common,
        )
    elif kind == "pixel":
        unet = UNet2DConditionModel(
            in_channels=1, out_channels=1, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), **common,
        )
    else:
        raise ValueError(kind)
    unet.save_pretrained(path / "unet")
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    text.save_pretrained(path / "text_encoder")
    shutil.copytree(DEMO_MODEL / "tokenizer", path / "tokenizer")
    if kind == "pixel":
        DDPMScheduler(num_train_timesteps=1000).save_pretrained(path / "scheduler")
    else:
        PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                      beta_end=0.012).save_pretrained(path / "scheduler")
        AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        ).save_pretrained(path / "vae")
    (path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    return path


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """The user cache (auto's measured verdicts, compiled models, features) in this session's own folder, for this
    process and the CLI processes it starts: a verdict measured earlier, under another load, never decides a test,
    and the suite writes nothing into ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFSCORE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {kind: build_tiny_model(root / kind, kind) for kind in KINDS}


@pytest.fixture(scope="session")
def engines(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The tiny SD1 and pixel models exported once (fp32), shared by the runtime tests."""
    from diffscore.export.onnx_export import export_engine

    root = tmp_path_factory.mktemp("engines")
    return {k: export_engine(tiny_models[k], root / k, show_progress=False) for k in ("sd1", "pixel")}


@pytest.fixture(scope="session")
def images_for():
    """images_for(components, n, seed=0): n random uint8 images of the model's size and channels."""
    import numpy as np

    def make(comp, n, seed=0):
        rng = np.random.default_rng(seed)
        shape = (comp.image_size, comp.image_size) + ((3,) if comp.image_channels == 3 else ())
        return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]

    return make


@pytest.fixture(scope="session")
def demo_model() -> Path:
    if not (DEMO_MODEL / "unet").is_dir():
        pytest.fail(f"the shipped demo model is missing at {DEMO_MODEL}")
    return DEMO_MODEL


@pytest.fixture(scope="session")
def demo_engine(demo_model, tmp_path_factory) -> Path:
    """The demo model exported (fp32 + fp16) with the demo's scoring defaults, shared by the tests that need it."""
    from diffscore.app.demo import DEMO_LOSS, DEMO_STAGES
    from diffscore.app.digits import DEFAULT_TEMPLATE
    from diffscore.export.onnx_export import export_engine

    return export_engine(demo_model, tmp_path_factory.mktemp("demo") / "engine", precisions=("fp32", "fp16"),
                         defaults={"template": DEFAULT_TEMPLATE, "stages": [list(s) for s in DEMO_STAGES],
                                   "loss": DEMO_LOSS, "strategy": "stages"}, show_progress=False)


@pytest.fixture
def run_cli_out(capsys):
    """Run `diffscore ARGS...` in this process; returns (exit code, stdout, stderr), 0 when it returns normally."""

    def run(*args) -> tuple[int, str, str]:
        from diffscore.app import cli

        try:
            cli.main([*map(str, args)])
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code or 0
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def run_cli(run_cli_out):
    """Run `diffscore ARGS...` in this process; returns (exit code, stderr)."""

    def run(*args) -> tuple[int, str]:
        code, _, err = run_cli_out(*args)
        return code, err

    return run
