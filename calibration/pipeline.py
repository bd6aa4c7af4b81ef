"""`diffscore calibrate`: calibration set -> INT8 Q/DQ UNet -> decision gate -> engine directory.

The calibration set and `unet.int8.onnx` are written into the engine directory only once the INT8
UNet passes the decision gate (or no gate was asked for), and recorded in the manifest: the graph as
"unet.int8" (precision "int8"), the calibration set under `defaults["calibration"]`.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from diffscore.errors import EngineError
from diffscore.export.atomic import disk_errors, exclusive, temp_dir
from diffscore.engine.manifest import CalibrationRecord, GraphSpec, Manifest, resolve_inside, sha256_files
from diffscore.engine.progress import progress_bar

log = logging.getLogger("diffscore")

INT8_GRAPH, INT8_FILE = "unet.int8", "unet.int8.onnx"
DEFAULT_SAMPLES = 256
DEFAULT_VALIDATION = 100  # images for the decision gate: ≥ 99% agreement then means at most one flip
SENSITIVITY_IMAGES = 16  # of the validation images, for the per-layer report: a ranking, not a verdict


@dataclass
class CalibrationResult:
    engine_dir: Path
    graph: GraphSpec
    record: CalibrationRecord  # what the manifest says about the calibration (manifest.calibration)
    float_layers: list[str]  # quantizable layers kept in float
    quantized: list[str]  # layers with int8 weights and activations
    gate: object | None  # the decision gate's Verdict, None when no validation images were used
    sensitivity: list = field(default_factory=list)  # sensitivity.LayerSensitivity rows, most sensitive first
    auto_steps: list = field(default_factory=list)  # (number of layers kept float, Gate) per gate run
    total: object | None = None  # sensitivity.LayerSensitivity of the written UNet (--report only)


def source_images(images, labels: list[str] | None, source: str | None):
    """(pool of images, description, labels): a folder's image files, or the caller's list of images."""
    if labels is None:
        raise EngineError("give the labels the engine will score: --labels a,b,c or --labels-file FILE")
    if isinstance(images, (str, Path)):
        from diffscore.calibration.dataset import list_images

        return list_images(Path(images)), source or f"images in {images}", list(labels)
    return list(images), source or f"{len(images)} images", list(labels)


def calibrate(engine_dir: str | Path, *, images, labels: list[str] | None, source: str | None = None,
              samples: int = DEFAULT_SAMPLES, method: str = "minmax", seed: int = 0, report: bool = False,
              auto: bool = False, validation: int = DEFAULT_VALIDATION, keep_float: list[str] | None = None,
              smoothquant_alpha: float | None = None, progress: bool = False) -> CalibrationResult:
    """Calibrate, quantize, check decisions and record the INT8 UNet in `engine_dir`.

    images: a folder of image files, or a list of images (paths or arrays); `source` describes them in the record.
    keep_float: substrings of layer names to keep in float (default quantize.DEFAULT_FLOAT; [] for none).
    validation: images held out of calibration for the decision gate (0: no gate).
    smoothquant_alpha: rescale LayerNorm -> linear layers first (calibration/smoothquant.py); None: off.
    """
    if importlib.util.find_spec("onnx") is None:
        raise EngineError("`diffscore calibrate` needs the onnx package: pip install onnx (or 'diffscore[torch]')")
    import onnx

    from diffscore.calibration import dataset, quantize, sensitivity, smoothquant
    from diffscore.export.fp16 import on_fp16_base
    from diffscore.engine.options import check_labels

    engine_dir = Path(engine_dir)
    manifest = Manifest.load(engine_dir)
    if method not in quantize.METHODS:
        raise EngineError(f"unknown calibration method {method!r}; choose from {', '.join(quantize.METHODS)}")
    if smoothquant_alpha is not None and not 0 < smoothquant_alpha < 1:
        raise EngineError(f"--smoothquant takes α in (0, 1) (0.5 is the usual), got {smoothquant_alpha}")
    if samples < dataset.MIN_SAMPLES:
        raise EngineError(f"--samples {samples} is too few for stable INT8 ranges; give at least {dataset.MIN_SAMPLES}")
    pool, source, labels = source_images(images, labels, source)
    labels = check_labels(labels)
    if (report or auto) and validation < 1:
        raise EngineError("--report and --auto compare decisions on validation images; give --validation N > 0")
    n_val = min(validation, len(pool) // 2)
    if validation > 0 and n_val < 1:
        raise EngineError(f"{source} has {len(pool)} image(s): too few to hold some out for the decision gate; "
                          "add images or pass --validation 0")
    val_ids, cal_ids = dataset.split_images(len(pool), n_val, samples, seed)
    val_images = [pool[i] for i in val_ids]

    fp32_path = resolve_inside(engine_dir, manifest.graphs["unet"].file, "graph unet")
    guard = ExitStack()  # one writer per engine directory; the work folder is removed on any exit
    guard.enter_context(exclusive(engine_dir, "writing"))
    guard.enter_context(disk_errors(engine_dir))
    swap = sensitivity.UnetSwap(engine_dir)
    swap.progress = progress
    work = temp_dir(engine_dir, ".calibrate-")
    try:
        cal = dataset.collect(swap.engine, [pool[i] for i in cal_ids], labels, samples, seed=seed, source=source,
                              image_ids=cal_ids, progress=progress)
        cal.save(work / dataset.CALIBRATION_FILE)
        smoothed = []
        if smoothquant_alpha is not None:  # quantize a smoothed copy: the same function, easier activations
            smoothed = smoothquant.smooth_file(fp32_path, cal, work / "unet.smoothed.onnx", smoothquant_alpha)
            fp32_path = work / "unet.smoothed.onnx"
        layers = quantize.quantizable_layers(onnx.load(str(fp32_path), load_external_data=False))
        keep = quantize.select_float(layers, quantize.DEFAULT_FLOAT if keep_float is None else keep_float)
        ranges = work / "ranges.json"
        with progress_bar(f"quantize ({method})", 1, progress) as advance:
            model = quantize.quantize_unet(fp32_path, cal, method=method, keep_float=keep, ranges_cache=ranges)
            advance()
        rows, steps, gate = [], [], None
        if report:
            rows = sensitivity.layer_sensitivity(swap, fp32_path, cal, val_images[:SENSITIVITY_IMAGES], labels,
                                                 method=method, ranges_cache=ranges, progress=progress)
        if n_val:
            reference = swap.use(None).decisions(val_images, labels)
            gate = sensitivity.decision_gate(swap, model, val_images, labels, reference)
            steps.append((len(keep), gate))
            log.info("%d layers float -> %s", len(keep), gate)
            if not gate.passed and not auto:
                raise EngineError(f"the INT8 UNet fails the decision gate: {gate}; rerun with --auto to keep the most "
                                  "sensitive layers in float")
            if not gate.passed:
                rows = rows or sensitivity.layer_sensitivity(swap, fp32_path, cal, val_images[:SENSITIVITY_IMAGES],
                                                             labels, method=method, ranges_cache=ranges,
                                                             progress=progress)
                keep, model, gate, more = sensitivity.auto_keep_float(
                    swap, fp32_path, cal, val_images, labels, method=method, ranges_cache=ranges, start=keep,
                    ranking=rows, reference=reference)
                steps += more
        gate16 = None
        if gate is not None:  # the TensorRT build's fp16-base variant of the same graph, gated the same way
            gate16 = sensitivity.decision_gate(swap, on_fp16_base(model), val_images, labels, reference)
            log.info("fp16 base -> %s", gate16)
        total = None
        if report:  # the written UNet, measured like a single layer
            images = val_images[:SENSITIVITY_IMAGES]
            want = swap.use(None).scores(images, labels)
            got = swap.use(model).scores(images, labels)
            total = sensitivity.LayerSensitivity("unet.int8", *sensitivity.score_error(got, want))
        result = _install(engine_dir, manifest, work, model, cal, method=method, keep=keep, gate=gate, gate16=gate16,
                          auto=auto,
                          smoothquant={"alpha": smoothquant_alpha, "norms": smoothed} if smoothed else None)
    finally:
        swap.close()
        shutil.rmtree(work, ignore_errors=True)
        guard.close()
    return CalibrationResult(engine_dir, manifest.graphs[INT8_GRAPH], result, keep, quantize.quantized_layers(model),
                             gate, rows, steps, total)


def _install(engine_dir: Path, manifest: Manifest, work: Path, model, cal, *, method, keep, gate, gate16, auto,
             smoothquant: dict | None) -> CalibrationRecord:
    """Move the calibration set and the INT8 graph into the engine directory and record them."""
    from diffscore.calibration.dataset import CALIBRATION_FILE
    from diffscore.engine.eps_graph import eps_graph
    from diffscore.engine.graph_contract import EPS
    from diffscore.export.eps_graph import prune_to
    from diffscore.export.onnx_export import save_graph

    unet = manifest.graphs["unet"]
    spec = save_graph(model, work, INT8_FILE, unet.inputs, unet.outputs, precision="int8")
    eps_key = eps_graph("int8")  # the ε̂-only cut of the same graph: the same ε̂, the gate's decisions
    eps_spec = save_graph(prune_to(model, [EPS]), work, f"{eps_key}.onnx", unet.inputs,
                          [t for t in unet.outputs if t.name == EPS], precision="int8")
    for file in spec.files + eps_spec.files:
        (work / file).replace(engine_dir / file)
    (work / CALIBRATION_FILE).replace(engine_dir / CALIBRATION_FILE)
    for key, plan in list(manifest.plans.items()):  # plans built from an older INT8 graph are stale now
        if plan.graph in (INT8_GRAPH, eps_key):
            resolve_inside(engine_dir, plan.file, f"plan {key}", must_exist=False).unlink(missing_ok=True)
            del manifest.plans[key]
    path = engine_dir / CALIBRATION_FILE
    record = CalibrationRecord(
        file=CALIBRATION_FILE, sha256=sha256_files([path]), size=path.stat().st_size, samples=len(cal), method=method,
        **{k: cal.meta[k] for k in ("seed", "source", "labels", "template", "stages", "dsd_steps")},
        graph=INT8_GRAPH, float_layers=list(keep), auto=auto, smoothquant=smoothquant,
        gate=None if gate is None else {"agreement": gate.measured, "images": gate.images, "min_agreement": gate.bound,
                                        **fp16_base_record(gate16)},
    )
    manifest.graphs[INT8_GRAPH] = spec
    manifest.graphs[eps_key] = eps_spec
    manifest.calibration = record
    manifest.save(engine_dir)
    log.info("wrote %s and %s (%d layers float)", INT8_FILE, CALIBRATION_FILE, len(keep))
    return record


def fp16_base_record(gate16) -> dict:
    """The gate of the fp16-base variant TensorRT builds INT8 plans from (export.fp16.on_fp16_base), if it ran."""
    return {} if gate16 is None else {"fp16_base_agreement": gate16.measured, "fp16_base_passed": bool(gate16.passed)}
