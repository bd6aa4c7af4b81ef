"""The runtime: an engine directory + a backend -> classify and match, in numpy. No torch here.

Work is batched over (candidate × timestep) pairs across several images at once, so each UNet call
is full; x_t is computed once per (image, timestep) and shared by all candidates.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffscore.engine.backends.base import Runner
from diffscore.engine.backends.choice import BACKENDS, GPU_BATCH, VAE_BATCH, cpu_workers, make_runner, resolve_backend
from diffscore.engine.conditioning import PromptCache, TextConditioning, read_tokenizer
from diffscore.engine.eps_graph import EPS_ROLE, eps_graph, has_eps_graph
from diffscore.engine.heads import HeadScoring
from diffscore.engine.images import IMAGE_WINDOW, count_images, image_windows, preprocess_batch
from diffscore.errors import EngineError
from diffscore.engine.manifest import PRECISIONS, Manifest, ScoringDefaults, unet_graph
from diffscore.engine.options import (check_count, check_distinct_tokens, check_finite, check_labels, check_seed,
                                      check_templates)
from diffscore.engine.progress import progress_bar
from diffscore.engine.results import (Classification, ClassifyOptions, MatchOptions, MatchResult, classification,
                                      named_images)
from diffscore.kernels import (LOSSES, PairedRace, RaceConfig, add_noise, denoising_error, dsd_pair_scores, dsd_preset,
                               dsd_timesteps, epsilon_from_output, new_run, pool_layer_scores, race_plan, shared_noise)
from diffscore.kernels.cascade import cascade_config
from diffscore.kernels.racing import DEFAULT_GRID

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
    unknown = set(given) - {"text_encoder", "vae_encoder", "unet", EPS_ROLE}
    if unknown:
        raise EngineError(f"runner overrides for {sorted(unknown)}: only text_encoder, vae_encoder, unet and "
                          f"{EPS_ROLE} can be replaced")
    # issue 27: the ε̂-only graph (given, or the engine's own unless the scoring UNet is given); see below
    eps_only = EPS_ROLE in given or ("unet" not in given and has_eps_graph(manifest, precision, backend, device))
    names = [g for g in ("text_encoder", "vae_encoder") if g in manifest.graphs] + [unet]
    runners = {
        name.split(".")[0]: given.get(name.split(".")[0])
        or make_runner(engine_dir, manifest, name, backend, device, threads, workers=workers,
                       precision=precision if name == unet else "fp32")
        for name in names
    }
    if eps_only:  # issue 27: the ε̂-only graph runs classify, the scoring graph the methods that read scores
        runners[EPS_ROLE] = given.get(EPS_ROLE) or make_runner(engine_dir, manifest, eps_graph(precision), backend,
                                                               device, threads, workers=workers, precision=precision)
    if "unet" not in given:  # the engine reads ε̂ and the scores of the UNet graph, never its features.* maps
        runners["unet"].fetch = {"eps", "attn_scores"}
    engine = Engine(engine_dir, manifest, runners, backend, precision, workers, device, threads)
    engine._borrowed = set(given)  # the caller's runners: the caller closes them
    return engine


class _Closed(dict):
    """The runners of a closed engine: any use is one line (not a KeyError, not a silent reopen)."""

    def __getitem__(self, *_):
        raise EngineError("this engine was closed (close() or the end of its `with` block); load it again with "
                          "diffscore.load(...)")

    __contains__ = __setitem__ = __getitem__


@dataclass
class _Pairs:
    """A flat list of UNet evaluations: rows into the x_t stack, the embeddings and the noise."""

    xt: np.ndarray  # (K, C, H, W) noised samples, one per (image, timestep)
    xt_row: np.ndarray  # (n,) row of xt for each pair
    timestep: np.ndarray  # (n,) float32
    emb_row: np.ndarray  # (n,) row of the embedding table
    eps_row: np.ndarray  # (n,) row of the noise table


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

    def runner(self, role: str) -> Runner:
        """The runner of a graph role: "text_encoder", "vae_encoder", "unet", or a head's name."""
        if role in self.manifest.heads:
            return self.head_runner(role)
        if role not in self.runners and not isinstance(self.runners, _Closed):
            raise EngineError(f"{self.engine_dir} has no {role} runner; it has {', '.join(self.runners)}")
        return self.runners[role]

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
        plan_max = getattr(self.runners.get(EPS_ROLE) or self.runners.get("unet"), "max_batch", None)
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
        step = getattr(self.runners["text_encoder"], "max_batch", None) or self.default_batch_size()  # a plan's limit
        for lo in range(0, len(missing), step):
            chunk = missing[lo : lo + step]
            out = self.runners["text_encoder"].infer(self.token_feed(chunk))
            pooled = out.get("text_embeds")
            for j, p in enumerate(chunk):  # copies: a cached row must not keep its whole batch alive
                found[p] = (out["last_hidden_state"][j].copy(), None if pooled is None else pooled[j].copy())
                self.prompt_cache.put(p, found[p])
        return [found[p] for p in prompts]

    def encode_images(self, images) -> np.ndarray:
        """(N, C, S, S) x0: VAE latents (already scaled) or [-1, 1] pixels."""
        m = self.manifest
        pixels = preprocess_batch(images, m.image_size, m.image_channels)
        if m.pixel_space:
            return pixels
        vae = self.runners["vae_encoder"]
        step = min(VAE_BATCH, getattr(vae, "max_batch", None) or self.default_batch_size())
        return np.concatenate([vae.infer({"image": pixels[i : i + step]})["latent"] for i in range(0, len(pixels), step)])

    # --- the UNet over many pairs -------------------------------------------------------------
    def _run_pairs(self, pairs: _Pairs, emb, noise: np.ndarray, loss: str, batch_size: int, scores_read: bool = True):
        """Denoising error (n,) and attention scores (n, layers) for every pair, in batches.
        emb: the prompts' text_conditioning (or, on an SD engine, their encode_text array).
        scores_read=False: ε̂ only, on the ε̂-only graph where the engine has one (scores then (n, 0))."""
        eps_only = not scores_read and EPS_ROLE in self.runners
        unet = self.runners[EPS_ROLE if eps_only else "unet"]
        n = len(pairs.xt_row)
        errors = np.empty(n, dtype=np.float32)
        scores = np.empty((n, 0 if eps_only else len(self.manifest.attention_layers)), dtype=np.float32)

        def run(sl: slice):
            x_t = pairs.xt[pairs.xt_row[sl]]
            out = unet.infer({
                "sample": x_t,
                "timestep": pairs.timestep[sl],
                **self.conditioning_rows(emb, pairs.emb_row[sl]),
            })
            eps_hat = epsilon_from_output(out["eps"], x_t, self.alphas_cumprod[pairs.timestep[sl].astype(np.int64)],
                                          self.manifest.prediction_type)  # the graph returns the raw UNet output
            errors[sl] = denoising_error(noise[pairs.eps_row[sl]], eps_hat, loss)
            if not eps_only:
                scores[sl] = out["attn_scores"]

        chunks = [slice(lo, lo + batch_size) for lo in range(0, n, batch_size)]
        list(self._pool.map(run, chunks) if self._pool else map(run, chunks))
        if not (np.isfinite(errors).all() and np.isfinite(scores).all()):  # never a label picked among NaNs
            raise EngineError(f"the {self.precision} UNet of {self.engine_dir} gave NaN or infinite errors: the engine "
                              "is damaged (weights or schedule) or overflows in this precision; try fp32 or re-export it")
        return errors, scores

    # --- Diffusion Classifier -----------------------------------------------------------------
    def classify(self, images, labels: list[str] | None = None, *, method: str = "dc", head: str | None = None,
                 template: str | None = None, templates: list[str] | None = None,
                 stages: list[tuple[int, int]] | None = None, loss: str | None = None, seed: int = 0,
                 batch_size: int | None = None, progress: bool = False, strategy: str | None = None,
                 z: float | None = None, min_rounds: int | None = None, round_size: int | None = None,
                 budget: int | None = None, timesteps: int | None = None, use_profile: bool = True,
                 diffdis_mode: str | None = None, shortlist: str | None = None, k: int | None = None,
                 mass: float | None = None) -> list[Classification]:
        """One Classification per image (ranking best first, UNet passes used, confidence, the options it
        ran with). `classify_iter` takes the same arguments and yields them one by one, in bounded memory.

        images: paths, PIL images or uint8 arrays (H,W) / (H,W,C); any iterable.
        labels: the class names to choose among (method "head": optional, must be the head's own set).
        method: "dc", the zero-shot Diffusion Classifier (DESIGN §3), ranking = mean denoising error, lower
            is better; or "head", a trained head, one UNet pass per noise step, ranking = probability; or
            "diffdis", the engine's DiffDis (`export --diffdis`), one image pass, ranking = score, higher is better
            (`diffdis_mode` "denoise": −mean x0 error of the text embedding over `timesteps` shared (t, ε);
            "generate": cosine similarity with the text embedding generated from the image; default: the engine's).
        head: the head's name (method "head"), needed when the engine has several.
        template / templates: prompt template(s) with one `{}` for the label (default: the engine's);
            several templates make several candidates per class, a class scoring as its best one.
        stages: [(n_samples, keep), ...] fixed pruning stages (default: the engine's).
        loss: "l2", "l1" or "huber" (default: the engine's).
        seed: seed of the shared noise: same seed, same scores.
        batch_size: UNet batch (default: chosen for the backend and sample size).
        progress: show a progress bar on stderr.
        strategy: "stages" (fixed stages) or "race" (adaptive paired racing over a `timesteps`-point grid,
            default: the engine's profile, else 100, in rounds of `round_size`, dropping a candidate `z`
            standard errors behind the leader after `min_rounds` rounds, at most `budget` passes per
            image; `use_profile`: visit the grid in the engine's profiled order); or "cascade": the
            `shortlist`er ("head": the engine's head `head`, default; "diffdis") keeps each image's `k` best
            classes (default 3; with `mass`: the fewest whose softmax mass reaches it, at most k), then the
            race decides among them (kernels/cascade.py; passes count both stages, `result.cascade` the first).
            Default: "stages" when `stages` is given, else the engine's default strategy.
        """
        return list(self.classify_iter(images, labels, method=method, head=head, template=template,
                                       templates=templates, stages=stages, loss=loss, seed=seed,
                                       batch_size=batch_size, progress=progress, strategy=strategy, z=z,
                                       min_rounds=min_rounds, round_size=round_size, budget=budget,
                                       timesteps=timesteps, use_profile=use_profile, diffdis_mode=diffdis_mode,
                                       shortlist=shortlist, k=k, mass=mass))

    def classify_iter(self, images, labels: list[str] | None = None, **options):
        """`classify` as a generator: see _classify_iter. Each result carries its image's path (`image`)."""
        images, names = named_images(images)
        for result in self._classify_iter(images, labels, **options):
            result.image = names.popleft()
            yield result

    def _classify_iter(self, images, labels: list[str] | None = None, *, method: str = "dc", head: str | None = None,
                       template: str | None = None, templates: list[str] | None = None,
                       stages: list[tuple[int, int]] | None = None, loss: str | None = None, seed: int = 0,
                       batch_size: int | None = None, progress: bool = False, strategy: str | None = None,
                       z: float | None = None, min_rounds: int | None = None, round_size: int | None = None,
                       budget: int | None = None, timesteps: int | None = None, use_profile: bool = True,
                       diffdis_mode: str | None = None, shortlist: str | None = None, k: int | None = None,
                       mass: float | None = None):
        """`classify` as a generator: results in input order as windows of images finish; images are read,
        decoded and encoded one window at a time, so memory does not grow with their number. Options are
        checked before the first image is read."""
        batch_size = check_count("batch_size", batch_size, optional=True)
        if method == "head":
            yield from self._classify_head(images, labels, head, batch_size, progress)
            return
        if method == "diffdis":
            from diffscore.engine.diffdis import classify_diffdis

            yield from classify_diffdis(self, images, labels, template=template, mode=diffdis_mode, timesteps=timesteps,
                                        seed=seed, batch_size=batch_size, progress=progress)
            return
        if method != "dc":
            raise EngineError(f"unknown method {method!r}; choose dc (Diffusion Classifier), head (a trained head) "
                              "or diffdis")
        if labels is None:
            raise EngineError("the Diffusion Classifier needs labels: the class names to choose from")
        labels = check_labels(labels)
        templates = check_templates(template, templates, self.defaults.template)
        explicit_stages = stages is not None  # [] is refused by the stages check below, not replaced by the default
        stages = [tuple(s) for s in (self.defaults.stages if stages is None else stages)]
        loss = loss or self.defaults.loss
        seed = check_seed(seed)
        if loss not in LOSSES:
            raise EngineError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
        strategy = strategy or ("stages" if explicit_stages else self.defaults.strategy)
        given = {k: v for k, v in dict(z=z, min_rounds=min_rounds, round_size=round_size, budget=budget).items()
                 if v is not None}
        T = len(self.alphas_cumprod)
        profile = self.manifest.timestep_profile if use_profile else None
        try:
            config = RaceConfig(**{**self.defaults.race.given(), **given})  # call > engine default > RaceConfig
            make = lambda n: new_run("race" if strategy == "cascade" else strategy, n, T,  # noqa: E731
                                     stages=stages, race=config, grid_size=timesteps, profile=profile)
            make(len(labels) * len(templates))  # bad options fail here, before any image is read
            cascade = cascade_config(strategy, shortlist, k, mass)
        except (ValueError, TypeError) as e:
            raise EngineError(str(e)) from None
        race = None if strategy == "stages" else {**config.__dict__, "timesteps": timesteps, "profile": profile is not None}
        if cascade is not None:
            from diffscore.engine.cascade import classify_cascade

            yield from classify_cascade(self, images, labels, templates, cascade, config, loss=loss, seed=seed,
                                        batch_size=batch_size, progress=progress, head=head, diffdis_mode=diffdis_mode,
                                        timesteps=timesteps, profile=profile, race_options=race)
            return
        options = ClassifyOptions("dc", tuple(labels), tuple(templates), tuple(stages) if strategy == "stages" else (),
                                  loss, seed, strategy=strategy, race=race, backend=self.backend, precision=self.precision)
        for run, candidate_class in self._score_runs(images, labels, templates, make, loss, seed, batch_size, progress):
            yield classification(run, labels, candidate_class, options)

    def grid_errors(self, images, labels: list[str], *, templates: list[str] | None = None, timesteps: int | None = None,
                    loss: str | None = None, seed: int = 0, batch_size: int | None = None,
                    progress: bool = False) -> np.ndarray:
        """(images, candidates, grid) errors of every candidate at every timestep of the race's grid
        (`timesteps` points, default 100), with the race's (t, ε) pairs: the exhaustive decision is the
        lowest row mean. Candidates are labels × templates, label-major. What `diffscore profile` scores."""
        labels = check_labels(labels)
        templates = check_templates(None, templates, self.defaults.template)
        loss = loss or self.defaults.loss
        if loss not in LOSSES:
            raise EngineError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
        seed = check_seed(seed)
        try:
            grid, _ = race_plan(len(self.alphas_cumprod), timesteps or DEFAULT_GRID)
        except ValueError as e:
            raise EngineError(str(e)) from None
        every = RaceConfig(z=float("inf"), round_size=len(grid))  # one round of everything, nobody leaves
        make = lambda n: PairedRace(n, grid, np.arange(len(grid)), every)  # noqa: E731
        runs = [run for run, _ in self._score_runs(images, labels, templates, make, loss, seed, batch_size, progress)]
        return np.stack([run.errors for run in runs])

    def _score_runs(self, images, labels, templates, make_run, loss, seed, batch_size, progress):
        """Yields (finished run, candidate classes) per image, in order: one StagedPruning/PairedRace per
        image, IMAGE_WINDOW images read, encoded and driven to the end together (full UNet batches,
        bounded memory)."""
        batch_size = batch_size or self.default_batch_size()
        prompts = [t.format(label) for label in labels for t in templates]
        self.check_prompts(prompts, "prompts")
        candidate_class = np.repeat(np.arange(len(labels)), len(templates))
        emb = self.text_conditioning(prompts)
        noise = ts = None
        with progress_bar("classify", count_images(images), progress) as advance:
            for window_images in image_windows(images, IMAGE_WINDOW):
                x0 = self.encode_images(window_images)
                runs = [make_run(len(prompts)) for _ in x0]
                if noise is None:
                    ts = runs[0].timesteps
                    noise = shared_noise(seed, len(ts), tuple(x0.shape[1:]))
                window = list(range(len(x0)))
                while jobs := [(i, *req) for i in window if (req := runs[i].request()) is not None]:
                    pairs = self._classify_pairs(x0, jobs, noise, ts)
                    errors, _ = self._run_pairs(pairs, emb, noise, loss, batch_size, scores_read=False)
                    done = 0
                    for i, cand, pos in jobs:
                        size = len(cand) * len(pos)
                        runs[i].submit(errors[done : done + size].reshape(len(cand), len(pos)))
                        done += size
                advance(len(window))
                for run in runs:
                    yield run, candidate_class
        if noise is None:
            raise EngineError("no images given")

    def _classify_pairs(self, x0, jobs, noise, ts) -> _Pairs:
        """Pairs in (candidate, timestep) order per job; x_t once per (image, timestep)."""
        blocks, xt_row, emb_row, eps_row = [], [], [], []
        offset = 0
        for i, cand, pos in jobs:
            blocks.append(add_noise(x0[i], noise[pos], self.alphas_cumprod, ts[pos]))
            xt_row.append(offset + np.tile(np.arange(len(pos)), len(cand)))
            emb_row.append(np.repeat(cand, len(pos)))
            eps_row.append(np.tile(pos, len(cand)))
            offset += len(pos)
        eps_row = np.concatenate(eps_row)
        return _Pairs(np.concatenate(blocks), np.concatenate(xt_row), ts[eps_row].astype(np.float32),
                      np.concatenate(emb_row), eps_row)

    # --- DSD matching -------------------------------------------------------------------------
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
        (engine/itc.py; steps, bias_weight, seed, preset unused)."""
        if method == "diffdis":
            from diffscore.engine.diffdis import match_diffdis

            return match_diffdis(self, images, texts, mode=diffdis_mode, timesteps=steps, seed=seed,
                                 batch_size=batch_size, progress=progress)
        if method == "itc":
            from diffscore.engine.itc import match_itc

            return match_itc(self, images, texts, batch_size=batch_size, progress=progress)
        if method != "dsd":
            raise EngineError(f"unknown match method {method!r}; choose from dsd, diffdis, itc")
        texts = check_labels(texts, what="texts")
        self.check_prompts(texts, "texts")
        steps = check_count("steps", steps, optional=True)
        batch_size = check_count("batch_size", batch_size, optional=True)
        seed = check_seed(seed)
        spec = self.dsd_preset(preset)
        bias_weight = spec.bias_weight if bias_weight is None else check_finite("bias_weight", bias_weight)
        try:
            ts = np.array(dsd_timesteps(steps or self.defaults.dsd_steps, len(self.alphas_cumprod),
                                        reverse=spec.reversed_timesteps))
        except ValueError as e:
            raise EngineError(str(e)) from None
        batch_size = batch_size or self.default_batch_size()
        use_bias = bias_weight != 0.0
        prompts = texts + ([""] if use_bias or spec.pool_unconditional else [])
        emb = self.text_conditioning(prompts)
        sample = tuple(self.manifest.sample_shape)
        noise = shared_noise(seed, len(ts), sample)
        numel = int(np.prod(sample))
        K, P = len(ts), len(prompts)
        layer_weights = self.layer_weights
        out = []
        with progress_bar("match", count_images(images), progress) as advance:
            for window_images in image_windows(images, IMAGE_WINDOW):  # read and encoded a window at a time
                x0 = self.encode_images(window_images)
                xt = np.concatenate([add_noise(x, noise, self.alphas_cumprod, ts) for x in x0])
                w = len(x0)
                # pairs in (image, prompt, timestep) order
                img, prm, k = np.meshgrid(np.arange(w), np.arange(P), np.arange(K), indexing="ij")
                pairs = _Pairs(xt, (img * K + k).ravel(), ts[k.ravel()].astype(np.float32), prm.ravel(), k.ravel())
                l2, scores = self._run_pairs(pairs, emb, noise, "l2", batch_size)
                attn = pool_layer_scores(scores, layer_weights).reshape(w, P, K).astype(np.float64)
                norm = np.sqrt(l2.astype(np.float64) * numel).reshape(w, P, K)  # ||ε - ε̂||₂
                out.append(dsd_pair_scores(attn, norm, len(texts), spec, bias_weight))
                advance(w)
        if not out:
            raise EngineError("no images given")
        weights = None if layer_weights is None else tuple(float(v) for v in layer_weights)
        return MatchResult(np.concatenate(out), texts, MatchOptions(tuple(int(t) for t in ts), float(bias_weight), seed, weights,
                                                    self.backend, self.precision))

