"""SmoothQuant-style scaling (Xiao et al., 2023) of the fp32 UNet before INT8 quantization.

A linear layer's input activations often have a few channels far larger than the rest, and one
per-tensor INT8 scale then wastes most of its range on them. SmoothQuant moves that difficulty into
the weights, which are quantized per output channel anyway: with s_j = max|X_j|^α / max|W_j|^(1-α),
X' = X / s and W' = diag(s)·W give the same product. Here 1/s is folded into the LayerNormalization
that feeds the linear layers (γ/s, β/s), so the smoothed graph adds no op and is the same function in
exact arithmetic (checked to float rounding in the tests).

Why hand-written: ONNX Runtime's `SmoothQuant` quantizer option delegates to Intel Neural Compressor's
ONNX adaptor, which neural-compressor 3.x no longer ships. The transform is small: it only touches a
LayerNormalization whose output goes to MatMuls with constant weights (and Shape ops), e.g. a
transformer block's norm1 -> to_q/to_k/to_v, norm2 -> to_q, norm3 -> the feed-forward projection.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

DEFAULT_ALPHA = 0.5  # the paper's default: split the difficulty evenly between activations and weights


def smoothable_groups(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, list[onnx.NodeProto]]]:
    """(LayerNormalization, the MatMuls it feeds) for every norm whose γ, β are constants and whose output
    goes only to MatMuls with a constant B (and to Shape ops, which do not see the values)."""
    weights = {t.name for t in model.graph.initializer}
    consumers = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    groups = []
    for node in model.graph.node:
        if node.op_type != "LayerNormalization" or len(node.input) < 3 or not set(node.input[1:3]) <= weights:
            continue
        users = consumers[node.output[0]]
        matmuls = [u for u in users if u.op_type == "MatMul" and u.input[0] == node.output[0] and u.input[1] in weights]
        if matmuls and all(u.op_type == "Shape" or u in matmuls for u in users):
            groups.append((node, matmuls))
    return groups


def activation_channel_max(model: onnx.ModelProto, calibration_set, tensors: list[str], batch_size: int = 32) -> dict:
    """max |x| per last-axis channel of each named tensor over the calibration set (fp32 ONNX Runtime)."""
    import onnxruntime as ort

    from diffscore.export.onnx_export import write_onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in tensors)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the probed tensors
    with tempfile.TemporaryDirectory(prefix="diffscore-smooth-") as tmp:  # a file: SD-scale graphs pass 2 GB
        write_onnx(probe, Path(tmp) / "probe.onnx")
        del probe
        session = ort.InferenceSession(str(Path(tmp) / "probe.onnx"), options, providers=["CPUExecutionProvider"])
    found: dict[str, np.ndarray] = {}
    for feed in calibration_set.feeds(batch_size):
        for name, value in zip(tensors, session.run(tensors, feed)):
            m = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            found[name] = m if name not in found else np.maximum(found[name], m)
    return found


def smooth(model: onnx.ModelProto, calibration_set, alpha: float = DEFAULT_ALPHA) -> tuple[onnx.ModelProto, list[str]]:
    """A smoothed copy of `model` (weights loaded) and the names of the norms it rescaled."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"SmoothQuant alpha must be in (0, 1), got {alpha}")
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    model = model_copy
    groups = smoothable_groups(model)
    if not groups:
        return model, []
    amax = activation_channel_max(model, calibration_set, [norm.output[0] for norm, _ in groups])
    init = {t.name: t for t in model.graph.initializer}
    uses = defaultdict(int)
    for node in model.graph.node:
        for name in node.input:
            uses[name] += 1

    def own(node: onnx.NodeProto, index: int) -> onnx.TensorProto:
        """The initializer at node.input[index], copied under a new name if other nodes read it too."""
        tensor = init[node.input[index]]
        if uses[tensor.name] > 1:
            uses[tensor.name] -= 1
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            copy.name = f"{tensor.name}/smoothed/{node.name}"
            model.graph.initializer.append(copy)
            node.input[index] = copy.name
            tensor = init[copy.name] = model.graph.initializer[-1]
        return tensor

    for norm, matmuls in groups:
        w = [numpy_helper.to_array(init[m.input[1]]) for m in matmuls]  # (in, out) each
        wmax = np.max([np.abs(x).max(axis=1) for x in w], axis=0)
        s = np.power(np.maximum(amax[norm.output[0]], 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1 - alpha)
        s = s.astype(np.float32)
        for index in (1, 2):  # γ and β
            tensor = own(norm, index)
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) / s, tensor.name))
        for m, x in zip(matmuls, w):
            tensor = own(m, 1)
            tensor.CopyFrom(numpy_helper.from_array((x * s[:, None]).astype(x.dtype), tensor.name))
    return model, [norm.name for norm, _ in groups]


def smooth_file(fp32_path: Path, calibration_set, out_path: Path, alpha: float = DEFAULT_ALPHA) -> list[str]:
    """Write the smoothed UNet to `out_path` (external data beside it when the weights are large)."""
    from diffscore.export.onnx_export import write_onnx

    model, norms = smooth(onnx.load(str(fp32_path)), calibration_set, alpha)
    write_onnx(model, out_path)
    return norms
