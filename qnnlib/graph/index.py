"""Producer/consumer edges of an ONNX graph behind small named helpers.

``producer(t)`` is the node that writes tensor ``t``; ``uses(t)`` the (node, input index) pairs
that read it, in graph order; ``consumers(t)`` those nodes, de-duplicated. Tensors read only
inside subgraphs (If/Loop/Scan bodies) count as used by the node that owns the subgraph.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper


@dataclass(frozen=True)
class Use:
    """One read of a tensor: ``node.input[index]``; index is -1 for a read inside a subgraph."""

    node: onnx.NodeProto
    index: int


def declared_dims(tensor_type: onnx.TypeProto.Tensor) -> tuple[int | str | None, ...]:
    """A tensor type's declared dimensions: an int, a symbolic name, or None where unknown.

    Exporters write unknown dimensions as a name, as nothing, or as a negative number (Paddle's -1);
    the last two both read as None.
    """
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or None)
                 for d in tensor_type.shape.dim)


def subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    """The graphs held in a node's attributes (If branches, Loop and Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def outer_references(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads that it neither defines nor receives as inputs."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    read: set[str] = set()
    for node in graph.node:
        read.update(n for n in node.input if n)
        for sub in subgraphs(node):
            read |= outer_references(sub)
        defined.update(node.output)
    read.update(o.name for o in graph.output)
    return read - defined


def node_reads(node: onnx.NodeProto) -> list[str]:
    """The tensors ``node`` reads: its inputs, then what its subgraphs read from outer scopes (sorted)."""
    inner = sorted({t for sub in subgraphs(node) for t in outer_references(sub)})
    return [t for t in node.input if t] + inner


class GraphIndex:
    """Read-only index over the main graph of a model. Rebuild it after editing the graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.model = model
        self.graph = graph
        self.nodes: tuple[onnx.NodeProto, ...] = tuple(graph.node)
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.graph_inputs: tuple[str, ...] = tuple(
            i.name for i in graph.input if i.name not in self.initializers
        )
        self.graph_outputs: tuple[str, ...] = tuple(o.name for o in graph.output)
        self._output_set = frozenset(self.graph_outputs)
        self._producer: dict[str, onnx.NodeProto] = {}
        self._uses: dict[str, list[Use]] = {}
        self._order = {id(n): i for i, n in enumerate(self.nodes)}
        self._by_name = {n.name: n for n in self.nodes if n.name}
        for node in self.nodes:
            for name in node.output:
                if name:
                    self._producer[name] = node
            for i, name in enumerate(node.input):
                if name:
                    self._uses.setdefault(name, []).append(Use(node, i))
            for sub in subgraphs(node):
                for name in sorted(outer_references(sub)):
                    self._uses.setdefault(name, []).append(Use(node, -1))
        self._types: dict[str, int] = {}
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                self._types[vi.name] = vi.type.tensor_type.elem_type
        for t in graph.initializer:
            self._types[t.name] = t.data_type
        self._shapes: dict[str, tuple[int | str | None, ...]] = {}
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                self._shapes[vi.name] = declared_dims(vi.type.tensor_type)

    # -- edges -------------------------------------------------------------------------------
    def node(self, name: str) -> onnx.NodeProto:
        """The node called ``name`` (names are unique after normalisation)."""
        return self._by_name[name]

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        """The node that writes ``tensor``, or None for graph inputs and initializers."""
        return self._producer.get(tensor)

    def uses(self, tensor: str) -> tuple[Use, ...]:
        """Every read of ``tensor`` by a node of this graph, in graph order."""
        return tuple(self._uses.get(tensor, ()))

    def consumers(self, tensor: str) -> tuple[onnx.NodeProto, ...]:
        """The distinct nodes that read ``tensor``, in graph order."""
        seen: dict[int, onnx.NodeProto] = {}
        for use in self._uses.get(tensor, ()):
            seen.setdefault(id(use.node), use.node)
        return tuple(seen.values())

    def is_graph_output(self, tensor: str) -> bool:
        """Whether ``tensor`` is one of the graph's outputs."""
        return tensor in self._output_set

    def read_in_subgraph(self, tensor: str) -> bool:
        """Whether a subgraph reads ``tensor`` from this graph by name."""
        return any(u.index < 0 for u in self._uses.get(tensor, ()))

    def position(self, node: onnx.NodeProto) -> int:
        """The node's index in graph order."""
        return self._order[id(node)]

    # -- values ------------------------------------------------------------------------------
    def is_constant(self, tensor: str) -> bool:
        """Whether ``tensor`` is an initializer (a weight, bias or other constant)."""
        return tensor in self.initializers

    def constant(self, tensor: str) -> np.ndarray:
        """The value of an initializer as a numpy array."""
        return numpy_helper.to_array(self.initializers[tensor])

    def elem_type(self, tensor: str) -> int | None:
        """The ONNX element type of ``tensor`` when known."""
        return self._types.get(tensor)

    def shape(self, tensor: str) -> tuple[int | str | None, ...] | None:
        """The static shape of ``tensor`` when known: ints, names of symbolic dims, or None."""
        if tensor in self.initializers:
            return tuple(self.initializers[tensor].dims)
        return self._shapes.get(tensor)

    def is_float(self, tensor: str) -> bool:
        """Whether ``tensor`` holds float32 values (the only type qnnlib quantises)."""
        return self._types.get(tensor) == onnx.TensorProto.FLOAT


def attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of a node attribute (as onnx.helper.get_attribute_value gives it), or ``default``."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def layer_macs(index: GraphIndex, node_name: str, weight_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one weighted layer per sample: its weights times the output positions.

    Conv: ``weights * prod(output spatial dims)``; MatMul and Gemm: ``weights * prod(output dims but
    the last) / batch``; dynamic dims count as 1, and an unknown output shape as one position.
    """
    node = index.node(node_name)
    weights = int(np.prod(weight_shape))
    shape = index.shape(node.output[0]) if node.output else None
    if not shape:
        return weights
    dims = [d if isinstance(d, int) and d > 0 else 1 for d in shape]
    positions = int(np.prod(dims[2:])) if node.op_type == "Conv" else int(np.prod(dims[1:-1]))
    return weights * max(positions, 1)


def model_macs(index: GraphIndex) -> int:
    """Multiply-accumulates per sample of every Conv, MatMul and Gemm with a constant weight (:func:`layer_macs`)."""
    return sum(layer_macs(index, node.name, tuple(int(d) for d in index.initializers[node.input[1]].dims))
               for node in index.nodes
               if node.op_type in ("Conv", "MatMul", "Gemm") and len(node.input) > 1
               and index.is_constant(node.input[1]))
