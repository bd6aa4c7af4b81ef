"""`Engine.match(method="itc")`: the ITC embeddings of a `diffscore finetune` run, in numpy.

One UNet pass per image (the image noised once at the run's step with its fixed ε, through the
``itc_image`` graph) and one text-encoder pass per text (+ the ``itc_text`` projection); the score is
the cosine similarity of the two L2-normalised embeddings. No timesteps, no candidates × timesteps
grid: this is the fast matching path, at the price of training (reference/finetune.py)."""

from __future__ import annotations

import numpy as np

from diffscore.engine.images import IMAGE_WINDOW
from diffscore.engine.options import check_count, check_labels
from diffscore.engine.results import MatchOptions, MatchResult
from diffscore.errors import EngineError
from diffscore.kernels import add_noise, shared_noise


def text_embeddings(engine, texts: list[str]) -> np.ndarray:
    """(T, dim) L2-normalised text embeddings."""
    spec = engine.manifest.itc
    hidden = engine.encode_text(texts)
    return engine.graph_runner(spec.text_graph).infer({"last_hidden_state": hidden})["embedding"]


def image_embeddings(engine, images, batch_size: int | None = None, progress: bool = False) -> np.ndarray:
    """(N, dim) L2-normalised image embeddings; images read a window at a time (bounded memory)."""
    spec = engine.manifest.itc
    eps = shared_noise(spec.seed, 1, tuple(engine.manifest.sample_shape))  # (1, C, H, W): the run's fixed ε
    runner = engine.graph_runner(spec.image_graph)
    step = batch_size or engine.default_batch_size()
    chunks = []
    for x0 in engine.encoded_windows(images, "match itc", progress, max(step, IMAGE_WINDOW)):
        xt = np.concatenate([add_noise(x, eps, engine.alphas_cumprod, [spec.noise_step]) for x in x0])
        for lo in range(0, len(xt), step):
            chunks.append(runner.infer({"sample": xt[lo : lo + step]})["embedding"])
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
    return MatchResult(scores, texts, MatchOptions((spec.noise_step,), 0.0, spec.seed, None, engine.backend, "fp32",
                                                   method="itc"))
