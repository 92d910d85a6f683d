"""Bypass Identity nodes and inference-mode Dropout."""

from __future__ import annotations

import logging

import onnx

from qnnlib.graph.edit import replace_nodes
from qnnlib.graph.index import GraphIndex

log = logging.getLogger(__name__)


def eliminate_identities(model: onnx.ModelProto) -> list[str]:
    """Bypass Identity nodes and inference-mode Dropout nodes whose mask output is unused.

    Nodes are visited in topological order, so ``rename`` maps every bypassed output straight to the
    first tensor of its chain.
    """
    index = GraphIndex(model)
    outputs = set(index.graph_outputs)
    rename: dict[str, str] = {}
    for node in index.nodes:
        out = node.output[0] if node.output else ""
        if _is_identity(node, index) and out not in outputs and not index.read_in_subgraph(out):
            rename[out] = rename.get(node.input[0], node.input[0])
    if not rename:
        return []
    keep = [n for n in model.graph.node if not (n.output and n.output[0] in rename)]
    for node in keep:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    replace_nodes(model, keep)
    return [f"removed {len(rename)} Identity/Dropout nodes"]


def _is_identity(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """Identity, or Dropout in inference mode whose mask output nobody reads."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Identity":
        return True
    if node.op_type != "Dropout":
        return False
    mask_read = len(node.output) > 1 and bool(node.output[1]) and bool(index.uses(node.output[1]))
    training_input = len(node.input) > 2 and bool(node.input[2])
    return not mask_read and not training_input
