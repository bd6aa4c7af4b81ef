"""One local Ray instance for every Ray test (bounded: 2 CPUs, a small object store, no dashboard),
torn down at the end of the session; and one engine for them: the shipped demo model with a small
trained linear head, so the Diffusion Classifier, DSD matching and the head all run on it."""

from __future__ import annotations

import pytest
from PIL import Image

from diffscore.app.demo import DEMO_LOSS, DEMO_STAGES
from diffscore.app.digits import CLASS_NAMES, DEFAULT_TEMPLATE, load_digits_split

N_IMAGES = 12  # held-out digits scored through Ray: enough for several batches, cheap on 2 cores


@pytest.fixture(scope="session")
def ray_session():
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'diffscore[ray]'")
    import ray

    from diffscore.app.scale import start_ray

    assert not ray.is_initialized(), "another test left Ray running"
    start_ray(num_cpus=2, object_store_mb=300)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def scale_engine(demo_model, tmp_path_factory):
    """The demo engine plus a linear head (mid_block at t=50, 100 training digits, a few epochs)."""
    from diffscore.export.onnx_export import export_engine
    from diffscore.reference.features import FeatureSpec
    from diffscore.reference.head_training import TrainOptions, train_head_on_images
    from diffscore.reference.heads import save_head

    root = tmp_path_factory.mktemp("scale")
    split = load_digits_split()
    head, config = train_head_on_images(demo_model, list(split.train_images[:100]), split.train_labels[:100],
                                        list(CLASS_NAMES), "linear", FeatureSpec(["mid_block"], [50]),
                                        TrainOptions(epochs=10))
    save_head(head, config, root / "digits")
    return export_engine(demo_model, root / "engine", heads=[root / "digits"], show_progress=False,
                         defaults={"template": DEFAULT_TEMPLATE, "stages": [list(s) for s in DEMO_STAGES],
                                   "loss": DEMO_LOSS})


@pytest.fixture(scope="session")
def digit_files(tmp_path_factory):
    """(folder of PNGs, the same images as uint8 arrays), held-out digits, lossless."""
    folder = tmp_path_factory.mktemp("digits")
    images = list(load_digits_split().test_images[:N_IMAGES])
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder, images
