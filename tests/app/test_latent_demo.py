"""The shipped latent-space demo model (models/demo-latent): trained weights through the VAE path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffscore.app.demo import DEMO_LOSS, DEMO_MODEL
from diffscore.app.digits import CLASS_NAMES, DEFAULT_TEMPLATE, load_digits_split

LATENT_MODEL = DEMO_MODEL.parent / "demo-latent"
IMAGES = 20
STAGES = [(10, 3), (40, 1)]


@pytest.fixture(scope="module")
def latent_engine(tmp_path_factory):
    from diffscore.export.onnx_export import export_engine

    if not (LATENT_MODEL / "vae").is_dir():
        pytest.fail(f"the shipped latent demo model is missing at {LATENT_MODEL}")
    return export_engine(LATENT_MODEL, tmp_path_factory.mktemp("latent") / "engine", show_progress=False)


def test_latent_demo_encodes_like_diffusers(latent_engine):
    """The engine's x0 = diffusers' AutoencoderKL posterior mean × scaling factor on the same pixels."""
    from diffusers import AutoencoderKL

    import diffscore
    from diffscore.engine.images import preprocess_batch

    digits = list(load_digits_split().test_images[:4])
    engine = diffscore.load(latent_engine, backend="ort-cpu")
    assert engine.manifest.sample_shape == [4, 8, 8] and engine.manifest.image_size == 32
    vae = AutoencoderKL.from_pretrained(LATENT_MODEL / "vae", local_files_only=True).eval()
    with torch.no_grad():
        want = (vae.encode(torch.from_numpy(preprocess_batch(digits, 32, 1))).latent_dist.mean
                * vae.config.scaling_factor)
    np.testing.assert_allclose(engine.encode_images(digits), want.numpy(), rtol=0, atol=1e-4)


def test_latent_demo_classifies_held_out_digits_as_torch_does(latent_engine):
    """Trained weights, not random ones: the engine is accurate and decides as the torch reference does."""
    import diffscore
    from diffscore.reference.classifier import classify_reference
    from diffscore.reference.loading import load_components

    split = load_digits_split()
    images, truth = list(split.test_images[:IMAGES]), split.test_labels[:IMAGES]
    options = dict(templates=[DEFAULT_TEMPLATE], stages=STAGES, loss=DEMO_LOSS, seed=0)
    got = diffscore.load(latent_engine, backend="ort-cpu").classify(images, list(CLASS_NAMES), **options)
    want = classify_reference(load_components(LATENT_MODEL), images, list(CLASS_NAMES), **options)
    assert [r.label for r in got] == [r.label for r in want]
    accuracy = np.mean([CLASS_NAMES.index(r.label) == t for r, t in zip(got, truth)])
    assert accuracy >= 0.85, accuracy
