"""`diffscore parity ENGINE IMAGES... --labels a,b`: the decision checks run on the user's own images."""

import sys

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


def parity(monkeypatch, capsys, *args):
    from diffscore.app import cli

    monkeypatch.setattr(sys, "argv", ["diffscore", "parity", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_decisions_on_user_images(setup, monkeypatch, capsys):
    engine, imgs = setup
    code, text = parity(monkeypatch, capsys, engine, imgs, "--labels", "cat,dog")
    for precision in ("fp32", "fp16"):
        assert f"PASSED | ort-cpu {precision} decisions | top-1 agreement with torch fp32 = 100.00% on 3 of your images" in text
    assert code == 0


def test_limit_and_a_disagreeing_model_fails(setup, tiny_models, tmp_path, monkeypatch, capsys):
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
    code, text = parity(monkeypatch, capsys, engine, str(imgs / "*.png"), "--labels", "cat,dog", "--limit", "2",
                        "--model", other)
    assert "on 2 of your images" in text
    assert "FAILED | " in text  # (its exit code is main()'s to carry: the lead's fix of typer.Exit under standalone_mode=False)


def test_labels_without_images_and_images_without_labels(setup, monkeypatch, capsys):
    engine, imgs = setup
    code, text = parity(monkeypatch, capsys, engine, "--labels", "cat,dog")
    assert code == 1 and "--labels needs images" in text and "Traceback" not in text
    code, text = parity(monkeypatch, capsys, engine, imgs)
    assert code == 1 and "give exactly one of --labels" in text
