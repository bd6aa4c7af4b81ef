"""INT8 Q/DQ UNet from a calibration set: ONNX Runtime's static quantizer, TensorRT-compatible settings.

One file serves ONNX Runtime (CPU here) and a strongly typed TensorRT INT8 build, so the settings are
the ones TensorRT's explicit quantization accepts: QuantizeLinear/DequantizeLinear pairs (QDQ format),
int8 with zero point 0 for activations (symmetric) and per-output-channel symmetric int8 weights.

What is quantized: the layers with weights — Conv, Gemm and MatMul with a constant B (the linear layers).
The attention matmuls (Q·Kᵀ and the product with V, two activations) stay float, as in TensorRT's own
Stable Diffusion INT8 recipe: their pre-softmax logits *are* DSD's attention score. Norms, softmax,
residual adds and activations are never quantized. A layer is a diffusers module: the node name minus
its op (`/unet/down_blocks.0/resnets.0/conv1/Conv` -> `down_blocks.0.resnets.0.conv1`).
"""

from __future__ import annotations

import inspect
import io
import logging
import shutil
import tempfile
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from diffscore.engine.manifest_checks import CALIBRATION_METHODS as CALIBRATION_METHODS_NAMED
from diffscore.errors import EngineError

log = logging.getLogger("diffscore")

METHODS = CALIBRATION_METHODS_NAMED  # minmax | entropy | percentile (engine.manifest_checks owns the names)
CALIBRATION_METHODS = dict(zip(METHODS, (CalibrationMethod.MinMax, CalibrationMethod.Entropy,
                                         CalibrationMethod.Percentile)))
QUANT_OPS = ("Conv", "Gemm", "MatMul")
# Layers kept float unless told otherwise (substrings of layer names): the ones known to be fragile.
# The time embedding turns t ∈ [0, 1000) into sin/cos features whose small differences matter; conv_in
# reads x_t and conv_out writes ε̂, which the score compares with ε directly; shortcut convs add into the
# residual stream unnormalised. Measured on the demo UNet (`calibrate --demo --report`, each layer int8
# alone, score change / decision margin): conv_out 0.028 and conv_in 0.024 rank 3rd and 5th of 119
# layers (median 0.005); shortcut convs 0.007-0.020, time embedding 0.008. The most sensitive there are
# the attention blocks' proj_out (0.055, 0.048): keep them too with --keep-float if a model needs it.
DEFAULT_FLOAT = ("time_embedding", "conv_in", "conv_out", "conv_shortcut")
CALIB_BATCH = 32


def layer_of(node_name: str) -> str:
    """`/unet/down_blocks.0/resnets.0/conv1/Conv` -> `down_blocks.0.resnets.0.conv1`."""
    parts = [p for p in node_name.split("/") if p]
    if parts and parts[0] == "unet":
        parts = parts[1:]
    return ".".join(parts[:-1]) or node_name


def quantizable_layers(model: onnx.ModelProto) -> dict[str, list[str]]:
    """{layer: node names} for every weight layer the quantizer may touch, in graph order."""
    weights = {t.name for t in model.graph.initializer}
    layers: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type not in QUANT_OPS:
            continue
        if node.op_type == "MatMul" and node.input[1] not in weights:
            continue  # an attention matmul: two activations
        layers.setdefault(layer_of(node.name), []).append(node.name)
    return layers


def select_float(layers, patterns=DEFAULT_FLOAT) -> list[str]:
    """The layers whose name contains one of `patterns`."""
    return [name for name in layers if any(p in name for p in patterns)]


class _Reader(CalibrationDataReader):
    """onnxruntime's calibration data reader over a CalibrationSet, in batches."""

    def __init__(self, calibration_set, batch_size: int = CALIB_BATCH):
        self.calibration_set, self.batch_size = calibration_set, batch_size
        self._feeds = iter(calibration_set.feeds(batch_size))

    def get_next(self):
        return next(self._feeds, None)

    def __len__(self):
        return -(-len(self.calibration_set) // self.batch_size)


def quantize_unet(fp32_path: Path, calibration_set, *, method: str = "minmax", keep_float=None,
                  ranges_cache: Path | None = None) -> onnx.ModelProto:
    """The fp32 UNet with every quantizable layer but `keep_float` (layer names) in int8 Q/DQ.

    ranges_cache: a JSON file of calibrated tensor ranges; the first call writes it and later calls with
    other `keep_float` sets reuse it, so trying many layer sets costs one calibration pass.
    """
    if method not in METHODS:
        raise EngineError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    model = onnx.load(str(fp32_path), load_external_data=False)  # the structure is enough here
    layers = quantizable_layers(model)
    keep_float = list(select_float(layers) if keep_float is None else keep_float)
    unknown = sorted(set(keep_float) - set(layers))
    if unknown:
        raise EngineError(f"layers {unknown} are not quantizable layers of {fp32_path.name}")
    quantized = {n for layer, nodes in layers.items() if layer not in keep_float for n in nodes}
    exclude = [n.name for n in model.graph.node if n.op_type in QUANT_OPS and n.name not in quantized]
    kwargs = {}
    if ranges_cache is not None and "calibration_cache_path" in inspect.signature(quantize_static).parameters:
        kwargs["calibration_cache_path"] = ranges_cache
    large = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    tmp = Path(tempfile.mkdtemp(prefix="diffscore-int8-"))
    try:
        with _quiet_quantizer():
            quantize_static(
                str(fp32_path), str(tmp / "unet.int8.onnx"), _Reader(calibration_set),
                quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANT_OPS), per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                calibrate_method=CALIBRATION_METHODS[method],
                extra_options={
                    "ActivationSymmetric": True,  # zero point 0: what TensorRT requires
                    "WeightSymmetric": True,
                    "CalibTensorRangeSymmetric": method != "minmax",  # histograms of |x|
                    "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # B is (in, out): one scale per output
                    "QuantizeBias": False,  # TensorRT rejects int32 DequantizeLinear; it adds biases in float
                },
                use_external_data_format=large,
                **kwargs,
            )
        return onnx.load(str(tmp / "unet.int8.onnx"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def quantized_layers(model: onnx.ModelProto) -> list[str]:
    """Layers of a Q/DQ graph whose weights are int8 (fed by a DequantizeLinear of an initializer)."""
    weights = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    dq_of_weight = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights}
    return list(dict.fromkeys(layer_of(n.name) for n in model.graph.node
                              if n.op_type in QUANT_OPS and any(i in dq_of_weight for i in n.input[1:2])))


@contextmanager
def _quiet_quantizer():
    """onnxruntime.quantization prints progress to stdout and logs advice ("consider pre-processing") on
    the root logger: keep stdout for the CLI's results and log the prints at debug level."""
    root = logging.getLogger()
    printed = io.StringIO()

    def drop(record):
        return "pre-process" not in record.getMessage()

    root.addFilter(drop)
    for handler in root.handlers:
        handler.addFilter(drop)
    try:
        with redirect_stdout(printed):
            yield
    finally:
        if printed.getvalue().strip():
            log.debug("onnxruntime.quantization: %s", " | ".join(printed.getvalue().split("\n")))
        root.removeFilter(drop)
        for handler in root.handlers:
            handler.removeFilter(drop)
