"""Images as users have them, against independent computations: numpy rotations and colour maths,
torchvision's Resize + CenterCrop arithmetic written out with its numbers."""

import numpy as np
import pytest
from PIL import Image

from diffscore.engine.images import MAX_PIXELS_ENV, preprocess
from diffscore.errors import EngineError

RNG = np.random.default_rng(0)


def scaled(x):
    return np.asarray(x, np.float32) / 127.5 - 1


@pytest.mark.parametrize("w,h,new,box", [
    (50, 30, (26, 16), (5, 0)),     # 16·50/30 = 26.67: truncated to 26 (rounding gave 27); crop round(5.0) = 5
    (23, 37, (16, 25), (0, 4)),     # 16·37/23 = 25.7 -> 25; (25 − 16)/2 = 4.5 -> 4 (Python's round to even)
    (16, 40, (16, 40), (0, 12)),    # short side already 16: no resize; crop offset 12
])
def test_non_square_matches_torchvision_resize_center_crop(w, h, new, box):
    arr = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    resized = im if new == (w, h) else im.resize(new, Image.BICUBIC)  # torchvision's PIL path: Image.resize
    want = np.asarray(resized)[box[1] : box[1] + 16, box[0] : box[0] + 16]
    np.testing.assert_array_equal(preprocess(arr, 16, 3), scaled(want).transpose(2, 0, 1))


def test_rgb_to_greyscale_after_the_resize():
    arr = RNG.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    small = Image.fromarray(arr).resize((26, 16), Image.BICUBIC).crop((5, 0, 21, 16))
    r, g, b = (np.asarray(small, np.int64)[..., i] for i in range(3))
    luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16  # ITU-R 601-2, Pillow's fixed-point form
    np.testing.assert_array_equal(preprocess(arr, 16, 1)[0], scaled(luma))


def test_exif_orientation_is_applied(tmp_path):
    upright = RNG.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    stored = np.rot90(upright, k=1)  # orientation 6: the viewer rotates 90° clockwise to display
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)
    np.testing.assert_array_equal(preprocess(tmp_path / "phone.png", 16, 3), preprocess(upright, 16, 3))
    assert not np.array_equal(preprocess(tmp_path / "phone.png", 16, 3), preprocess(stored, 16, 3))


def test_16_bit_greyscale_keeps_its_scale(tmp_path):
    arr = RNG.integers(0, 65536, (16, 16), dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    want = arr / 65535 * 2 - 1
    for channels in (1, 3):
        got = preprocess(tmp_path / "deep.png", 16, channels)
        assert got.shape == (channels, 16, 16)
        np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), atol=1e-6)


def test_float_image_in_unit_range():
    arr = RNG.random((16, 16), dtype=np.float32)
    np.testing.assert_allclose(preprocess(Image.fromarray(arr), 16, 1)[0], arr * 2 - 1, atol=1e-6)


def test_alpha_is_composited_onto_white():
    rgba = RNG.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    a = rgba[..., 3:] / 255.0
    want = a * rgba[..., :3] + (1 - a) * 255
    np.testing.assert_allclose(preprocess(rgba, 16, 3), scaled(want).transpose(2, 0, 1), atol=1.01 / 127.5)
    la = Image.fromarray(rgba[..., [0, 3]], mode="LA")
    want_grey = a[..., 0] * rgba[..., 0] + (1 - a[..., 0]) * 255
    np.testing.assert_allclose(preprocess(la, 16, 1)[0], scaled(want_grey), atol=1.01 / 127.5)


def test_palette_and_cmyk():
    idx = RNG.integers(0, 4, (16, 16), dtype=np.uint8)
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], np.uint8)
    p = Image.fromarray(idx, mode="P")
    p.putpalette(palette.ravel().tolist())
    np.testing.assert_array_equal(preprocess(p, 16, 3), scaled(palette[idx]).transpose(2, 0, 1))
    cmyk = RNG.integers(0, 256, (16, 16, 4), dtype=np.uint8).astype(np.float64)
    want = (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255  # R = (1 − C)(1 − K), Pillow's CMYK -> RGB
    got = preprocess(Image.fromarray(cmyk.astype(np.uint8), mode="CMYK"), 16, 3)
    np.testing.assert_allclose(got, scaled(want).transpose(2, 0, 1), atol=0.51 / 127.5)


def test_decompression_bomb_is_refused_in_one_line(tmp_path, monkeypatch):
    Image.new("L", (200, 100)).save(tmp_path / "big.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "10000")
    with pytest.raises(EngineError, match=f"more pixels than the limit of 10,000.*{MAX_PIXELS_ENV}") as info:
        preprocess(tmp_path / "big.png", 16, 1)
    assert "\n" not in str(info.value)
    monkeypatch.setenv(MAX_PIXELS_ENV, "20000")  # the documented way to let it through
    assert preprocess(tmp_path / "big.png", 16, 1).shape == (1, 16, 16)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's own setting is left as it was


def test_an_image_too_elongated_to_resize_is_refused_in_one_line(monkeypatch):
    """1 x 200 px is under a 10,000-pixel limit, but its short side at 16 px makes 16 x 3,200 = 51,200 pixels."""
    monkeypatch.setenv(MAX_PIXELS_ENV, "10000")
    with pytest.raises(EngineError, match="1 x 200 pixels is too elongated.*51,200 pixels, over the limit of 10,000"):
        preprocess(Image.new("L", (1, 200)), 16, 1)
    assert preprocess(Image.new("L", (1, 30)), 16, 1).shape == (1, 16, 16)  # 16 x 480 = 7,680: fine


def test_folders_are_searched_into_subfolders_in_path_order(tmp_path):
    """`<label>/` layouts (train-head's) work wherever images are read; hidden folders stay out."""
    from diffscore.engine.images import expand_images

    for name in ("b/2.png", "a/1.png", "a/sub/0.png", "top.png", ".hidden/x.png", "a/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (4, 4)).save(tmp_path / name) if name.endswith(".png") else (tmp_path / name).write_text("x")
    found = [p.relative_to(tmp_path).as_posix() for p in expand_images([tmp_path])]
    assert found == ["a/1.png", "a/sub/0.png", "b/2.png", "top.png"]


def test_classify_iter_results_carry_their_image_path(engines, tmp_path):
    import diffscore

    paths = []
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    eng = diffscore.load(engines["pixel"], backend="ort-cpu")
    images = [str(paths[0]), paths[1], np.asarray(Image.open(paths[2]))]  # str, Path, pixels
    got = list(eng.classify_iter(iter(images), ["a", "b"], stages=[(2, 1)]))
    assert [r.image for r in got] == [str(paths[0]), str(paths[1]), None]
    assert got[0].to_dict()["image"] == str(paths[0]) and "image" not in got[2].to_dict()
