"""The demo data set: scikit-learn's bundled handwritten digits (8x8, 16 grey levels).

One fixed, seeded split is the single source of truth for the training script, the demo job, the
benchmarks and the tests, so the held-out images are never seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# The template the zero-shot classifier uses by default; training sees it among others.
DEFAULT_TEMPLATE = "a handwritten digit {}"
# Varied captions for training: words and numerals, so the text encoder must learn both forms.
TRAIN_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {num}",
    "a photo of the digit {word}",
    "handwritten {word}",
    "the digit {num}",
    "a scan of a handwritten {word}",
    "an image of the number {word}",
    "{num}",
)
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.25


@dataclass(frozen=True)
class DigitsSplit:
    train_images: np.ndarray  # (N, 8, 8) uint8 in [0, 255]
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray
    test_labels: np.ndarray


def load_digits_split() -> DigitsSplit:
    """The fixed stratified split (seed 0, 25% held out) of the 1,797 bundled digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255, lossless in PNG
    labels = digits.target.astype(np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(
        images, labels, test_size=HELD_OUT_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    return DigitsSplit(tr_x, tr_y, te_x, te_y)


VALIDATION_FRACTION = 0.1  # models/train_demo.py's VAL_FRACTION: the slice of the training split it held back


def validation_indices(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fitting, validation) indices into the training split: the same stratified slice models/train_demo.py
    (seed 0) held back, so choices made on it (the race's defaults) never see a held-out digit."""
    from sklearn.model_selection import train_test_split

    labels = load_digits_split().train_labels
    fit, val = train_test_split(np.arange(len(labels)), test_size=VALIDATION_FRACTION, random_state=seed,
                                stratify=labels)
    return fit, val


def caption(label: int, template: str) -> str:
    """Fill a template with the class word and/or numeral."""
    return template.format(CLASS_NAMES[label], word=CLASS_NAMES[label], num=str(label))


def training_images() -> list:
    """The demo's TRAINING digits (never the held-out split: it is for the final report)."""
    return list(load_digits_split().train_images)


def demo_pairs(template: str | None = None):
    """The demo digits' TRAINING split, captioned with the default template (never the held-out split)."""
    from diffscore.reference.prompt_learning import Pairs

    split = load_digits_split()
    return Pairs(list(split.train_images), [caption(int(y), template or DEFAULT_TEMPLATE) for y in split.train_labels])


# DiffDis's text stream is trained on the other templates, so the zero-shot benchmark's class prompts and
# match captions (DEFAULT_TEMPLATE) are texts it never saw as captions.
DIFFDIS_HELD_OUT_TEMPLATES = ("a handwritten digit {word}", "the number {num}")


def diffdis_demo_pairs():
    """The demo digits' TRAINING split, each image with every training template except the held-out ones."""
    from diffscore.reference.prompt_learning import Pairs

    split = load_digits_split()
    templates = [t for t in TRAIN_TEMPLATES if t not in DIFFDIS_HELD_OUT_TEMPLATES]
    images = [img for img in split.train_images for _ in templates]
    return Pairs(images, [caption(int(y), t) for y in split.train_labels for t in templates])
