"""Lookup tables: ``DequantizeLinear -> elementwise float ops -> QuantizeLinear`` as one 8-bit table.

A chain that reads one 8-bit tensor, applies only elementwise float ops (HardSwish, Sigmoid,
x * sigmoid(x), Clip, ...) with scalar constants, and quantizes the result to 8 bits is a
function of 256 possible inputs. The compile step evaluates it once on every input value, with
onnxruntime's CPU provider on the chain's own nodes (so its float rounding, and any fusion such as
QLinearSigmoid, is onnxruntime's), and the coprocessor then runs it as one table lookup, the way
NPUs run activations.

:func:`fuse` replaces each chain by one node of :data:`DOMAIN` ``LookupTable`` whose second input
is the 256-entry table; the names of the nodes it replaced are kept for the placement listing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qnnlib.coprocessor.pointwise import EIGHT_BIT, Arrays, Compiled, first, table_indexer
from qnnlib.graph.edit import ensure_opset, replace_nodes
from qnnlib.graph.index import GraphIndex
from qnnlib.graph.model_io import make_session

#: The domain and op type of a fused lookup node (only the coprocessor runs it).
DOMAIN, OP_TYPE = "qnnlib.coprocessor", "LookupTable"
#: Float ops computed element by element (their other inputs, if any, scalar constants or chain tensors).
ELEMENTWISE = frozenset({
    "Abs", "Add", "Celu", "Clip", "Div", "Elu", "Erf", "Exp", "Gelu", "HardSigmoid", "HardSwish", "Identity",
    "LeakyRelu", "Log", "Max", "Min", "Mish", "Mul", "Neg", "Pow", "Reciprocal", "Relu", "Selu", "Sigmoid",
    "Softplus", "Softsign", "Sqrt", "Sub", "Tanh", "ThresholdedRelu",
})


@dataclass(frozen=True)
class Chain:
    """One ``DequantizeLinear -> ops -> QuantizeLinear`` chain, its nodes in graph order."""

    dequantize: onnx.NodeProto
    ops: tuple[onnx.NodeProto, ...]
    quantize: onnx.NodeProto

    @property
    def nodes(self) -> tuple[onnx.NodeProto, ...]:
        """The chain's nodes: the DequantizeLinear, the ops, the QuantizeLinear."""
        return (self.dequantize, *self.ops, self.quantize)


def find_chains(index: GraphIndex) -> list[Chain]:
    """Every chain that a table can replace (module docstring), walking back from each QuantizeLinear."""
    chains = []
    for node in index.nodes:
        if node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx"):
            chain = _chain_ending_at(index, node)
            if chain is not None:
                chains.append(chain)
    return chains


def _per_tensor_8bit(index: GraphIndex, node: onnx.NodeProto) -> bool:
    if len(node.input) < 3 or not all(index.is_constant(t) for t in node.input[1:3]):
        return False
    scale, zero = index.constant(node.input[1]), index.constant(node.input[2])
    return scale.size == 1 and zero.size == 1 and zero.dtype in EIGHT_BIT and "block_size" not in {
        a.name for a in node.attribute}


def _chain_ending_at(index: GraphIndex, quantize: onnx.NodeProto) -> Chain | None:
    found = _elementwise_cone(index, quantize.input[0]) if _per_tensor_8bit(index, quantize) else None
    if found is None:
        return None
    dequantize, ops = found
    members = {id(n) for n in ops} | {id(quantize)}
    inner = [dequantize.output[0], *[n.output[0] for n in ops]]
    if any(index.is_graph_output(t) or index.read_in_subgraph(t) or
           any(id(c) not in members for c in index.consumers(t)) for t in inner):
        return None  # an intermediate float tensor is read outside the chain
    return Chain(dequantize, tuple(sorted(ops, key=index.position)), quantize)


def _elementwise_cone(index: GraphIndex, tensor: str) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
    """The elementwise nodes ``tensor`` is computed by and the one 8-bit DequantizeLinear they all start from."""
    ops: dict[int, onnx.NodeProto] = {}
    dequantizers: dict[int, onnx.NodeProto] = {}
    pending = [tensor]
    while pending:
        producer = index.producer(pending.pop())
        if producer is not None and producer.op_type == "DequantizeLinear":
            dequantizers[id(producer)] = producer
            continue
        if not _elementwise(index, producer):
            return None
        assert producer is not None
        if id(producer) not in ops:
            ops[id(producer)] = producer
            pending.extend(t for t in producer.input if t and not index.is_constant(t))
    if len(dequantizers) != 1 or not ops:
        return None
    dequantize = next(iter(dequantizers.values()))
    return (dequantize, list(ops.values())) if _per_tensor_8bit(index, dequantize) else None


def _elementwise(index: GraphIndex, node: onnx.NodeProto | None) -> bool:
    """An elementwise float op whose constant inputs are scalars."""
    return (node is not None and node.op_type in ELEMENTWISE and node.domain in ("", "ai.onnx")
            and len(node.output) == 1
            and all(index.constant(t).size == 1 for t in node.input if t and index.is_constant(t)))


def table(index: GraphIndex, chain: Chain) -> np.ndarray:
    """The chain's output for every value of its 8-bit input, computed by onnxruntime on the chain's nodes."""
    model = index.model
    in_dtype = index.constant(chain.dequantize.input[2]).dtype
    info = np.iinfo(in_dtype)
    values = np.arange(info.min, info.max + 1).astype(in_dtype)
    needed = {t for n in chain.nodes for t in n.input if t and index.is_constant(t)}
    source = chain.dequantize.input[0]
    graph = helper.make_graph(
        list(chain.nodes), "lookup",
        [helper.make_tensor_value_info(source, helper.np_dtype_to_tensor_dtype(in_dtype), [len(values)])],
        [helper.make_tensor_value_info(chain.quantize.output[0], helper.np_dtype_to_tensor_dtype(
            index.constant(chain.quantize.input[2]).dtype), [len(values)])],
        [numpy_helper.from_array(index.constant(t), t) for t in sorted(needed)])
    sub = helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    out = make_session(sub, threads=1, log_errors_as="lookup-table chain").run(None, {source: values})[0]
    return np.asarray(out)


def fuse(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, tuple[str, ...]]]:
    """``model`` with each chain replaced by a ``LookupTable`` node; fused node name -> the names it replaced."""
    index = GraphIndex(model)
    chains = find_chains(index)
    if not chains:
        return model, {}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    replaced: dict[int, onnx.NodeProto | None] = {}
    members: dict[str, tuple[str, ...]] = {}
    for chain in chains:
        name = f"{_name(chain.quantize)}_lookup"
        table_name = f"{name}_table"
        out.graph.initializer.append(numpy_helper.from_array(table(index, chain), table_name))
        fused = helper.make_node(OP_TYPE, [chain.dequantize.input[0], table_name], [chain.quantize.output[0]],
                                 name=name, domain=DOMAIN)
        for node in chain.nodes:
            replaced[id(node)] = None
        replaced[id(chain.quantize)] = fused
        members[name] = tuple(_name(n) for n in chain.nodes)
    kept = [replaced.get(id(n), n) for n in index.nodes]
    replace_nodes(out, (n for n in kept if n is not None))
    ensure_opset(out, DOMAIN)
    return out, members


def _name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def lookup(attrs: dict[str, Any], consts: Arrays, policy: str) -> Compiled:
    """The coprocessor kernel of a ``LookupTable`` node: ``table[x]`` (offset by 128 for int8 inputs)."""
    values = consts[1]
    assert values is not None
    index = table_indexer()
    return lambda ins: [index(values, first(ins))]
