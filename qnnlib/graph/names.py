"""Deterministic, collision-free names for the tensors and nodes qnnlib inserts."""

from __future__ import annotations

import onnx

from qnnlib.graph.index import subgraphs


def _all_names(graph: onnx.GraphProto, into: set[str]) -> None:
    into.update(i.name for i in graph.input)
    into.update(o.name for o in graph.output)
    into.update(t.name for t in graph.initializer)
    into.update(v.name for v in graph.value_info)
    for node in graph.node:
        into.add(node.name)
        into.update(node.input)
        into.update(node.output)
        for sub in subgraphs(node):
            _all_names(sub, into)


class NameAllocator:
    """Hands out names not yet used anywhere in the model (tensors, nodes, initializers).

    ``fresh("conv1_quantized")`` returns the name itself when free, else ``conv1_quantized_1``,
    ``_2``, ...: the same model and the same sequence of requests give the same names.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self._used: set[str] = {""}
        _all_names(model.graph, self._used)

    def fresh(self, base: str) -> str:
        """A new unused name derived from ``base``; it is reserved at once."""
        name = base
        counter = 0
        while name in self._used:
            counter += 1
            name = f"{base}_{counter}"
        self._used.add(name)
        return name

    def reserve(self, name: str) -> None:
        """Mark ``name`` as taken."""
        self._used.add(name)
