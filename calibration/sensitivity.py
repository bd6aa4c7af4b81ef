"""Which layers INT8 hurts, and the decision gate that an INT8 UNet must pass.

Denoising-error scores differ between classes by a small fraction of their size, so quantization noise
can flip decisions while tensors look close: everything here is measured on class scores and
decisions, never on tensors. Validation images are the caller's (training digits for the demo) and
never the held-out set, which is kept for the final report.

- `layer_sensitivity`: each layer quantized *alone* (every other layer float) -> how far the class
  scores move, relative to the fp32 decision margin, and how many decisions flip (no pruning, a few
  timesteps, every class).
- `decision_gate`: the full staged classifier with the INT8 UNet vs fp32: top-1 agreement ≥ 99%.
- `auto_keep_float`: keep the most sensitive layers in float, one at a time, until the gate holds.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from diffscore.calibration.quantize import quantizable_layers, quantize_unet
from diffscore.engine.graph_contract import TEXT_ENCODER, VAE_ENCODER
from diffscore.errors import EngineError
from diffscore.export.verdicts import Verdict, agreement

log = logging.getLogger("diffscore")

SENSITIVITY_TIMESTEPS = 4  # evenly spaced over [0, T): every class at each, no pruning


@dataclass
class LayerSensitivity:
    layer: str
    score_error: float  # RMS change of the class scores / RMS fp32 margin (best vs runner-up)
    flips: float  # fraction of validation images whose best class changes


def gate_verdict(got: list[str], want: list[str]) -> Verdict:
    """The INT8 decision gate: top-1 agreement with the fp32 UNet's decisions on validation images."""
    return agreement("int8", got, want, against="fp32", source="validation images")


class UnetSwap:
    """An fp32 engine whose UNet runner can be swapped for a candidate graph (same inputs/outputs)."""

    def __init__(self, engine_dir: Path):
        import diffscore
        from diffscore.engine.backends.choice import CONCURRENT_MAX_ELEMENTS

        self.engine_dir = Path(engine_dir)
        self.fp32_engine = self.engine = diffscore.load(engine_dir, backend="ort-cpu")
        small = int(np.prod(self.engine.manifest.sample_shape)) <= CONCURRENT_MAX_ELEMENTS
        self.threads = 1 if small else None  # as `load` does: concurrent single-threaded runs on CPU
        self._tmp = Path(tempfile.mkdtemp(prefix="diffscore-swap-"))
        self.progress = False  # a bar per decision run (the gate's); never inside layer_sensitivity's own bar

    def use(self, model: onnx.ModelProto | None) -> "UnetSwap":
        """Score with `model` (None: the fp32 UNet): an engine whose UNet runner is the candidate's,
        sharing the fp32 engine's text and image encoders."""
        import diffscore
        from diffscore.engine.backends.onnxruntime import OnnxRuntimeRunner

        if self.engine is not self.fp32_engine:
            self.engine.runner("unet").close()
            self.engine.close()
        if model is None:
            self.engine = self.fp32_engine
            return self
        path = self._tmp / "candidate.onnx"
        onnx.save(model, str(path))
        base = self.fp32_engine
        runners = {"unet": OnnxRuntimeRunner(path, base.manifest.graphs["unet"], "ort-cpu", 0, self.threads)}
        runners.update({role: base.runner(role) for role in (TEXT_ENCODER, VAE_ENCODER) if role in base.runners})
        self.engine = diffscore.load(self.engine_dir, backend="ort-cpu", runners=runners)
        return self

    def scores(self, images, labels, seed: int = 0) -> np.ndarray:
        """(images, labels) mean denoising error of every class at SENSITIVITY_TIMESTEPS timesteps."""
        results = self.engine.classify(images, labels, stages=[(SENSITIVITY_TIMESTEPS, len(labels))], seed=seed)
        return np.array([[r.scores[label] for label in labels] for r in results])

    def decisions(self, images, labels, seed: int = 0) -> list[str]:
        """Top-1 labels of the engine's own staged classifier (its default stages and loss)."""
        return [r.label for r in self.engine.classify(images, labels, seed=seed, progress=self.progress)]

    def close(self):
        import shutil

        self.use(None)
        self.fp32_engine.close()
        shutil.rmtree(self._tmp, ignore_errors=True)


def score_error(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(RMS score change / RMS fp32 margin, fraction of flipped decisions) for (images, classes) scores."""
    ordered = np.sort(want, axis=1)
    margin = np.sqrt(np.mean((ordered[:, 1] - ordered[:, 0]) ** 2)) if want.shape[1] > 1 else 1.0
    err = float(np.sqrt(np.mean((got - want) ** 2)) / max(margin, 1e-12))
    return err, float(np.mean(got.argmin(axis=1) != want.argmin(axis=1)))


def layer_sensitivity(swap: UnetSwap, fp32_path: Path, calibration_set, images, labels, *, method: str,
                      ranges_cache: Path, layers: list[str] | None = None,
                      progress: bool = False) -> list[LayerSensitivity]:
    """Each layer quantized alone; most sensitive first."""
    from diffscore.engine.progress import progress_bar

    every = list(quantizable_layers(onnx.load(str(fp32_path), load_external_data=False)))
    layers = every if layers is None else layers
    want = swap.use(None).scores(images, labels)
    rows = []
    with progress_bar("layer sensitivity", len(layers), progress) as advance:
        for layer in layers:
            model = quantize_unet(fp32_path, calibration_set, method=method, ranges_cache=ranges_cache,
                                  keep_float=[x for x in every if x != layer])
            rows.append(LayerSensitivity(layer, *score_error(swap.use(model).scores(images, labels), want)))
            advance()
    swap.use(None)
    return sorted(rows, key=lambda r: (-r.flips, -r.score_error))


def decision_gate(swap: UnetSwap, model: onnx.ModelProto, images, labels,
                  reference: list[str] | None = None) -> Verdict:
    """Top-1 agreement of the staged classifier with `model` as UNet vs fp32 (`reference` if given)."""
    if not images:
        raise EngineError("the decision gate needs validation images")
    want = reference if reference is not None else swap.use(None).decisions(images, labels)
    got = swap.use(model).decisions(images, labels)
    swap.use(None)
    return gate_verdict(got, want)


def auto_keep_float(swap: UnetSwap, fp32_path: Path, calibration_set, images, labels, *, method: str,
                    ranges_cache: Path, start: list[str], ranking: list[LayerSensitivity], reference: list[str]):
    """After `start` failed the gate: add the most sensitive layers, one at a time, until it holds.

    Returns (layers kept float, the passing model, its gate, [(number kept, gate) per step]).
    """
    keep, steps = list(start), []
    for layer in [r.layer for r in ranking if r.layer not in start]:
        keep.append(layer)
        model = quantize_unet(fp32_path, calibration_set, method=method, keep_float=keep, ranges_cache=ranges_cache)
        gate = decision_gate(swap, model, images, labels, reference)
        steps.append((len(keep), gate))
        log.info("auto: %s kept float -> %s", layer, gate)
        if gate.passed:
            return keep, model, gate, steps
    raise EngineError(f"no INT8 layer set passes the decision gate on {len(images)} validation images, even with "
                      f"{len(keep)} layers kept float; use the fp16 or fp32 UNet for this model")
