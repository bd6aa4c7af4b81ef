"""Fixtures of the head tests: the demo digits and a labelled folder of 40 of them (one subfolder per class)."""

import pytest

from diffscore.app.digits import CLASS_NAMES, load_digits_split


@pytest.fixture(scope="session")
def digits():
    return load_digits_split()


@pytest.fixture(scope="session")
def digit_folder(tmp_path_factory, digits):
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    for i, (img, label) in enumerate(zip(digits.train_images[:40], digits.train_labels[:40])):
        (root / CLASS_NAMES[label]).mkdir(exist_ok=True)
        Image.fromarray(img).save(root / CLASS_NAMES[label] / f"{i}.png")
    return root
