"""Give every node a unique, deterministic name."""

from __future__ import annotations

import logging

import onnx

from qnnlib.graph.names import NameAllocator

log = logging.getLogger(__name__)


def name_nodes(model: onnx.ModelProto) -> list[str]:
    """Give unnamed or duplicate-named nodes the name ``<OpType>_<index>`` (made unique)."""
    names = NameAllocator(model)
    seen: set[str] = set()
    renamed = 0
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = names.fresh(f"{node.op_type}_{i}")
            renamed += 1
        seen.add(node.name)
    return [f"named {renamed} unnamed or duplicate nodes"] if renamed else []
