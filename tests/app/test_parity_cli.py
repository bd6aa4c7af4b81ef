"""`diffscore parity ENGINE IMAGES... --labels a,b`: the decision checks run on the user's own images."""


import numpy as np
import pytest
from PIL import Image

from diffscore.export.onnx_export import export_engine


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity-cli")
    engine = export_engine(tiny_models["pixel"], root / "engine", precisions=("fp32", "fp16"), show_progress=False)
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir()
    for i in range(3):  # non-square, RGB: the user's photos, not the demo's 8 px digits
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / "imgs" / f"{i}.png")
    return engine, root / "imgs"


def parity(run_cli_out, *args):
    code, out, err = run_cli_out("parity", *args)
    return code, out + err


def test_decisions_on_user_images(setup, run_cli_out):
    engine, imgs = setup
    code, text = parity(run_cli_out, engine, imgs, "--labels", "cat,dog")
    for precision in ("fp32", "fp16"):
        assert (f"PASSED | ort-cpu {precision} decisions | top-1 agreement with torch fp32 = 100.00% on 3 of your "
                "images") in text
    assert code == 0


def test_limit_and_a_disagreeing_model_fails(setup, tiny_models, tmp_path, run_cli_out):
    import shutil

    import torch
    from diffusers import UNet2DConditionModel

    engine, imgs = setup
    other = shutil.copytree(tiny_models["pixel"], tmp_path / "other")  # same layout, other UNet weights
    unet = UNet2DConditionModel.from_pretrained(other / "unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(other / "unet")
    code, text = parity(run_cli_out, engine, str(imgs / "*.png"), "--labels", "cat,dog", "--limit", "2",
                        "--model", other)
    assert "on 2 of your images" in text
    assert "FAILED | " in text and code == 1 and "parity failed" in text  # a failing check exits non-zero


def test_labels_without_images_and_images_without_labels(setup, run_cli_out):
    engine, imgs = setup
    code, text = parity(run_cli_out, engine, "--labels", "cat,dog")
    assert code == 2 and "--labels needs images" in text and "Traceback" not in text
    code, text = parity(run_cli_out, engine, imgs)
    assert code == 2 and "give exactly one of --labels" in text
