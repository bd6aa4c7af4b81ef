"""Image input for both paths: one implementation, so reference and runtime see identical pixels.

Pillow + numpy only. Resize the shorter side to the model's size (bicubic), centre-crop, scale to
[-1, 1], channels first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffscore.errors import EngineError

ImageInput = Union[str, Path, Image.Image, np.ndarray]


def to_pil(image: ImageInput) -> Image.Image:
    """Accept a path, a PIL image or a uint8 array (H,W) / (H,W,C); refuse anything else clearly."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise EngineError(f"image file {path} does not exist")
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except (UnidentifiedImageError, OSError) as e:
            raise EngineError(f"cannot read image {path}: {e}") from None
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise EngineError(
                f"array images must be uint8 (H,W) or (H,W,C), got {image.dtype}{list(image.shape)}; "
                "convert with (x * 255).round().astype(np.uint8)"
            )
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    raise EngineError(f"unsupported image type {type(image).__name__}: give a path, a PIL image or a uint8 array")


def preprocess(image: ImageInput, size: int, channels: int) -> np.ndarray:
    """(channels, size, size) float32 in [-1, 1]: resize shorter side (bicubic), centre crop."""
    im = to_pil(image).convert("L" if channels == 1 else "RGB")
    w, h = im.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
    x = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return x[None] if channels == 1 else x.transpose(2, 0, 1).copy()


def preprocess_batch(images, size: int, channels: int) -> np.ndarray:
    """(N, C, size, size) float32 from a list (or tuple) of image inputs, or from a single one."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise EngineError("no images given")
    return np.stack([preprocess(im, size, channels) for im in images])


IMAGE_WINDOW = 16  # images read, decoded and scored together: full UNet batches, bounded memory
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_files(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name (the order seeds permute)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


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
    """Image files from what a user types: files, folders (their image files, sorted) and glob patterns,
    in the order given. Refuses a path that matches nothing, and an empty result, in one line."""
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
            files = image_files(Path(item))
            if not files:
                raise EngineError(f"folder {item} has no image files ({' '.join(IMAGE_SUFFIXES)})")
            found += files
        elif Path(item).is_file():
            found.append(Path(item))
        else:
            raise EngineError(f"image file {item} does not exist")
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
