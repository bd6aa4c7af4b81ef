"""The runtime: an engine directory + a backend -> classify and match, in numpy. No torch here.

`Engine` loads and closes the runners, encodes text and images (one image-window loop, `encoded_windows`), runs
the UNet over flat lists of (sample, timestep, prompt) pairs (`_run_pairs`) and dispatches `classify` to the
method's scorer (engine/scorers/) with its resolved options record (engine/classify_options.py).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from diffscore.engine.backends.base import Runner
from diffscore.engine.backends.choice import BACKENDS, GPU_BATCH, cpu_workers, make_runner, resolve_backend
from diffscore.engine.conditioning import PromptCache, TextConditioning, read_tokenizer
from diffscore.engine.classify_options import ClassifyOptions, pack
from diffscore.engine.eps_graph import eps_graph, has_eps_graph
from diffscore.engine.graph_contract import (ATTN_SCORES, EPS, HIDDEN, IMAGE, LATENT, POOLED, SAMPLE, TEXT_ENCODER,
                                             TIMESTEP, UNET, UNET_EPS, VAE_BATCH, VAE_ENCODER, role_of)
from diffscore.engine.scorers.head import HeadScoring
from diffscore.engine.images import IMAGE_WINDOW, count_images, image_windows, preprocess_batch
from diffscore.engine.manifest import PRECISIONS, Manifest, ScoringDefaults, unet_graph
from diffscore.engine.options import check_count, check_distinct_tokens
from diffscore.engine.progress import progress_bar
from diffscore.engine.results import MATCH_METHODS, Classification, MatchResult, named_images
from diffscore.engine.scorers import Pairs, scorer
from diffscore.errors import EngineError
from diffscore.kernels import denoising_error, dsd_preset, epsilon_from_output

log = logging.getLogger("diffscore")



def load(engine_dir: str | Path, backend: str = "auto", device: int = 0, precision: str = "fp32",
         threads: int | None = None, runners: dict[str, Runner] | None = None, verify: bool = False) -> "Engine":
    """Open an engine directory made by `diffscore export`.

    engine_dir: the directory (manifest.json + graphs).
    backend: "auto" (TensorRT plan, then ORT TensorRT/CUDA providers, then CPU), "ort-cpu", "ort-cuda",
        "ort-trt" or "tensorrt".
    device: GPU index for the GPU backends.
    precision: the UNet graph to run: "fp32", "fp16" (`export --precision fp16`) or "int8" (`diffscore calibrate`).
    threads: intra-op threads per runner (default: the backend's choice).
    runners: graph role ("text_encoder", "vae_encoder", "unet", "unet_eps") -> a runner to use instead of the one
        the backend would open (any object with the runner contract of engine/backends/base.py), e.g. a
        candidate INT8 UNet under test or the torch reference. "unet_eps" runs the ε̂-only methods (classify);
        a given "unet" alone runs everything.
    verify: also check every file's sha256 against the manifest (slow for multi-GB graphs; loading
        always checks containment, presence, sizes and each graph's input/output signature).
    Use it as a context manager (or call `close()`) to release the sessions and worker threads.
    """
    if not isinstance(engine_dir, (str, os.PathLike)) or not str(engine_dir):
        raise EngineError(f"engine_dir must be the path of an engine directory, got {engine_dir!r}; create one with "
                          "`diffscore export`")
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise EngineError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "bf16" and backend not in ("auto", "openvino"):
        raise EngineError(f"precision bf16 runs on the openvino backend only, not {backend}; use --backend openvino")
    if not isinstance(engine_dir, (str, os.PathLike)):
        raise EngineError(f"engine_dir must be a path to an engine directory, got {engine_dir!r}")
    engine_dir = Path(engine_dir)
    manifest = Manifest.load(engine_dir)
    if verify and (bad := manifest.verify(engine_dir)):
        raise EngineError(f"sha256 mismatch in {', '.join(bad)}: the engine directory is damaged; re-export it")
    threads = check_count("threads", threads, optional=True)
    unet = unet_graph(precision)
    if unet not in manifest.graphs:
        how = "diffscore export --precision fp16" if precision == "fp16" else "diffscore calibrate"
        raise EngineError(f"{engine_dir} has no {precision} UNet ({unet}); create it with `{how}`")
    if precision == "bf16":
        from diffscore.engine.backends.openvino import require_bf16

        require_bf16()
    workers = None
    if precision != "bf16":  # bf16 exists on the CPU only
        backend = resolve_backend(manifest, backend, unet, device)
    if backend == "auto":  # a CPU: the backend and threading measured fastest for this engine here (cached)
        from diffscore.engine.autoselect import choose_cpu_backend

        backend, workers = choose_cpu_backend(engine_dir, manifest, precision, threads)
    if workers is None:
        workers = cpu_workers(manifest, backend, threads)
    given = dict(runners or {})
    unknown = set(given) - {TEXT_ENCODER, VAE_ENCODER, UNET, UNET_EPS}
    if unknown:
        raise EngineError(f"runner overrides for {sorted(unknown)}: only text_encoder, vae_encoder, unet and "
                          f"{UNET_EPS} can be replaced")
    # issue 27: the ε̂-only graph (given, or the engine's own unless the scoring UNet is given); see below
    eps_only = UNET_EPS in given or (UNET not in given and has_eps_graph(manifest, precision, backend, device))
    names = [g for g in (TEXT_ENCODER, VAE_ENCODER) if g in manifest.graphs] + [unet]
    runners = {
        role_of(name): given.get(role_of(name))
        or make_runner(engine_dir, manifest, name, backend, device, threads, workers=workers,
                       precision=precision if name == unet else "fp32")
        for name in names
    }
    if eps_only:  # issue 27: the ε̂-only graph runs classify, the scoring graph the methods that read scores
        runners[UNET_EPS] = given.get(UNET_EPS) or make_runner(engine_dir, manifest, eps_graph(precision), backend,
                                                               device, threads, workers=workers, precision=precision)
    if UNET not in given:  # the engine reads ε̂ and the scores of the UNet graph, never its features.* maps
        runners[UNET].fetch = {EPS, ATTN_SCORES}
    engine = Engine(engine_dir, manifest, runners, backend, precision, workers, device, threads)
    engine._borrowed = set(given)  # the caller's runners: the caller closes them
    return engine


class _Closed(dict):
    """The runners of a closed engine: any use is one line (not a KeyError, not a silent reopen)."""

    def __getitem__(self, *_):
        raise EngineError("this engine was closed (close() or the end of its `with` block); load it again with "
                          "diffscore.load(...)")

    __contains__ = __setitem__ = __getitem__


class Engine(HeadScoring, TextConditioning):
    """A loaded engine directory: `classify` (Diffusion Classifier or a trained head) and `match` (DSD scores)."""

    def __init__(self, engine_dir: Path, manifest: Manifest, runners: dict[str, Runner], backend: str, precision: str,
                 workers: int = 1, device: int = 0, threads: int | None = None):
        self.engine_dir, self.manifest, self.runners = engine_dir, manifest, runners
        self.backend, self.precision = backend, precision
        self._device, self._threads = device, threads  # for head graphs, opened on first use
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers) if workers > 1 else None  # concurrent UNet runs (CPU)
        self.tokenizer = read_tokenizer(engine_dir, manifest.tokenizer)
        self.tokenizer_2 = None if manifest.tokenizer_2 is None else read_tokenizer(engine_dir, manifest.tokenizer_2,
                                                                                   "tokenizer_2")
        self.alphas_cumprod = np.asarray(manifest.alphas_cumprod, dtype=np.float64)
        self.prompt_cache = PromptCache()  # bounded (DIFFSCORE_PROMPT_CACHE_MB); set .max_bytes to change it
        self._borrowed: set[str] = set()
        log.info("loaded %s on %s (%s)", engine_dir, backend, precision)

    def __repr__(self) -> str:
        return f"Engine({str(self.engine_dir)!r}, backend={self.backend!r}, precision={self.precision!r})"

    def runner(self, name: str) -> Runner:
        """The one way to a runner: of a graph role load opened ("text_encoder", "vae_encoder", "unet",
        "unet_eps"), of a head (by its name), or of any other graph of the manifest (a head's, DiffDis's, ITC's),
        opened on first use. Those are fp32 ONNX (whatever the UNet precision), on ONNX Runtime; under the native
        TensorRT backend on its CUDA provider when there is one."""
        if isinstance(self.runners, _Closed):
            return self.runners[name]  # one line: closed
        if name in self.manifest.heads:
            name = self.manifest.heads[name].graph
        if name not in self.runners:
            if name not in self.manifest.graphs:
                raise EngineError(f"{self.engine_dir} has no {name} graph; it has {', '.join(self.manifest.graphs)}")
            backend = self.backend
            if backend == "tensorrt":
                from diffscore.engine.backends.onnxruntime import available_providers

                backend = "ort-cuda" if "CUDAExecutionProvider" in available_providers() else "ort-cpu"
            self.runners[name] = make_runner(self.engine_dir, self.manifest, name, backend, self._device,
                                             self._threads, workers=self.workers)
        return self.runners[name]

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release every runner's session and the worker threads; the engine is unusable afterwards."""
        for role, runner in self.runners.items():
            close = getattr(runner, "close", None)
            if close is not None and role not in self._borrowed:
                close()
        self.runners = _Closed()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    @property
    def defaults(self) -> ScoringDefaults:
        return self.manifest.defaults

    @property
    def layer_weights(self) -> np.ndarray | None:
        """The DSD score weights prompt learning trained, in `attention_layers` order; None = plain mean."""
        trained = self.manifest.score_weights
        return None if not trained else np.array([trained[n] for n in self.manifest.attention_layers], np.float32)

    def dsd_preset(self, preset: str | None = None):
        """The engine's DSD preset (recorded at export); another one needs its own attention layers: refused."""
        own = self.defaults.dsd_preset
        if preset is not None and preset != own:
            raise EngineError(f"{self.engine_dir} was exported with the {own} DSD preset's attention layers; "
                              f"export the model with --dsd-preset {preset} to score with that preset")
        return dsd_preset(own)

    def default_batch_size(self) -> int:
        """Pairs per UNet call: small samples batch wide on CPU; GPUs and big latents less so. On TensorRT, the
        max_batch of the plan the UNet runs (this GPU's, this precision's), not of other GPUs' plans."""
        plan_max = getattr(self.runners.get(UNET_EPS) or self.runners.get(UNET), "max_batch", None)
        if self.backend == "tensorrt" and plan_max:
            return plan_max
        elements = int(np.prod(self.manifest.sample_shape))
        return int(np.clip(2**13 // elements, 1, 128)) if self.backend in ("ort-cpu", "openvino") else GPU_BATCH

    # --- inputs ---------------------------------------------------------------------------------
    def check_prompts(self, prompts: list[str], what: str) -> None:
        """Refuse prompts the text encoder cannot tell apart (same token ids after truncation)."""
        check_distinct_tokens(prompts, [e.ids for e in self.tokenizer.encode_batch(prompts)], what)

    def encode_text(self, prompts: list[str]) -> np.ndarray:
        """(P, L, D) text embeddings; each distinct prompt is encoded once, recent ones are cached."""
        return np.stack([hidden for hidden, _ in self.prompt_embeddings(prompts)])

    def prompt_embeddings(self, prompts: list[str]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """(last hidden state, SDXL's pooled text_embeds or None) per prompt, from the bounded prompt cache
        or the text encoder (each distinct prompt once per call, however small the cache)."""
        found = {p: item for p in dict.fromkeys(prompts) if (item := self.prompt_cache.get(p)) is not None}
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        step = getattr(self.runners[TEXT_ENCODER], "max_batch", None) or self.default_batch_size()  # a plan's limit
        for lo in range(0, len(missing), step):
            chunk = missing[lo : lo + step]
            out = self.runners[TEXT_ENCODER].infer(self.token_feed(chunk))
            pooled = out.get(POOLED)
            for j, p in enumerate(chunk):  # copies: a cached row must not keep its whole batch alive
                found[p] = (out[HIDDEN][j].copy(), None if pooled is None else pooled[j].copy())
                self.prompt_cache.put(p, found[p])
        return [found[p] for p in prompts]

    def encode_images(self, images) -> np.ndarray:
        """(N, C, S, S) x0: VAE latents (already scaled) or [-1, 1] pixels."""
        m = self.manifest
        pixels = preprocess_batch(images, m.image_size, m.image_channels)
        if m.pixel_space:
            return pixels
        vae = self.runners[VAE_ENCODER]
        step = min(VAE_BATCH, getattr(vae, "max_batch", None) or self.default_batch_size())
        return np.concatenate([vae.infer({IMAGE: pixels[i : i + step]})[LATENT]
                               for i in range(0, len(pixels), step)])

    def encoded_windows(self, images, what: str, progress: bool = False, size: int = IMAGE_WINDOW, encode=None):
        """The one image-window loop of every scorer: yields x0 (encode_images, or `encode` for a graph that reads
        something else, e.g. CLIP's pixels) a window of `size` images at a time (read, decoded and encoded
        together: full UNet batches, bounded memory), with a progress bar named `what` advanced as each window is
        done; "no images given" when there were none."""
        seen = False
        with progress_bar(what, count_images(images), progress) as advance:
            for window_images in image_windows(images, size):
                x0 = (encode or self.encode_images)(window_images)
                seen = True
                yield x0
                advance(len(x0))
        if not seen:
            raise EngineError("no images given")

    # --- the UNet over many pairs -------------------------------------------------------------
    def _run_pairs(self, pairs: Pairs, emb, noise: np.ndarray, loss: str, batch_size: int, scores_read: bool = True):
        """Denoising error (n,) and attention scores (n, layers) for every pair, in batches.
        emb: the prompts' text_conditioning (or, on an SD engine, their encode_text array).
        scores_read=False: ε̂ only, on the ε̂-only graph where the engine has one (scores then (n, 0))."""
        eps_only = not scores_read and UNET_EPS in self.runners
        unet = self.runners[UNET_EPS if eps_only else UNET]
        n = len(pairs.xt_row)
        errors = np.empty(n, dtype=np.float32)
        scores = np.empty((n, 0 if eps_only else len(self.manifest.attention_layers)), dtype=np.float32)

        def run(sl: slice):
            x_t = pairs.xt[pairs.xt_row[sl]]
            feed = {SAMPLE: x_t, TIMESTEP: pairs.timestep[sl], **self.conditioning_rows(emb, pairs.emb_row[sl])}
            out = unet.infer(feed)
            eps_hat = epsilon_from_output(out[EPS], x_t, self.alphas_cumprod[pairs.timestep[sl].astype(np.int64)],
                                          self.manifest.prediction_type)  # the graph returns the raw UNet output
            errors[sl] = denoising_error(noise[pairs.eps_row[sl]], eps_hat, loss)
            if not eps_only:
                scores[sl] = out[ATTN_SCORES]

        chunks = [slice(lo, lo + batch_size) for lo in range(0, n, batch_size)]
        list(self._pool.map(run, chunks) if self._pool else map(run, chunks))
        if not (np.isfinite(errors).all() and np.isfinite(scores).all()):  # never a label picked among NaNs
            raise EngineError(f"the {self.precision} UNet of {self.engine_dir} gave NaN or infinite errors: the engine "
                              "is damaged (weights or schedule) or overflows in this precision; try fp32 or re-export "
                              "it")
        return errors, scores

    # --- classify: the options record, then the method's scorer ---------------------------------
    def classify(self, images, labels: list[str] | None = None, options: ClassifyOptions | None = None, *,
                 method: str | None = None, batch_size: int | None = None, progress: bool = False,
                 **overrides) -> list[Classification]:
        """One Classification per image (ranking best first, UNet passes used, confidence, the resolved options
        it ran with). `classify_iter` takes the same arguments and yields them one by one, in bounded memory.

        images: paths, PIL images or uint8 arrays (H,W) / (H,W,C); any iterable.
        labels: the class names to choose among (method "head": optional, must be the head's own set).
        options: a DcOptions, HeadOptions or DiffDisOptions record (engine/classify_options.py, where every option
            is described); or leave it out and pass its fields as keywords (`overrides`, which also go on top of
            `options`): unset ones take the engine's defaults.
        method: "dc" (default), the zero-shot Diffusion Classifier (DESIGN §3), ranking = mean denoising error,
            lower is better: `template`/`templates`, `stages`, `loss`, `seed`, `strategy` ("stages": fixed
            pruning stages, default when `stages` is given; "race": adaptive paired racing over a `timesteps`-point
            grid with `z`, `min_rounds`, `round_size`, `budget`, `use_profile`; "cascade": a `shortlist`er ("head"
            `head`, or "diffdis" `diffdis_mode`) keeps each image's `k` best classes (or by softmax `mass`), the race
            decides among them; `result.cascade` has the first stage); or "head", a trained head `head`, one UNet
            pass per noise step, ranking = probability; or "diffdis", the engine's DiffDis (`export --diffdis`),
            one image pass, ranking = score, higher is better (`diffdis_mode` "denoise": −mean x0 error of the text
            embedding over `timesteps` shared (t, ε); "generate": cosine similarity with the text embedding
            generated from the image).
        batch_size: UNet batch (default: chosen for the backend and sample size). progress: a bar on stderr.
        """
        return list(self.classify_iter(images, labels, options, method=method, batch_size=batch_size,
                                       progress=progress, **overrides))

    def classify_options(self, labels: list[str] | None = None, options: ClassifyOptions | None = None, *,
                         method: str | None = None, **overrides) -> ClassifyOptions:
        """The resolved record a `classify` call with these arguments runs with: flat keywords packed into the
        method's record, unset fields from this engine's defaults, every value checked (EngineError otherwise)."""
        if labels is not None:
            overrides["labels"] = labels
        return pack(method, options, overrides).resolve(self)

    def classify_iter(self, images, labels: list[str] | None = None, options: ClassifyOptions | None = None, *,
                      method: str | None = None, batch_size: int | None = None, progress: bool = False,
                      **overrides):
        """`classify` as a generator: results in input order as windows of images finish; images are read,
        decoded and encoded one window at a time, so memory does not grow with their number. Options are
        checked before the first image is read. Each result carries its image's path (`image`)."""
        batch_size = check_count("batch_size", batch_size, optional=True)
        resolved = self.classify_options(labels, options, method=method, **overrides)
        images, names = named_images(images)
        for result in self._classify_iter(images, resolved, batch_size, progress):
            result.image = names.popleft()
            yield result

    def _classify_iter(self, images, options: ClassifyOptions, batch_size: int | None, progress: bool):
        yield from scorer(options.method)(self, images, options, batch_size, progress)  # engine/scorers/

    def grid_errors(self, images, labels: list[str], *, templates: list[str] | None = None,
                    timesteps: int | None = None, loss: str | None = None, seed: int = 0, batch_size: int | None = None,
                    progress: bool = False) -> np.ndarray:
        """(images, candidates, grid) errors of every candidate at every timestep of the race's grid
        (`timesteps` points, default 100), with the race's (t, ε) pairs: the exhaustive decision is the
        lowest row mean. Candidates are labels × templates, label-major. What `diffscore profile` scores."""
        from diffscore.engine.scorers.dc import grid_errors

        return grid_errors(self, images, labels, templates=templates, timesteps=timesteps, loss=loss, seed=seed,
                           batch_size=batch_size, progress=progress)

    # --- match: DSD (engine/scorers/dsd.py), DiffDis, ITC ---------------------------------------
    def match(self, images, texts: list[str], *, steps: int | None = None, bias_weight: float | None = None,
              seed: int = 0, batch_size: int | None = None, progress: bool = False,
              preset: str | None = None, method: str = "dsd", diffdis_mode: str | None = None) -> MatchResult:
        """DSD scores of every (image, text) pair as a MatchResult (higher = better match).

        score = mean over timesteps of the attention score + bias_weight · denoising bias. The attention
        score pools the captured layers with the engine's learned score weights when prompt learning
        trained some (`train-prompts --score-weights`), else their mean.
        images: paths, PIL images or uint8 arrays; any iterable. texts: the captions.
        steps: timesteps per pair (default: the engine's). bias_weight: λ (default: the preset's; 0 skips
        the extra empty-prompt pass where the preset allows). seed: seed of the shared noise. batch_size:
        UNet batch (default: automatic). progress: show a progress bar on stderr.
        preset: the DSD preset (kernels.dsd: diffscore | discffusion); only the engine's own, chosen at
        export with its attention layers.
        method: "dsd" (the above); "diffdis": the engine's DiffDis, one image pass for all texts
        (`diffdis_mode` denoise | generate, `steps` = its shared (t, ε) count; see `classify`); or "itc": the
        cosine similarity of a `diffscore finetune` run's image and text embeddings, one UNet pass per image
        (engine/scorers/itc.py; steps, bias_weight, seed, preset unused)."""
        if method == "diffdis":
            from diffscore.engine.scorers.diffdis import match_diffdis

            return match_diffdis(self, images, texts, mode=diffdis_mode, timesteps=steps, seed=seed,
                                 batch_size=batch_size, progress=progress)
        if method == "itc":
            from diffscore.engine.scorers.itc import match_itc

            return match_itc(self, images, texts, batch_size=batch_size, progress=progress)
        if method != "dsd":
            raise EngineError(f"unknown match method {method!r}; choose from {', '.join(MATCH_METHODS)}")
        from diffscore.engine.scorers.dsd import match_dsd

        return match_dsd(self, images, texts, steps=steps, bias_weight=bias_weight, seed=seed, batch_size=batch_size,
                         progress=progress, preset=preset)
