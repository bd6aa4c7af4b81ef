"""Image input for both paths: one implementation, so reference and runtime see identical pixels.

Pillow + numpy only. Images are taken as users have them: EXIF orientation applied; alpha (RGBA, LA,
transparent palettes) composited onto BACKGROUND (white); palette, CMYK and other colour modes converted
to RGB; 16-bit (I;16, I) and float (F, values in [0, 1]) greyscale kept at full precision. Then exactly
torchvision's ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` (the seed's preprocessing): shorter side to
`size`, long side *truncated* (int(size·long/short)), crop offsets int(round((new − size)/2)); the
conversion to the model's channels (RGB or greyscale) comes after the resize, as the seed's
``_convert_image_to_rgb`` does; finally [-1, 1], channels first.

Decompression bombs (images over MAX_IMAGE_PIXELS, Pillow's limit, ~89.5 M pixels) are refused in one
line; the environment variable DIFFSCORE_MAX_IMAGE_PIXELS raises the limit.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diffscore.errors import EngineError, first_line, not_a_file

ImageInput = Union[str, Path, Image.Image, np.ndarray]
BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white
MAX_PIXELS_ENV = "DIFFSCORE_MAX_IMAGE_PIXELS"
HIGH_BIT = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I": 65535.0}  # full-scale value per mode


def max_image_pixels() -> int:
    """The decompression-bomb limit: DIFFSCORE_MAX_IMAGE_PIXELS, else Pillow's default."""
    raw = os.environ.get(MAX_PIXELS_ENV)
    if raw is None:
        return int(Image.MAX_IMAGE_PIXELS or 0) or 89_478_485
    if not raw.strip().isdigit():
        raise EngineError(f"{MAX_PIXELS_ENV}={raw!r} is not a whole number of pixels")
    return int(raw)


def open_image(path: Path) -> Image.Image:
    """Read an image file fully, refusing decompression bombs in one line."""
    return read_image(path, f"image {path}")


def decode_image(data: bytes, name: str) -> Image.Image:
    """Image bytes from an untrusted sender (the HTTP API, a dataset column): the checks of a file, and only
    the formats of IMAGE_SUFFIXES (Pillow's other decoders, some of which run external programs, stay off)."""
    return read_image(io.BytesIO(data), name, formats=IMAGE_FORMATS)


def read_image(source, name: str, formats=None) -> Image.Image:
    """A path or file object read fully, `name` in the one-line refusals (bomb, unknown format, damage)."""
    limit, saved = max_image_pixels(), Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow only warns up to 2x its limit
            Image.MAX_IMAGE_PIXELS = limit
            with Image.open(source, formats=formats) as im:
                im.load()
                return im.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise EngineError(f"{name} has more pixels than the limit of {limit:,} (a decompression-bomb guard); "
                          f"if you trust it, raise the limit with {MAX_PIXELS_ENV}=N") from None
    except UnidentifiedImageError:
        allowed = f" ({', '.join(formats)})" if formats else ""
        raise EngineError(f"cannot read {name}: not an image in a known format{allowed}") from None
    except (OSError, ValueError, SyntaxError, struct.error) as e:  # damaged files raise any of these in Pillow
        raise EngineError(f"cannot read {name}: {first_line(e) or type(e).__name__}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def to_pil(image: ImageInput) -> Image.Image:
    """Accept a path, a PIL image or a uint8 array (H,W) / (H,W,C); refuse anything else clearly."""
    if isinstance(image, Image.Image):
        return has_pixels(image, "PIL image")
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise EngineError(not_a_file(path, "image file"))
        return has_pixels(open_image(path), f"image {path}")
    if isinstance(image, np.ndarray):
        channels_ok = image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 2, 3, 4))
        if image.dtype != np.uint8 or not channels_ok or min(image.shape[:2], default=0) < 1:
            raise EngineError(
                f"array images must be uint8 (H,W) or (H,W,C) with C 1 to 4 and H, W >= 1, got "
                f"{image.dtype}{list(image.shape)}; convert with (x * 255).round().astype(np.uint8)"
            )
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    raise EngineError(f"unsupported image type {type(image).__name__}: give a path, a PIL image or a uint8 array")


def has_pixels(im: Image.Image, what: str) -> Image.Image:
    """Refuse an empty (0-pixel) image: resizing it would divide by zero."""
    if 0 in im.size:
        raise EngineError(f"{what} is {im.size[0]} × {im.size[1]} pixels: nothing to score")
    return im


