"""The ε̂-only UNet graph: the scoring graph cut down to its `eps` output (issue 27).

The Diffusion Classifier, the race and the cascade read ε̂ only. In the scoring graph every captured
cross-attention layer also feeds its pre-softmax logits to a LogSumExp (the DSD score), and feature taps add
outputs: an extra consumer that keeps TensorRT and ONNX Runtime's attention fusion from firing, and work
nobody reads. The ε̂-only graph is the scoring graph with every output but `eps` dropped and every node that
no longer leads to `eps` removed, so it computes ε̂ with exactly the same nodes (same decisions) and none of
the rest. It is cut from each precision's graph (fp32, fp16, int8), named by `eps_graph(precision)`.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from diffscore.engine.eps_graph import eps_graph
from diffscore.engine.graph_contract import EPS
from diffscore.engine.manifest import GraphSpec


def prune_to(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy of `model` with only `outputs`, without the nodes and initializers they do not need."""
    graph = model.graph
    wanted = set(outputs)
    missing = wanted - {o.name for o in graph.output}
    assert not missing, f"the graph has no outputs {sorted(missing)}"
    producer = {o: i for i, node in enumerate(graph.node) for o in node.output}
    # a walk back from the outputs, not one reverse sweep: converters append nodes out of order (the fp16
    # converter's input Casts come last), which ONNX Runtime accepts and sorts itself
    needed, todo, kept = set(wanted), list(wanted), set()
    while todo:
        i = producer.get(todo.pop())
        if i is None or i in kept:
            continue  # a graph input or an initializer, or a node already taken
        kept.add(i)
        node = graph.node[i]
        reads = [x for x in node.input if x]
        for attr in node.attribute:  # a subgraph (If/Loop) reads outer names too
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                reads += [x for n in sub.node for x in n.input if x]
        todo += [x for x in reads if x not in needed]
        needed.update(reads)
    keep = [graph.node[i] for i in sorted(kept)]  # the original order
    out = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name,
                          producer_version=model.producer_version)  # not CopyFrom: that would copy every weight
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    out.graph.name = graph.name
    out.graph.input.extend(graph.input)
    out.graph.node.extend(keep)
    out.graph.output.extend(o for o in graph.output if o.name in wanted)
    out.graph.initializer.extend(t for t in graph.initializer if t.name in needed)
    out.graph.value_info.extend(v for v in graph.value_info if v.name in needed)
    return out


def write_eps_graph(out_dir: Path, scoring: GraphSpec, precision: str) -> GraphSpec:
    """Cut `scoring` (a UNet graph file in out_dir) to its ε̂ output and save it beside it."""
    from diffscore.export.onnx_export import save_graph

    model = prune_to(onnx.load(str(out_dir / scoring.file)), [EPS])
    key = eps_graph(precision)
    outputs = [t for t in scoring.outputs if t.name == EPS]
    return save_graph(model, out_dir, f"{key}.onnx", scoring.inputs, outputs, precision=scoring.precision)
