"""FP16 UNet: weights and activations in half precision, inputs/outputs kept fp32 for the runtime.

Uses ONNX Runtime's maintained converter (``onnxruntime.transformers.float16``, the one its Stable
Diffusion pipeline uses): onnxconverter-common's version leaves float ``Cast`` and ``Identity`` nodes
that ONNX Runtime then refuses to load.

What stays fp32, and why (measured by `bench/fp16_ops.py` with `fp16_sensitivity`): on the demo
model's real inputs no candidate overflows; ε̂ error is 1.3-2.2e-3 with or without them, so keeping
them costs nothing measurable. They stay fp32 for Stable-Diffusion-scale models, where one GroupNorm
reduces over 64·64·10 = 40,960 elements and a sum of squares passes fp16's 65,504 unless the
kernel happens to accumulate in fp32. The time embedding stays fp32 because sin/cos of t·freq for
t up to 999 lose most of their digits in half precision (and the converter mis-types its Casts).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from diffscore.engine.manifest import GraphSpec

# Op types kept in fp32. ReduceLogSumExp: the DSD score sums exp(logits) over tokens.
# InstanceNormalization (GroupNorm) and LayerNormalization: variance reductions over many elements.
FP32_OPS = ("InstanceNormalization", "LayerNormalization", "ReduceLogSumExp")
# SDXL's add_time_proj / add_embedding: sin/cos of its size time ids (1024 on SDXL base), as for t.
FP32_NODE_PATTERNS = ("/time_proj/", "/time_embedding/", "/add_time_proj/", "/add_embedding/")


def to_fp16(model: onnx.ModelProto, keep_ops=FP32_OPS) -> onnx.ModelProto:
    from onnxruntime.transformers import float16

    nodes = [n.name for n in model.graph.node if any(p in n.name for p in FP32_NODE_PATTERNS)]
    return float16.convert_float_to_float16(
        model, keep_io_types=True, op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(keep_ops),
        node_block_list=nodes,
    )


def on_fp16_base(model: onnx.ModelProto) -> onnx.ModelProto:
    """An INT8 Q/DQ graph with its float part in fp16, as NVIDIA's demo/Diffusion builds INT8 (issue 27): a strongly
    typed TensorRT plan of the fp32-base graph runs attention, softmax, norms and the layers kept float in
    fp32/TF32; this one runs them in fp16 (with the fp16 graph's exceptions above). DequantizeLinear then carries
    fp16 scales, which needs opset 19. ONNX Runtime's CPU runs it (the decision gate); CPUs keep the fp32-base
    graph, whose Q/DQ pairs ONNX Runtime fuses into integer kernels. `model` is left as it is."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for opset in copy.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 19)
    return to_fp16(copy)


def convert_unet_fp16(engine_dir: Path, unet: GraphSpec) -> GraphSpec:
    """unet.onnx -> unet.fp16.onnx, same inputs/outputs (fp32 at the boundary)."""
    from diffscore.export.onnx_export import save_graph

    model = onnx.load(str(engine_dir / unet.file))
    return save_graph(to_fp16(model), engine_dir, "unet.fp16.onnx", unet.inputs, unet.outputs, precision="fp16")


def fp16_sensitivity(fp32_path: Path, feed: dict[str, np.ndarray], candidates=FP32_OPS) -> dict[str, dict]:
    """Error of the fp16 graph with all of `candidates` in fp32, and with each one of them released.

    Returns {setting: {output: (max relative error, non-finite count)}}: an op whose release
    raises the error or makes NaN/Inf is one that must stay in fp32.
    """
    import onnxruntime as ort

    model = onnx.load(str(fp32_path))
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    names = [o.name for o in model.graph.output]
    ref = run(model)
    report = {}
    settings = {"all kept": candidates,
                **{f"release {op}": tuple(c for c in candidates if c != op) for op in candidates},
                "none kept": ()}
    for label, keep in settings.items():
        out = run(to_fp16(model, keep))
        report[label] = {
            n: (float(np.abs(o.astype(np.float64) - r).max() / max(np.abs(r).max(), 1e-12)),
                int((~np.isfinite(o)).sum()))
            for n, o, r in zip(names, out, ref)
        }
    return report
