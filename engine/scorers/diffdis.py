"""DiffDis in the runtime (numpy + the engine's graphs; no torch): image-text scores from a diffusion
over the text embedding conditioned on the image (reference/diffdis.py has the method and its choices).

Both modes cost one image pass (the `diffdis` graph runs the UNet layers it reads once per image) for any
number of candidate texts:
- "denoise": every candidate is noised at the same `timesteps` shared (t, ε) (the Diffusion Classifier's
  grid, ε seeded); score = −mean x0 error of the text stream; the lowest error wins.
- "generate": the text query is generated from a fixed noise in a few DDIM steps inside the graph;
  score = its cosine similarity with each candidate's standardised text query.
"""

from __future__ import annotations

import numpy as np

from diffscore.engine.graph_contract import ERROR, INPUT_IDS, NOISE_QUERY, SAMPLE, SIMILARITY, TEXT_QUERY, TIMESTEP
from diffscore.engine.manifest import DiffDisSpec
from diffscore.engine.options import check_count, check_labels, check_seed
from diffscore.engine.results import Classification, MatchOptions, MatchResult, ranked
from diffscore.errors import EngineError
from diffscore.kernels import add_noise, shared_noise, timestep_grid

MODES = ("denoise", "generate")


def diffdis_spec(engine) -> DiffDisSpec:
    spec = engine.manifest.diffdis
    if spec is None:
        raise EngineError(f"{engine.engine_dir} has no DiffDis model; train one with `diffscore train-diffdis` and "
                          "export it with `diffscore export MODEL OUT --diffdis RUN_DIR`")
    return spec


def eos_positions(ids: np.ndarray, eos_token_id: int) -> np.ndarray:
    """(P,) position of the first end-of-text token of each row (the last position if there is none)."""
    ids = np.asarray(ids)
    hit = ids == eos_token_id
    return np.where(hit.any(axis=1), hit.argmax(axis=1), ids.shape[1] - 1)


def text_queries(engine, texts: list[str], spec: DiffDisSpec) -> np.ndarray:
    """(P, D) raw text queries: the text encoder's hidden state at the first end-of-text token."""
    pos = eos_positions(engine.token_feed(texts)[INPUT_IDS], spec.eos_token_id)
    return engine.encode_text(texts)[np.arange(len(texts)), pos].astype(np.float32)


def score_timesteps(T: int, n: int) -> list[int]:
    """Mode "denoise": the Diffusion Classifier's n-point grid (kernels.timesteps.timestep_grid, DESIGN §3)."""
    if not 1 <= n <= T:
        raise EngineError(f"--timesteps must be in [1, {T}], got {n}")
    return timestep_grid(n, T)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise EngineError(f"unknown DiffDis mode {mode!r}; choose from {', '.join(MODES)}")
    return mode


def diffdis_scores(engine, images, texts: list[str], *, mode: str | None = None, timesteps: int | None = None,
                   seed: int = 0, batch_size: int | None = None, progress: bool = False) -> tuple[np.ndarray, dict]:
    """(images, texts) float64 scores, higher = better, and the options used. One graph call per group of
    images: each image noised once at the image step (its fixed ε), all its queries in the same call."""
    spec = diffdis_spec(engine)
    mode = check_mode(mode or spec.mode)
    seed = check_seed(seed)
    batch_size = check_count("batch_size", batch_size, optional=True)
    T = len(engine.alphas_cumprod)
    text = text_queries(engine, texts, spec)  # (P, D)
    P, D = text.shape
    if mode == "denoise":
        ts = score_timesteps(T, check_count("timesteps", timesteps, optional=True) or spec.timesteps)
        eps = shared_noise(seed, len(ts), (D,))  # (K, D), shared by every candidate and image
        q_text = np.repeat(text, len(ts), axis=0)  # (P·K, D), candidate-major
        q_noise = np.tile(eps, (P, 1))
        q_t = np.tile(np.asarray(ts, np.float32), P)
    else:
        ts = []
        q_text, q_noise, q_t = text, np.zeros_like(text), np.zeros(P, np.float32)
    image_eps = shared_noise(spec.seed, 1, tuple(engine.manifest.sample_shape))  # the fixed ε of the image branch
    runner = engine.runner(diffdis_spec(engine).graph)
    per_call = max(1, (batch_size or engine.default_batch_size()) // max(1, len(q_t) // 64))  # images per call
    # Every image of a call gets the same queries: built once, each call takes its first n rows.
    queries = {name: np.broadcast_to(q, (per_call, *q.shape)).copy()
               for name, q in ((TEXT_QUERY, q_text), (NOISE_QUERY, q_noise), (TIMESTEP, q_t))}
    out = []
    for x0 in engine.encoded_windows(images, "diffdis", progress):
        xt = np.concatenate([add_noise(x, image_eps, engine.alphas_cumprod, [spec.image_step]) for x in x0])
        for lo in range(0, len(xt), per_call):
            n = len(xt[lo : lo + per_call])
            res = runner.infer({SAMPLE: xt[lo : lo + per_call], **{k: q[:n] for k, q in queries.items()}})
            if mode == "denoise":
                out.append(-res[ERROR].astype(np.float64).reshape(n, P, len(ts)).mean(-1))
            else:
                out.append(res[SIMILARITY].astype(np.float64))
    options = {"mode": mode, "timesteps": tuple(ts), "seed": seed, "generate_steps": spec.generate_steps}
    return np.concatenate(out), options


def classify_diffdis(engine, images, options, batch_size: int | None = None,
                     progress: bool = False) -> list[Classification]:
    """Zero-shot classification by DiffDis (resolved DiffDisOptions): each label's prompt is a candidate text;
    ranking = score (−mean x0 error, or cosine similarity), best first; one image pass per image."""
    labels = list(options.labels)
    prompts = [options.template.format(label) for label in labels]
    engine.check_prompts(prompts, "prompts")
    scores, _ = diffdis_scores(engine, images, prompts, mode=options.diffdis_mode, timesteps=options.timesteps,
                               seed=options.seed, batch_size=batch_size, progress=progress)
    return [ranked(labels, row, 1, options) for row in scores]


def match_diffdis(engine, images, texts: list[str], *, mode: str | None = None, timesteps: int | None = None,
                  seed: int = 0, batch_size: int | None = None, progress: bool = False) -> MatchResult:
    """DiffDis scores of every (image, text) pair as a MatchResult (higher = better match)."""
    texts = check_labels(texts, what="texts")
    engine.check_prompts(texts, "texts")
    scores, used = diffdis_scores(engine, images, texts, mode=mode, timesteps=timesteps, seed=seed,
                                  batch_size=batch_size, progress=progress)
    return MatchResult(scores, texts, MatchOptions(used["timesteps"], 0.0, seed, None, engine.backend, "fp32",
                                                   method=f"diffdis-{used['mode']}"))
