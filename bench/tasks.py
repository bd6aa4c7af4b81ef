"""The two data sets the DiffDis and fine-tuning benchmarks run on, behind one interface (issue 30: "on the
digits and on the many-class benchmark model"): the demo digits (10 classes, sklearn's split) and the 62-class
glyph model's held-out typefaces (models/fonts62, rendered from the installed font packages by
models/fonts_data.py).

A task says which images are held out, how a class is captioned under a template, which captions DiffDis
trains on (never a class prompt or a matching caption), which pairs fine-tuning draws its shots from, which
caption templates fine-tuning never sees (retrieval of unseen captions) and the matching task's 4 confusable
negatives per class. Nothing in it is chosen on held-out images.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FONTS_MODEL = ROOT / "models" / "fonts62"
FONTS_CLIP = ROOT / "models" / "fonts62-clip"
SEED = 0
sys.path.insert(0, str(ROOT / "models"))  # models/fonts_data.py


@dataclass(frozen=True)
class Task:
    name: str  # "digits" | "glyphs"
    noun: str  # what one held-out image is, in a sentence: "digit" | "glyph"
    model: Path
    class_count: int
    template: str  # the classification prompts' (and the fine-tuning captions') template
    prompt: Callable[[int, str], str]  # (class, template) -> caption
    held_images: list
    held_labels: np.ndarray
    train_images: np.ndarray  # the training split, for the generation check's fixed pixel classifier
    train_labels: np.ndarray
    diffdis_images: list  # DiffDis training pairs, each image's captions in a row
    diffdis_captions: list[str]
    diffdis_captions_per_image: int
    diffdis_note: dict
    finetune_pairs: object  # reference.prompt_learning.Pairs: the fine-tuning shots' pool
    unseen_templates: list[str]  # captions the fine-tuning never sees (the shipped CLIP saw them)
    negatives: dict[int, tuple[int, ...]]  # the matching task's 4 confusable classes per class
    export_defaults: dict

    def class_prompts(self, template: str | None = None) -> list[str]:
        return [self.prompt(c, template or self.template) for c in range(self.class_count)]

    def captions_for(self, label: int) -> list[str]:
        """The matching task: the image's own caption first, then its 4 confusable classes'."""
        return [self.prompt(c, self.template) for c in (label, *self.negatives[label])]


def digits() -> Task:
    from match import NEGATIVES, split_training

    from diffscore.app.demo import DEMO_LOSS, DEMO_MODEL, DEMO_STAGES
    from diffscore.app.digits import (DEFAULT_TEMPLATE, DIFFDIS_HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, caption,
                                      diffdis_demo_pairs, load_digits_split)
    from diffscore.reference.prompt_learning import Pairs

    split = load_digits_split()
    _, rest = split_training(split)  # bench/match.py's validation slice stays out of the fine-tuning shots
    pairs = diffdis_demo_pairs()
    return Task(
        "digits", "digit", Path(DEMO_MODEL), 10, DEFAULT_TEMPLATE, caption,
        list(split.test_images), split.test_labels, split.train_images, split.train_labels,
        list(pairs.images), list(pairs.captions), len(TRAIN_TEMPLATES) - len(DIFFDIS_HELD_OUT_TEMPLATES),
        {"source": "demo digits, training split", "held_out_templates": list(DIFFDIS_HELD_OUT_TEMPLATES)},
        Pairs([split.train_images[i] for i in rest],
              [caption(int(split.train_labels[i]), DEFAULT_TEMPLATE) for i in rest]),
        [t for t in TRAIN_TEMPLATES if caption(7, t) != caption(7, DEFAULT_TEMPLATE)], dict(NEGATIVES),
        {"template": DEFAULT_TEMPLATE, "stages": [list(s) for s in DEMO_STAGES], "loss": DEMO_LOSS})


# Caption templates of the glyph model's training captions (models/fonts_data.caption) that name a style: the
# fine-tuning trains on the plain class names ("{}") only, so these are its unseen captions
GLYPH_UNSEEN_TEMPLATES = ("{} in a serif typeface", "{} in a sans-serif typeface", "{} in a monospaced typeface",
                          "{} in a script typeface", "{}, handwritten", "{} in a bold serif typeface")


def glyph_data() -> dict:
    """models/fonts_data.py's split, rendered from the installed font packages: split -> images, labels, font, looks."""
    from fonts_data import arrays, build

    faces = build()
    data = arrays(faces)
    for split, d in data.items():
        d["looks"] = [tf.look for tf, _ in faces if tf.split == split]
    return data


def nearest_classes(images: np.ndarray, labels: np.ndarray, count: int = 4) -> dict[int, tuple[int, ...]]:
    """Per class, the `count` classes whose mean training image is nearest in pixels (the glyph matching task's
    confusable negatives: computed from the training typefaces, fixed before any run)."""
    means = np.stack([images[labels == c].reshape(-1, images[0].size).mean(0) for c in range(labels.max() + 1)])
    dist = ((means[:, None] - means[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    return {c: tuple(int(j) for j in np.argsort(dist[c], kind="stable")[:count]) for c in range(len(means))}


def glyphs() -> Task:
    from fonts_data import CHARS, CLASS_NAMES, caption

    from diffscore.reference.prompt_learning import Pairs

    data = glyph_data()
    train, held = data["train"], data["held_out"]

    def prompt(label: int, template: str) -> str:
        return template.format(CLASS_NAMES[label])

    looks = train["looks"]
    captions = [caption(CHARS[y], looks[f]) for y, f in zip(train["labels"], train["font"])]
    return Task(
        "glyphs", "glyph", FONTS_MODEL, len(CLASS_NAMES), "{}", prompt,
        list(held["images"]), held["labels"], train["images"], train["labels"],
        list(train["images"]), captions, 1,
        {"source": "fonts62 glyphs, training typefaces, each with its typeface's style caption (never the plain "
                   "class name the classification and matching prompts use)"},
        Pairs(list(train["images"]), [prompt(int(y), "{}") for y in train["labels"]]),
        list(GLYPH_UNSEEN_TEMPLATES), nearest_classes(train["images"], train["labels"]),
        {"template": "{}", "loss": "l2"})


TASKS = {"digits": digits, "glyphs": glyphs}
