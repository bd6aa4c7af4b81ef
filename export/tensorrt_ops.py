"""Which ONNX operators the TensorRT ONNX parser accepts, checked without TensorRT or a GPU.

Export runs on machines without TensorRT, so an operator TensorRT cannot parse would otherwise only
surface later, on the target GPU. The support list is data (`tensorrt_supported_ops.json`,
transcribed from onnx-tensorrt's docs/operators.md), so updating it needs no code change.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import cache
from pathlib import Path

import onnx

OPS_FILE = Path(__file__).with_name("tensorrt_supported_ops.json")
DEFAULT_DOMAINS = ("", "ai.onnx")


@cache
def supported_ops() -> frozenset[str]:
    """Operator types of the default ONNX domain the parser supports (plus any `domain.Op` entries)."""
    return frozenset(json.loads(OPS_FILE.read_text())["supported"])


def unsupported_ops(model: str | Path | onnx.ModelProto) -> dict[str, int]:
    """Operators TensorRT cannot parse in `model`, as {op type: count}; {} means the graph is fine.

    Default-domain ops are keyed by their type ("NonZero"); ops of other domains by "domain.Type"
    ("com.microsoft.FusedMatMul") and count as unsupported unless the list names them that way.
    Subgraphs (If/Loop/Scan bodies) and model-local functions are walked, since the parser inlines them.
    Weights are not loaded: only the graph structure matters.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    functions = {(f.domain, f.name): f for f in model.functions}
    supported = supported_ops()
    counts: Counter[str] = Counter()

    def visit(nodes) -> None:
        for node in nodes:
            if (node.domain, node.op_type) in functions:  # a call of a model-local function
                visit(functions[node.domain, node.op_type].node)
                continue
            name = node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"
            if name not in supported:
                counts[name] += 1
            for attribute in node.attribute:
                subgraphs = [*attribute.graphs, *([attribute.g] if attribute.HasField("g") else [])]
                for graph in subgraphs:
                    visit(graph.node)

    visit(model.graph.node)
    return dict(counts)
