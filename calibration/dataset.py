"""Calibration sets: real UNet inputs drawn from the scoring workload itself.

INT8 ranges are only as good as the activations they were measured on, so the inputs are the ones the
engine will actually feed the UNet: x_t = sqrt(ā_t) x0 + sqrt(1-ā_t) ε at the Diffusion Classifier's
timestep grid (and DSD's matching timesteps), with the shared noise row each timestep gets at scoring
time and the encoded prompts of the user's labels. Everything is drawn from one seeded generator, so
the same seed, images and labels give the same file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffscore.engine.graph_contract import CONTEXT, POOLED, SAMPLE, TIME_IDS, TIMESTEP
from diffscore.engine.images import IMAGE_SUFFIXES, image_files
from diffscore.errors import EngineError
from diffscore.kernels import add_noise, dsd_timesteps, shared_noise, stage_timesteps

log = logging.getLogger("diffscore")

CALIBRATION_FILE = "calibration.npz"
MIN_SAMPLES = 16  # fewer UNet inputs than this give ranges that depend on which ones were drawn
WORKLOADS = ("classify", "match")  # workload[i] indexes this


@dataclass
class CalibrationSet:
    """N UNet inputs; text embeddings are stored once per prompt and indexed per sample."""

    sample: np.ndarray  # (N, C, H, W) float32 x_t
    timestep: np.ndarray  # (N,) float32
    prompt_row: np.ndarray  # (N,) int64 row of `embeddings`
    embeddings: np.ndarray  # (P, L, D) float32 encoded prompts
    image_row: np.ndarray  # (N,) int64 index into the source images
    noise_row: np.ndarray  # (N,) int64 row of the shared noise (the timestep's position in its scorer's order)
    workload: np.ndarray  # (N,) int64 index into WORKLOADS
    meta: dict = field(default_factory=dict)  # seed, source, prompts, template, stages, dsd_steps
    text_embeds: np.ndarray | None = None  # (P, D2) SDXL engines: the prompts' pooled embeddings
    time_ids: np.ndarray | None = None  # (P, 6) SDXL engines: the prompts' time ids

    def __len__(self) -> int:
        return len(self.sample)

    def feeds(self, batch_size: int = 32):
        """UNet feeds of at most `batch_size` pairs, in file order."""
        for lo in range(0, len(self), batch_size):
            sl = slice(lo, lo + batch_size)
            rows = self.prompt_row[sl]
            yield {SAMPLE: self.sample[sl], TIMESTEP: self.timestep[sl], CONTEXT: self.embeddings[rows],
                   **{k: v[rows] for k in (POOLED, TIME_IDS) if (v := getattr(self, k)) is not None}}

    def save(self, path: Path) -> None:
        """Write atomically (temporary name, then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        arrays = {k: getattr(self, k) for k in ("sample", "timestep", "prompt_row", "embeddings", "image_row",
                                                 "noise_row", "workload", "text_embeds", "time_ids")}
        arrays = {k: v for k, v in arrays.items() if v is not None}
        np.savez(tmp, **arrays, meta=np.array(json.dumps(self.meta)))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "CalibrationSet":
        path = Path(path)
        if not path.is_file():
            raise EngineError(f"calibration set {path} does not exist; create it with `diffscore calibrate`")
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "meta"}
            return cls(**arrays, meta=json.loads(str(z["meta"])))


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name (the order the seed permutes)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EngineError(f"image folder {folder} does not exist")
    files = image_files(folder)
    if not files:
        raise EngineError(f"image folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); give a folder of "
                          "images like the ones you will score, or --demo")
    return files


def split_images(n_images: int, n_validation: int, n_calibration: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint, seeded (validation, calibration) index sets: the gate never sees a calibration image."""
    order = np.random.default_rng(seed).permutation(n_images)
    return order[:n_validation], order[n_validation:][:n_calibration]


def workload_timesteps(defaults, num_train_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, their scorer) in each scorer's evaluation order: the classifier's staged grid, then DSD's."""
    stages = [tuple(s) for s in defaults.stages]
    try:
        classify = [t for ts in stage_timesteps(stages, num_train_timesteps) for t in ts]
        match = dsd_timesteps(int(defaults.dsd_steps), num_train_timesteps)
    except ValueError as e:
        raise EngineError(f"the engine's scoring defaults are invalid: {e}") from None
    ts = np.array(classify + match, dtype=np.int64)
    return ts, np.repeat([0, 1], [len(classify), len(match)])


def collect(engine, images: list, labels: list[str], samples: int, seed: int = 0, source: str = "",
            image_ids=None, progress: bool = False) -> CalibrationSet:
    """Draw `samples` UNet inputs from classifying/matching `images` against `labels` on `engine` (fp32).

    Each sample takes an image (cycling through them in the given order), a (timestep, noise row) pair
    drawn uniformly from the ones the classifier and the matcher evaluate, and a prompt drawn uniformly
    from the labels: the mix of inputs the scorers send to the UNet, at the shared noise they use.
    `image_ids` (default 0..n-1) are what `image_row` records for each image, e.g. its index in a folder.
    """
    from diffscore.engine.options import check_labels
    from diffscore.engine.progress import progress_bar

    labels = check_labels(labels)
    if samples < MIN_SAMPLES:
        raise EngineError(f"--samples {samples} is too few for stable INT8 ranges; give at least {MIN_SAMPLES}")
    if not images:
        raise EngineError("no calibration images given")
    defaults = engine.defaults
    template = defaults.template
    prompts = [template.format(label) for label in labels]
    T = len(engine.alphas_cumprod)
    ts, scorer = workload_timesteps(defaults, T)
    positions = np.concatenate([np.arange((scorer == w).sum()) for w in range(len(WORKLOADS))])  # noise rows

    ids = np.arange(len(images)) if image_ids is None else np.asarray(image_ids, dtype=np.int64)
    rng = np.random.default_rng(seed)
    image_row = np.arange(samples) % len(images)
    pick = rng.integers(0, len(ts), samples)
    prompt_row = rng.integers(0, len(prompts), samples)
    conditioning = engine.text_conditioning(prompts)
    used = np.unique(image_row)
    sample = None
    with progress_bar("calibration set", len(used), progress) as advance:
        for lo in range(0, len(used), 64):
            chunk = used[lo : lo + 64]
            x0 = engine.encode_images([images[i] for i in chunk])
            if sample is None:
                sample = np.empty((samples, *x0.shape[1:]), dtype=np.float32)
                noise = shared_noise(seed, int(positions.max()) + 1, tuple(x0.shape[1:]))
            for j, i in enumerate(chunk):
                rows = np.flatnonzero(image_row == i)
                k = pick[rows]
                sample[rows] = add_noise(x0[j], noise[positions[k]], engine.alphas_cumprod, ts[k])
            advance(len(chunk))
    meta = {"seed": seed, "source": source, "prompts": prompts, "labels": labels, "template": template,
            "stages": [list(s) for s in defaults.stages], "dsd_steps": int(defaults.dsd_steps),
            "images": len(images)}
    log.info("calibration set: %d samples from %d images, %d prompts, %d timesteps", samples, len(used), len(prompts),
             len(np.unique(ts[pick])))
    return CalibrationSet(sample=sample, timestep=ts[pick].astype(np.float32), prompt_row=prompt_row.astype(np.int64),
                          embeddings=conditioning[CONTEXT].astype(np.float32), image_row=ids[image_row],
                          text_embeds=conditioning.get(POOLED), time_ids=conditioning.get(TIME_IDS),
                          noise_row=positions[pick].astype(np.int64), workload=scorer[pick].astype(np.int64), meta=meta)
