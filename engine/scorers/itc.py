"""`Engine.match(method="itc")`: the ITC embeddings of a `diffscore finetune` run, in numpy.

One UNet pass per image (the image noised once at the run's step with its fixed ε, through the
``itc_image`` graph) and one text-encoder pass per text (+ the ``itc_text`` projection); the score is
the cosine similarity of the two L2-normalised embeddings. No timesteps, no candidates × timesteps
grid: this is the fast matching path, at the price of training (reference/finetune.py).

A `finetune --clip` run (manifest ``itc.kind == "clip"``) ships its fine-tuned CLIP towers instead: one vision
pass per image (CLIP's own pixels: resize + centre crop, normalised with the record's mean and std) and one
text-tower pass per text (the record's CLIP tokenizer); no UNet, no noise (export/clip_itc.py)."""

from __future__ import annotations

import numpy as np

from diffscore.engine.graph_contract import EMBEDDING, HIDDEN, INPUT_IDS, PIXEL_VALUES, SAMPLE
from diffscore.engine.images import IMAGE_WINDOW, preprocess_batch
from diffscore.engine.options import check_count, check_labels
from diffscore.engine.results import MatchOptions, MatchResult
from diffscore.errors import EngineError
from diffscore.kernels import add_noise, shared_noise


def text_embeddings(engine, texts: list[str]) -> np.ndarray:
    """(T, dim) L2-normalised text embeddings."""
    spec = engine.manifest.itc
    if spec.kind == "clip":
        ids = np.array([e.ids for e in clip_tokenizer(engine).encode_batch(list(texts))], dtype=np.int64)
        return engine.runner(spec.text_graph).infer({INPUT_IDS: ids})[EMBEDDING]
    hidden = engine.encode_text(texts)
    return engine.runner(spec.text_graph).infer({HIDDEN: hidden})[EMBEDDING]


def clip_tokenizer(engine):
    """The CLIP run's tokenizer (read once per engine)."""
    tok = getattr(engine, "_itc_clip_tokenizer", None)
    if tok is None:
        from diffscore.engine.conditioning import read_tokenizer

        tok = engine._itc_clip_tokenizer = read_tokenizer(engine.engine_dir, engine.manifest.itc.tokenizer,
                                                          "ITC tokenizer")
    return tok


def clip_pixels(window, spec) -> np.ndarray:
    """(N, C, S, S) float32 pixel_values: the engine's resize + centre crop in [-1, 1], then CLIP's normalisation."""
    x = preprocess_batch(window, spec.image_size, spec.image_channels)
    mean = np.asarray(spec.image_mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.image_std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((x + 1) / 2 - mean) / std


def image_embeddings(engine, images, batch_size: int | None = None, progress: bool = False) -> np.ndarray:
    """(N, dim) L2-normalised image embeddings; images read a window at a time (bounded memory)."""
    spec = engine.manifest.itc
    runner = engine.runner(spec.image_graph)
    step = batch_size or engine.default_batch_size()
    chunks = []
    if spec.kind == "clip":
        feed_name, encode = PIXEL_VALUES, lambda window: clip_pixels(window, spec)
    else:  # x_t at the run's one noise step, with its fixed ε (1, C, H, W)
        eps = shared_noise(spec.seed, 1, tuple(engine.manifest.sample_shape))
        feed_name, encode = SAMPLE, lambda window: np.concatenate(
            [add_noise(x, eps, engine.alphas_cumprod, [spec.noise_step]) for x in engine.encode_images(window)])
    for x in engine.encoded_windows(images, "match itc", progress, max(step, IMAGE_WINDOW), encode=encode):
        for lo in range(0, len(x), step):
            chunks.append(runner.infer({feed_name: x[lo : lo + step]})[EMBEDDING])
    return np.concatenate(chunks)


def match_itc(engine, images, texts: list[str], batch_size: int | None = None, progress: bool = False) -> MatchResult:
    """(images, texts) cosine similarities of the fine-tuned ITC embeddings (higher = better match)."""
    spec = engine.manifest.itc
    if spec is None:
        raise EngineError(f"{engine.engine_dir} has no ITC embeddings; "
                          f"train them with `diffscore finetune MODEL ...` and "
                          "export with `diffscore export MODEL ENGINE --adapters RUN`")
    texts = check_labels(texts, what="texts")
    engine.check_prompts(texts, "texts")
    batch_size = check_count("batch_size", batch_size, optional=True)
    z_text = text_embeddings(engine, texts)
    z_image = image_embeddings(engine, images, batch_size, progress)
    scores = z_image.astype(np.float64) @ z_text.astype(np.float64).T
    steps = () if spec.kind == "clip" else (spec.noise_step,)  # CLIP's towers see the image itself, no noise
    return MatchResult(scores, texts, MatchOptions(steps, 0.0, spec.seed, None, engine.backend, "fp32", method="itc"))
