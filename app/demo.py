"""The main job: zero-shot classification of the held-out demo digits on the compiled engine,
next to a logistic-regression baseline trained on the same training split."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from diffscore.app.digits import CLASS_NAMES, DEFAULT_TEMPLATE, load_digits_split
from diffscore.errors import EngineError
from diffscore.engine.cache import cache_root
from diffscore.engine.manifest import Manifest, folder_sha256

DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "demo"
# Chosen on a validation split carved from the training digits (models/train_demo.py's report).
DEMO_STAGES = [(10, 3), (40, 1)]
DEMO_LOSS = "l2"


def demo_engine_dir(model_dir: Path = DEMO_MODEL, precisions=("fp32",)) -> Path:
    """Export the demo model on first use; later calls reuse it (keyed by the model's content hash)."""
    if not (model_dir / "model_index.json").is_file():
        raise EngineError(f"the demo model is missing at {model_dir}")
    digest = folder_sha256(model_dir)
    out = cache_root() / "engines" / f"demo-{digest[:12]}"
    if out.is_dir():
        manifest = Manifest.load(out)
        if all(p == "fp32" or f"unet.{p}" in manifest.graphs for p in precisions):
            return out
    from diffscore.export.onnx_export import export_engine

    defaults = {"template": DEFAULT_TEMPLATE, "stages": [list(s) for s in DEMO_STAGES], "loss": DEMO_LOSS}
    return export_engine(model_dir, out, precisions=tuple(precisions), defaults=defaults, overwrite=True)


def logistic_baseline(split) -> float:
    from sklearn.linear_model import LogisticRegression

    flat = lambda x: x.reshape(len(x), -1) / 255.0
    clf = LogisticRegression(max_iter=2000).fit(flat(split.train_images), split.train_labels)
    return float((clf.predict(flat(split.test_images)) == split.test_labels).mean())


def run_demo(engine, limit: int | None = None, progress: bool = True, **classify_options) -> dict:
    """Classify the held-out digits; returns the figures the CLI prints (and the bench records)."""
    split = load_digits_split()
    images, labels = split.test_images[:limit], split.test_labels[:limit]
    start = time.perf_counter()
    results = engine.classify(list(images), list(CLASS_NAMES), progress=progress, **classify_options)
    seconds = time.perf_counter() - start
    predicted = np.array([CLASS_NAMES.index(r.label) for r in results])
    return {
        "images": len(images),
        "accuracy": float((predicted == labels).mean()),
        "passes_per_image": float(np.mean([r.passes for r in results])),
        "images_per_s": len(images) / seconds,
        "seconds": seconds,
        "predictions": predicted.tolist(),
    }


def demo_parity_inputs(engine_dir: Path, limit: int = 100) -> dict:
    """run_parity's images for an engine of the demo's shape (8px greyscale): the first `limit` held-out
    digits and their class names; nothing for other engines."""
    manifest = Manifest.load(engine_dir)
    if manifest.image_channels != 1 or manifest.image_size != 8 or limit < 1:
        return {}
    return {"images": list(load_digits_split().test_images[:limit]), "labels": list(CLASS_NAMES),
            "source": "held-out digits"}
