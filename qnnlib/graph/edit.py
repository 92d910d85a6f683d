"""Small in-place edits of a model's main graph, shared by the passes and the emitters."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx

from qnnlib.graph.index import GraphIndex


def replace_nodes(model: onnx.ModelProto, nodes: Iterable[onnx.NodeProto]) -> None:
    """Make ``nodes`` (in this order) the graph's node list."""
    nodes = list(nodes)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove initializers that no node (or subgraph) reads and that are not graph outputs."""
    index = GraphIndex(model)
    inits = model.graph.initializer
    unused = [i for i, t in enumerate(inits) if not (index.uses(t.name) or index.is_graph_output(t.name))]
    for i in reversed(unused):  # in place: rebuilding the list would copy every weight that stays
        del inits[i]


def drop_stale_value_info(model: onnx.ModelProto) -> None:
    """Remove value_info entries of tensors no node of the main graph writes any more."""
    written = {name for n in model.graph.node for name in n.output}
    stale = [v for v in model.graph.value_info if v.name not in written]
    for v in stale:
        model.graph.value_info.remove(v)


def ensure_opset(model: onnx.ModelProto, domain: str, version: int = 1) -> None:
    """Import ``domain`` at ``version`` unless the model already imports it."""
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.add(domain=domain, version=version)


def rename_reads(model: onnx.ModelProto, old: str, new: str) -> None:
    """Make every node of the main graph that reads ``old`` read ``new`` instead."""
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def rename_writes(model: onnx.ModelProto, old: str, new: str) -> None:
    """Make the node of the main graph that writes ``old`` write ``new`` instead."""
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new


def add_outputs(graph: onnx.GraphProto, tensors: Sequence[str]) -> None:
    """Make ``graph`` also output ``tensors`` (untyped: onnxruntime infers their types)."""
    present = {o.name for o in graph.output}
    for name in tensors:
        if name not in present:
            graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)


def with_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``tensors`` (onnxruntime infers their types)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    add_outputs(probe.graph, tensors)
    return probe


def only_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are ``tensors`` alone, so that onnxruntime prunes the rest."""
    probe = with_outputs(model, tensors)
    keep = [o for o in probe.graph.output if o.name in set(tensors)]
    del probe.graph.output[:]
    probe.graph.output.extend(keep)
    return probe