def canonical(im: Image.Image) -> Image.Image:
    """Upright, opaque image in mode L or RGB (8-bit), or F (greyscale in [0, 1]) for 16-bit/float sources."""
    im = ImageOps.exif_transpose(im)
    if im.mode in HIGH_BIT:
        # float32 -> mode F
        return Image.fromarray(np.clip(np.asarray(im, dtype=np.float32) / HIGH_BIT[im.mode], 0.0, 1.0))
    if im.mode in ("L", "RGB", "F"):
        return im
    if im.mode == "1":
        return im.convert("L")
    if im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (im.mode == "P" and "transparency" in im.info):
        grey = im.mode in ("LA", "La")
        flat = Image.alpha_composite(Image.new("RGBA", im.size, (*BACKGROUND, 255)), im.convert("RGBA"))
        return flat.convert("L" if grey else "RGB")
    return im.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(size, BICUBIC) + CenterCrop(size) on a PIL image."""
    w, h = im.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)  # truncated, as torchvision's _compute_resized_output_size
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if new_w * new_h > max_image_pixels():  # a 1 x 50M strip is within the bomb limit, its resize is not
        raise EngineError(f"image of {w} x {h} pixels is too elongated: resizing its short side to {size} would make "
                          f"{new_w * new_h:,} pixels, over the limit of {max_image_pixels():,} ({MAX_PIXELS_ENV})")
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def preprocess(image: ImageInput, size: int, channels: int) -> np.ndarray:
    """(channels, size, size) float32 in [-1, 1]: canonical mode, resize + centre crop, then channels."""
    im = resize_center_crop(canonical(to_pil(image)), size)
    if im.mode == "F":
        x = np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0) * 2.0 - 1.0  # bicubic may overshoot, as 8-bit clips
    else:
        if channels == 1 and im.mode == "RGB":
            im = im.convert("L")
        x = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    if x.ndim == 2:
        x = x[None] if channels == 1 else np.repeat(x[None], 3, axis=0)
    else:
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


def preprocess_batch(images, size: int, channels: int) -> np.ndarray:
    """(N, C, size, size) float32 from a list (or tuple) of image inputs, or from a single one."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise EngineError("no images given")
    return np.stack([preprocess(im, size, channels) for im in images])


IMAGE_WINDOW = 16  # images read, decoded and scored together: full UNet batches, bounded memory
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")  # Pillow's names for the formats of IMAGE_SUFFIXES


def image_files(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name (the order seeds permute)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_files_under(folder: Path) -> list[Path]:
    """Image files in `folder` and every subfolder (hidden ones skipped), sorted by path."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def image_folder(folder: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """(image paths, label indices, class names) of a folder with one subfolder per class (name = label)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EngineError(f"data folder {folder} does not exist")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise EngineError(f"data folder {folder} has no class subfolders; put each class's images in {folder}/<label>/")
    paths, labels = [], []
    for i, name in enumerate(classes):
        files = image_files(folder / name)
        if not files:
            raise EngineError(f"class folder {folder / name} has no images ({' '.join(IMAGE_SUFFIXES)})")
        paths += files
        labels += [i] * len(files)
    if len(classes) < 2:
        raise EngineError(f"data folder {folder} has one class ({classes[0]}); a classifier needs at least two")
    return paths, labels, classes


def expand_images(inputs) -> list[Path]:
    """Image files from what a user types: files, folders (their image files and their subfolders', e.g. the
    `<label>/` layout train-head reads, sorted by path) and glob patterns, in the order given. Refuses a path
    that matches nothing, and an empty result, in one line."""
    import glob

    found: list[Path] = []
    for item in map(str, inputs):
        if any(c in item for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            files = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
            if not files:
                raise EngineError(f"no image files match {item!r}")
            found += files
        elif Path(item).is_dir():
            files = image_files_under(Path(item))
            if not files:
                raise EngineError(f"folder {item} has no image files ({' '.join(IMAGE_SUFFIXES)})")
            found += files
        elif Path(item).is_file():
            found.append(Path(item))
        else:
            raise EngineError(not_a_file(item, "image file"))
    if not found:
        raise EngineError("no images given: pass image files, folders or glob patterns")
    return found


def image_windows(images, size: int):
    """Lists of at most `size` images from any iterable (a list, a generator of paths, ...)."""
    if isinstance(images, (str, Path)) or not hasattr(images, "__iter__") or hasattr(images, "shape"):
        images = [images]  # one image given alone (a path, a PIL image or an array)
    window = []
    for image in images:
        window.append(image)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def count_images(images) -> int | None:
    """How many images, when the iterable knows (for the progress bar); None for a generator."""
    try:
        return len(images)
    except TypeError:
        return None
