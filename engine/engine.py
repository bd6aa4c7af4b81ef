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
from diffscore.engine.images import preprocess_batch
from diffscore.errors import EngineError
from diffscore.engine.manifest import Manifest
from diffscore.engine.progress import progress_bar
from diffscore.engine.results import Classification
from diffscore.kernels import (LOSSES, StagedPruning, add_noise, class_ranking, denoising_error, dsd_pair_scores,
                               dsd_preset, dsd_timesteps, epsilon_from_output, pool_layer_scores, shared_noise)

log = logging.getLogger("diffscore")

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
IMAGE_WINDOW = 16  # images advanced through the stages together: fuller batches, bounded memory
# On CPU, small UNets (samples of at most this many elements) run faster as several concurrent
# single-threaded runs of one session than as one multi-threaded run: measured on the demo UNet,
# 2 cores, batch 128: 855 vs 691 samples/s. Big latents keep ONNX Runtime's intra-op threading.
CONCURRENT_MAX_ELEMENTS = 4096


def load(engine_dir: str | Path, backend: str = "auto", device: int = 0, precision: str = "fp32",
         threads: int | None = None) -> "Engine":
    """Open an engine directory on a backend; `auto` picks the fastest one available here."""
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise EngineError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    engine_dir = Path(engine_dir)
    manifest = Manifest.load(engine_dir)
    unet = "unet" if precision == "fp32" else f"unet.{precision}"
    if unet not in manifest.graphs:
        how = "diffscore export --precision fp16" if precision == "fp16" else "diffscore calibrate"
        raise EngineError(f"{engine_dir} has no {precision} UNet ({unet}); create it with `{how}`")
    backend = resolve_backend(manifest, backend, unet)
    workers = 1
    if backend == "ort-cpu" and int(np.prod(manifest.sample_shape)) <= CONCURRENT_MAX_ELEMENTS:
        workers = threads or os.cpu_count() or 1
    names = [g for g in ("text_encoder", "vae_encoder") if g in manifest.graphs] + [unet]
    runners = {
        name.split(".")[0]: make_runner(engine_dir, manifest, name, backend, device, 1 if workers > 1 else threads)
        for name in names
    }
    return Engine(engine_dir, manifest, runners, backend, precision, workers, device, 1 if workers > 1 else threads)


def resolve_backend(manifest: Manifest, backend: str, unet: str) -> str:
    if backend != "auto":
        return backend
    from diffscore.engine.backends.onnxruntime import available_providers

    providers = available_providers()
    if any(p.graph == unet for p in manifest.plans.values()):
        from diffscore.engine.backends.tensorrt import matching_plan

        if matching_plan(manifest, unet) is not None:
            return "tensorrt"
    for name, provider in (("ort-trt", "TensorrtExecutionProvider"), ("ort-cuda", "CUDAExecutionProvider")):
        if provider in providers:
            return name
    return "ort-cpu"


def make_runner(engine_dir: Path, manifest: Manifest, graph: str, backend: str, device: int, threads) -> Runner:
    spec = manifest.graphs[graph]
    if backend == "tensorrt":
        from diffscore.engine.backends.tensorrt import TensorRTRunner, import_tensorrt, matching_plan

        import_tensorrt()  # the install message first, when TensorRT itself is missing
        plan = matching_plan(manifest, graph)
        if plan is None:
            raise EngineError(f"{engine_dir} has no TensorRT plan of {graph} for this GPU and TensorRT; run `diffscore build-trt {engine_dir}`")
        return TensorRTRunner(engine_dir / plan.file, plan, spec)
    from diffscore.engine.backends.onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(engine_dir / spec.file, spec, backend, device, threads)


@dataclass
class _Pairs:
    """A flat list of UNet evaluations: rows into the x_t stack, the embeddings and the noise."""

    xt: np.ndarray  # (K, C, H, W) noised samples, one per (image, timestep)
    xt_row: np.ndarray  # (n,) row of xt for each pair
    timestep: np.ndarray  # (n,) float32
    emb_row: np.ndarray  # (n,) row of the embedding table
    eps_row: np.ndarray  # (n,) row of the noise table


class Engine:
    """A loaded engine directory: `classify` (Diffusion Classifier or a trained head) and `match` (DSD scores)."""

    def __init__(self, engine_dir: Path, manifest: Manifest, runners: dict[str, Runner], backend: str, precision: str,
                 workers: int = 1, device: int = 0, threads: int | None = None):
        self.engine_dir, self.manifest, self.runners = engine_dir, manifest, runners
        self.backend, self.precision = backend, precision
        self._device, self._threads = device, threads  # for head graphs, opened on first use
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers) if workers > 1 else None  # concurrent UNet runs (CPU)
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(engine_dir / manifest.tokenizer))
        self.alphas_cumprod = np.asarray(manifest.alphas_cumprod, dtype=np.float64)
        self._text_cache: dict[str, np.ndarray] = {}
        log.info("loaded %s on %s (%s)", engine_dir, backend, precision)

    def __repr__(self) -> str:
        return f"Engine({str(self.engine_dir)!r}, backend={self.backend!r}, precision={self.precision!r})"

    @property
    def defaults(self) -> dict:
        return self.manifest.defaults

    @property
    def layer_weights(self) -> np.ndarray | None:
        """The DSD score weights prompt learning trained, in `attention_layers` order; None = plain mean."""
        trained = self.manifest.adapters.get("prompt_learning", {}).get("score_weights")
        return None if not trained else np.array([trained[n] for n in self.manifest.attention_layers], np.float32)

    def dsd_preset(self, preset: str | None = None):
        """The engine's DSD preset (recorded at export); another one needs its own attention layers: refused."""
        own = self.defaults.get("dsd_preset", "diffscore")
        if preset is not None and preset != own:
            raise EngineError(f"{self.engine_dir} was exported with the {own} DSD preset's attention layers; "
                              f"export the model with --dsd-preset {preset} to score with that preset")
        return dsd_preset(own)

    def default_batch_size(self) -> int:
        """Pairs per UNet call: small samples batch wide on CPU; GPUs and big latents less so."""
        plans = [p for p in self.manifest.plans.values() if p.graph.startswith("unet")]
        if self.backend == "tensorrt" and plans:
            return min(p.max_batch for p in plans)
        elements = int(np.prod(self.manifest.sample_shape))
        return int(np.clip(2**13 // elements, 1, 128)) if self.backend == "ort-cpu" else 32

    # --- inputs ---------------------------------------------------------------------------------
    def encode_text(self, prompts: list[str]) -> np.ndarray:
        """(P, L, D) text embeddings; each distinct prompt is encoded once and cached."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        step = self.default_batch_size()  # a TensorRT plan takes at most its max_batch
        for lo in range(0, len(missing), step):
            chunk = missing[lo : lo + step]
            ids = np.array([e.ids for e in self.tokenizer.encode_batch(chunk)], dtype=np.int64)
            self._text_cache.update(zip(chunk, self.runners["text_encoder"].infer({"input_ids": ids})["last_hidden_state"]))
        return np.stack([self._text_cache[p] for p in prompts])

    def encode_images(self, images) -> np.ndarray:
        """(N, C, S, S) x0: VAE latents (already scaled) or [-1, 1] pixels."""
        m = self.manifest
        pixels = preprocess_batch(images, m.image_size, m.image_channels)
        if m.pixel_space:
            return pixels
        vae, step = self.runners["vae_encoder"], min(8, self.default_batch_size())
        return np.concatenate([vae.infer({"image": pixels[i : i + step]})["latent"] for i in range(0, len(pixels), step)])

    # --- the UNet over many pairs -------------------------------------------------------------
    def _run_pairs(self, pairs: _Pairs, emb: np.ndarray, noise: np.ndarray, loss: str, batch_size: int):
        """Denoising error (n,) and attention scores (n, layers) for every pair, in batches."""
        unet = self.runners["unet"]
        n = len(pairs.xt_row)
        errors = np.empty(n, dtype=np.float32)
        scores = np.empty((n, len(self.manifest.attention_layers)), dtype=np.float32)

        def run(sl: slice):
            x_t = pairs.xt[pairs.xt_row[sl]]
            out = unet.infer({
                "sample": x_t,
                "timestep": pairs.timestep[sl],
                "encoder_hidden_states": emb[pairs.emb_row[sl]],
            })
            eps_hat = epsilon_from_output(out["eps"], x_t, self.alphas_cumprod[pairs.timestep[sl].astype(np.int64)],
                                          self.manifest.prediction_type)  # the graph returns the raw UNet output
            errors[sl] = denoising_error(noise[pairs.eps_row[sl]], eps_hat, loss)
            scores[sl] = out["attn_scores"]

        chunks = [slice(lo, lo + batch_size) for lo in range(0, n, batch_size)]
        list(self._pool.map(run, chunks) if self._pool else map(run, chunks))
        return errors, scores

    # --- Diffusion Classifier -----------------------------------------------------------------
    def classify(self, images, labels: list[str] | None = None, *, method: str = "dc", head: str | None = None,
                 template: str | None = None, templates: list[str] | None = None,
                 stages: list[tuple[int, int]] | None = None, loss: str | None = None, seed: int = 0,
                 batch_size: int | None = None, progress: bool = False) -> list[Classification]:
        """One result per image, ranking best first.

        method="dc": the zero-shot Diffusion Classifier (DESIGN §3) among `labels`; ranking = mean
        denoising error, lower is better. method="head": a trained head (`head`: its name, needed when
        the engine has several), one UNet pass per noise step; labels are the head's (if given, they
        must be the same set); ranking = softmax probability, higher is better.
        """
        if method == "head":
            return self._classify_head(images, labels, head, batch_size, progress)
        if method != "dc":
            raise EngineError(f"unknown method {method!r}; choose dc (Diffusion Classifier) or head (a trained head)")
        if labels is None:
            raise EngineError("the Diffusion Classifier needs labels: the class names to choose from")
        labels = check_labels(labels)
        templates = list(templates or [template or self.defaults.get("template", "{}")])
        stages = [tuple(s) for s in (stages or self.defaults["stages"])]
        loss = loss or self.defaults.get("loss", "l2")
        if loss not in LOSSES:
            raise EngineError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
        batch_size = batch_size or self.default_batch_size()
        prompts = [t.format(label) for label in labels for t in templates]
        candidate_class = np.repeat(np.arange(len(labels)), len(templates))
        emb = self.encode_text(prompts)
        x0 = self.encode_images(images)
        T = len(self.alphas_cumprod)
        try:
            runs = [StagedPruning(len(prompts), stages, T) for _ in x0]
        except ValueError as e:
            raise EngineError(str(e)) from None
        ts = runs[0].timesteps
        noise = shared_noise(seed, len(ts), tuple(x0.shape[1:]))
        with progress_bar("classify", len(x0), progress) as advance:
            for lo in range(0, len(x0), IMAGE_WINDOW):
                window = list(range(lo, min(lo + IMAGE_WINDOW, len(x0))))
                while jobs := [(i, *req) for i in window if (req := runs[i].request()) is not None]:
                    pairs = self._classify_pairs(x0, jobs, noise, ts)
                    errors, _ = self._run_pairs(pairs, emb, noise, loss, batch_size)
                    done = 0
                    for i, cand, pos in jobs:
                        size = len(cand) * len(pos)
                        runs[i].submit(errors[done : done + size].reshape(len(cand), len(pos)))
                        done += size
                advance(len(window))
        results = []
        for run in runs:
            ranking = class_ranking(run, candidate_class)
            results.append(Classification(
                label=labels[ranking[0][0]], ranking=[(labels[c], m) for c, m, _ in ranking],
                passes=run.passes, evaluated={labels[c]: n for c, _, n in ranking},
            ))
        return results

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

    # --- trained heads: one UNet pass per noise step -------------------------------------------
    def head_logits(self, images, head: str | None = None, *, batch_size: int | None = None,
                    progress: bool = False) -> np.ndarray:
        """(N, classes) logits of a trained head, classes in `manifest.heads[head]["labels"]` order.

        Each image is noised at the head's steps with its fixed ε (seeded, shared by all images); the head
        graph holds the UNet layers it reads (on its prompt, empty unless set) and the head: one UNet
        pass per step.
        """
        name = self.head_name(head)
        spec = self.manifest.heads[name]
        steps = np.asarray(spec["steps"], dtype=np.int64)
        x0 = self.encode_images(images)
        noise = shared_noise(spec["seed"], len(steps), tuple(x0.shape[1:]))
        runner = self._head_runner(spec["graph"])
        per_call = max(1, (batch_size or self.default_batch_size()) // len(steps))  # images per call
        per_call = min(per_call, -(-len(x0) // self.workers))  # a few images still keep every worker busy
        logits = np.empty((len(x0), len(spec["labels"])), dtype=np.float32)

        def run(lo: int) -> int:
            x = x0[lo : lo + per_call]
            xt = np.stack([add_noise(xi, noise, self.alphas_cumprod, steps) for xi in x])  # (n, steps, C, H, W)
            logits[lo : lo + len(x)] = runner.infer({"sample": xt})["logits"]
            return len(x)

        starts = range(0, len(x0), per_call)
        with progress_bar(f"head {name}", len(x0), progress) as advance:
            for n in self._pool.map(run, starts) if self._pool else map(run, starts):
                advance(n)
        return logits

    def head_name(self, head: str | None = None) -> str:
        heads = self.manifest.heads
        if not heads:
            raise EngineError(f"{self.engine_dir} has no trained head; train one with `diffscore train-head` and "
                              "export it with `diffscore export MODEL OUT --head HEAD_DIR`")
        if head is None:
            if len(heads) > 1:
                raise EngineError(f"{self.engine_dir} has several heads ({', '.join(heads)}); choose one (--head NAME)")
            return next(iter(heads))
        if head not in heads:
            raise EngineError(f"{self.engine_dir} has no head {head!r}; it has {', '.join(heads)}")
        return head

    def _head_runner(self, graph: str) -> Runner:
        """Head graphs are fp32 ONNX (whatever the UNet precision), on ONNX Runtime; under the native
        TensorRT backend on its CUDA provider when there is one."""
        if graph not in self.runners:
            backend = self.backend
            if backend == "tensorrt":
                from diffscore.engine.backends.onnxruntime import available_providers

                backend = "ort-cuda" if "CUDAExecutionProvider" in available_providers() else "ort-cpu"
            self.runners[graph] = make_runner(self.engine_dir, self.manifest, graph, backend, self._device, self._threads)
        return self.runners[graph]

    def _classify_head(self, images, labels, head, batch_size, progress) -> list[Classification]:
        name = self.head_name(head)
        spec = self.manifest.heads[name]
        classes = spec["labels"]
        if labels is not None and set(check_labels(labels)) != set(classes):
            raise EngineError(f"head {name} was trained on the labels {classes}, not {labels}; leave labels out to use its own")
        logits = self.head_logits(images, name, batch_size=batch_size, progress=progress).astype(np.float64)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        results = []
        for row in p:
            order = np.argsort(-row, kind="stable")
            results.append(Classification(label=classes[order[0]], ranking=[(classes[c], float(row[c])) for c in order],
                                          passes=len(spec["steps"])))
        return results

    # --- DSD matching -------------------------------------------------------------------------
    def match(self, images, texts: list[str], *, steps: int | None = None, bias_weight: float | None = None,
              seed: int = 0, batch_size: int | None = None, progress: bool = False,
              preset: str | None = None) -> np.ndarray:
        """(images, texts) DSD scores: mean over timesteps of attention score + λ·denoising bias. Higher = better.

        The attention score pools the captured layers with the engine's learned score weights when
        prompt learning trained some (`train-prompts --score-weights`), else their mean. `preset`
        (kernels.dsd: diffscore | discffusion) is the engine's, chosen at export with its attention layers;
        `bias_weight` defaults to the preset's λ."""
        texts = check_labels(texts, what="texts")
        spec = self.dsd_preset(preset)
        bias_weight = spec.bias_weight if bias_weight is None else float(bias_weight)
        ts = np.array(dsd_timesteps(steps or self.defaults.get("dsd_steps", 10), len(self.alphas_cumprod),
                                    reverse=spec.reversed_timesteps))
        batch_size = batch_size or self.default_batch_size()
        use_bias = bias_weight != 0.0
        prompts = texts + ([""] if use_bias or spec.pool_unconditional else [])
        emb = self.encode_text(prompts)
        x0 = self.encode_images(images)
        noise = shared_noise(seed, len(ts), tuple(x0.shape[1:]))
        numel = int(np.prod(x0.shape[1:]))
        K, P = len(ts), len(prompts)
        layer_weights = self.layer_weights
        out = np.empty((len(x0), len(texts)), dtype=np.float64)
        with progress_bar("match", len(x0), progress) as advance:
            for lo in range(0, len(x0), IMAGE_WINDOW):
                window = range(lo, min(lo + IMAGE_WINDOW, len(x0)))
                xt = np.concatenate([add_noise(x0[i], noise, self.alphas_cumprod, ts) for i in window])
                w = len(window)
                # pairs in (image, prompt, timestep) order
                img, prm, k = np.meshgrid(np.arange(w), np.arange(P), np.arange(K), indexing="ij")
                pairs = _Pairs(xt, (img * K + k).ravel(), ts[k.ravel()].astype(np.float32), prm.ravel(), k.ravel())
                l2, scores = self._run_pairs(pairs, emb, noise, "l2", batch_size)
                attn = pool_layer_scores(scores, layer_weights).reshape(w, P, K).astype(np.float64)
                norm = np.sqrt(l2.astype(np.float64) * numel).reshape(w, P, K)  # ||ε - ε̂||₂
                out[lo : lo + w] = dsd_pair_scores(attn, norm, len(texts), spec, bias_weight)
                advance(w)
        return out


def check_labels(labels, what: str = "labels") -> list[str]:
    if isinstance(labels, str):
        labels = [labels]
    labels = [str(x).strip() for x in labels]
    if not labels or any(not x for x in labels):
        raise EngineError(f"{what} must be a non-empty list of non-empty strings, got {labels!r}")
    if len(set(labels)) != len(labels):
        raise EngineError(f"{what} contain duplicates: {sorted({x for x in labels if labels.count(x) > 1})}")
    return labels
