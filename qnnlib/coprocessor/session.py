"""``qnnlib.coprocessor.InferenceSession``: onnxruntime's interface, integer layers on the coprocessor.

The model's integer layers run in numpy integer kernels, as a coprocessor in an SoC would run
them, and the rest on onnxruntime's CPU provider.

Like an execution provider it has two steps:

* **capability**: every node whose op has a kernel (:data:`qnnlib.coprocessor.ops.KERNELS`) and
  whose weights, scales and zero points are constants is claimed. The nodes, in the model's
  topological order, are cut into *segments* of consecutive claimed or unclaimed nodes; segments
  run one after another, so no cycle between them can form.
* **compile**: each claimed segment becomes a list of kernels with their constants bound; each
  unclaimed segment becomes an onnxruntime CPU session on the sub-model of its nodes (its inputs:
  what it reads from earlier segments or the graph inputs, also from inside an If, Loop or Scan
  body; its outputs: what later segments or the graph outputs read).

A QDQ model is first rewritten into integer operators (:func:`qnnlib.emit.integer.to_integer`);
an integer model is taken as it is. :meth:`InferenceSession.placement` lists where each node ran.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from qnnlib.coprocessor import jit as compiled_loops
from qnnlib.coprocessor import lookup
from qnnlib.coprocessor.ops import KERNELS, Compiled, refusal
from qnnlib.coprocessor.policy import POLICIES
from qnnlib.emit.integer import MOVES, to_integer
from qnnlib.errors import ConfigError, InputError, UnsupportedModelError
from qnnlib.graph.index import GraphIndex, declared_dims, node_reads
from qnnlib.graph.model_io import ModelLike, load_model, make_session

log = logging.getLogger(__name__)

#: What :meth:`InferenceSession.placement` names the two places.
COPROCESSOR = "coprocessor"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class NodeArg:
    """An input or output as onnxruntime's ``NodeArg`` describes it: name, type string, shape."""

    name: str
    type: str
    shape: list[int | str | None]


@dataclass
class _Segment:
    place: str
    nodes: list[onnx.NodeProto]
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    session: Any = None
    kernels: list[tuple[onnx.NodeProto, Compiled]] = field(default_factory=list)


class InferenceSession:
    """Run ``model`` with its integer layers on the coprocessor stand-in (module docstring).

    ``policy``: ``"ort-exact"`` (every integer equals onnxruntime's), ``"q31"`` or ``"pot"``
    (:mod:`qnnlib.coprocessor.policy`). ``jit``: run the hottest kernels as compiled loops
    (:mod:`qnnlib.coprocessor.jit`; the ``fast`` extra, numba); None uses them when numba is
    installed. The outputs are the same either way.
    """

    def __init__(self, model: ModelLike, policy: str = "ort-exact", *, jit: bool | None = None) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"policy must be one of {POLICIES}, got {policy!r}")
        if jit and not compiled_loops.available():
            raise ConfigError("jit=True needs numba, which is not installed: pip install 'qnnlib[fast]', "
                              "or pass jit=None to use numpy kernels when it is missing")
        self.policy = policy
        self.jit = compiled_loops.available() if jit is None else jit
        proto, self._tables = lookup.fuse(to_integer(load_model(model)).model)
        self._model = proto
        index = GraphIndex(proto)
        self._constants = {t.name: index.constant(t.name) for t in proto.graph.initializer}
        self._types, self._shapes = _tensor_types(proto, index)
        self._refusals = {_name(n): refusal(n, _attributes(n), self._constants, self._types) for n in index.nodes}
        _keep_qdq_units_together(index, self._refusals)
        if index.nodes and all(self._refusals.values()):
            reasons = "; ".join(f"{name}: {why}" for name, why in list(self._refusals.items())[:8])
            raise UnsupportedModelError(
                f"the coprocessor can run none of the model's {len(index.nodes)} nodes ({reasons}"
                f"{'; ...' if len(index.nodes) > 8 else ''}). It runs quantized layers: quantize the model with "
                "qnnlib.quantize first, or run it in onnxruntime.InferenceSession")
        self._segments = _segments(index, self._refusals)
        produced_later: set[str] = {o.name for o in proto.graph.output}
        for segment in reversed(self._segments):
            made = {o for n in segment.nodes for o in n.output if o}
            read = [t for n in segment.nodes for t in node_reads(n) if t not in made and t not in self._constants]
            segment.outputs = sorted(made & produced_later)
            segment.inputs = list(dict.fromkeys(read))
            produced_later |= set(segment.inputs)
        with compiled_loops.enabled(self.jit):
            self._compile_segments()
        self._inputs = [_arg(v) for v in proto.graph.input if v.name not in self._constants]
        self._outputs = [_arg(v) for v in proto.graph.output]

    def _compile_segments(self) -> None:
        """An onnxruntime CPU session per unclaimed segment; each claimed node's kernel, with its constants bound."""
        for segment in self._segments:
            if segment.place == CPU:
                # one thread: a pool spinning after each short run would take the cores from the coprocessor's GEMMs
                segment.session = make_session(self._sub_model(segment), threads=1,
                                               log_errors_as="CPU part of the model")
            else:  # compile: each node's kernel with its constants bound, once
                segment.kernels = [(n, self._compile(n)) for n in segment.nodes]

    def _compile(self, node: onnx.NodeProto) -> Compiled:
        return KERNELS[node.op_type](_attributes(node), [self._constants.get(t) if t else None for t in node.input],
                                     self.policy)

    def _sub_model(self, segment: _Segment) -> onnx.ModelProto:
        needed = {t for n in segment.nodes for t in node_reads(n)}
        graph = helper.make_graph(
            segment.nodes, "segment",
            [self._value_info(t) for t in segment.inputs], [self._value_info(t) for t in segment.outputs],
            [t for t in self._model.graph.initializer if t.name in needed])
        sub = helper.make_model(graph, opset_imports=list(self._model.opset_import))
        sub.ir_version = self._model.ir_version
        return sub

    def _value_info(self, tensor: str) -> onnx.ValueInfoProto:
        # with the shape inferred on the whole model, so that onnxruntime plans the part as it would the whole
        return helper.make_tensor_value_info(tensor, self.tensor_type(tensor), self._shapes.get(tensor))

    def get_inputs(self) -> list[NodeArg]:
        """The model's inputs."""
        return list(self._inputs)

    def get_outputs(self) -> list[NodeArg]:
        """The model's outputs."""
        return list(self._outputs)

    def placement(self) -> dict[str, str]:
        """Each node (by name, else its first output) and where it runs: ``"coprocessor"`` or the CPU provider.

        The nodes of a chain run as one lookup table (:meth:`lookup_tables`) are listed one by one.
        """
        return {member: s.place for s in self._segments for n in s.nodes
                for member in self._tables.get(_name(n), (_name(n),))}

    def coprocessor_outputs(self) -> list[str]:
        """The tensors the coprocessor computes, in graph order: what :meth:`run` can fetch besides the outputs.

        A lookup table's inner float tensors are not among them: it computes only its 8-bit output.
        """
        return [o for s in self._segments if s.place == COPROCESSOR for n in s.nodes for o in n.output if o]

    def lookup_tables(self) -> dict[str, tuple[str, ...]]:
        """Each lookup table the compile step made and the nodes it replaced (:mod:`qnnlib.coprocessor.lookup`).

        Only the last node's output (the 8-bit one) exists at run time.
        """
        return dict(self._tables)

    def fallbacks(self) -> dict[str, str]:
        """Each node that runs on the CPU provider (by name, else its first output) and why the coprocessor cannot."""
        return {name: why for name, why in self._refusals.items() if why}

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any],
            run_options: Any = None) -> list[np.ndarray]:
        """``onnxruntime.InferenceSession.run``: the outputs named (all when None) for ``input_feed``."""
        names = [o.name for o in self._outputs] if output_names is None else list(output_names)
        missing = [i.name for i in self._inputs if i.name not in input_feed]
        if missing:
            raise InputError(f"missing inputs {missing}; the model takes {[i.name for i in self._inputs]}")
        values: dict[str, Any] = {k: np.asarray(v) for k, v in input_feed.items()}
        for segment in self._segments:
            if segment.place == CPU:
                got = segment.session.run(segment.outputs, {t: values[t] for t in segment.inputs}, run_options)
                values.update(zip(segment.outputs, got, strict=True))
                continue
            self._run_kernels(segment, values)
        unknown = [n for n in names if n not in values]
        if unknown:
            raise InputError(f"unknown outputs {unknown}; the model gives {[o.name for o in self._outputs]}, and "
                             "coprocessor_outputs() lists the intermediate tensors it can fetch")
        return [values[n] for n in names]

    def _run_kernels(self, segment: _Segment, values: dict[str, Any]) -> None:
        """Run a claimed segment's kernels in order, reading and adding to ``values``."""
        for node, compiled in segment.kernels:
            args = [None if not t else self._constants.get(t, values.get(t)) for t in node.input]
            values.update(zip(node.output, compiled(args), strict=True))

    def segments(self) -> list[Segment]:
        """The segments in run order: where each runs, its nodes, what it reads and what it hands on."""
        return [Segment(s.place, tuple(s.nodes), tuple(s.inputs), tuple(s.outputs)) for s in self._segments]

    def run_segment(self, position: int, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run claimed segment ``position`` of :meth:`segments` on its inputs (in order); its outputs, in order."""
        segment = self._segments[position]
        if segment.place != COPROCESSOR:
            raise InputError(f"segment {position} runs on {segment.place}, not on the coprocessor")
        values = dict(zip(segment.inputs, inputs, strict=True))
        self._run_kernels(segment, values)
        return [values[t] for t in segment.outputs]

    def tensor_type(self, tensor: str) -> int:
        """The ONNX element type of a tensor crossing segments (float when it is not known)."""
        return self._types.get(tensor, onnx.TensorProto.FLOAT)

    @property
    def model(self) -> onnx.ModelProto:
        """The model the segments were cut from: integer operators, chains fused into lookup tables."""
        return self._model


@dataclass(frozen=True)
class Segment:
    """A run of consecutive nodes in one place (:meth:`InferenceSession.segments`)."""

    place: str
    nodes: tuple[onnx.NodeProto, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def _segments(index: GraphIndex, refusals: Mapping[str, str | None]) -> list[_Segment]:
    segments: list[_Segment] = []
    for node in index.nodes:
        place = CPU if refusals[_name(node)] else COPROCESSOR
        if not segments or segments[-1].place != place:
            segments.append(_Segment(place, []))
        segments[-1].nodes.append(node)
    return segments


def _keep_qdq_units_together(index: GraphIndex, refusals: dict[str, str | None]) -> None:
    """Send the DequantizeLinear nodes feeding a CPU node, and the QuantizeLinear nodes it feeds, to the CPU too.

    onnxruntime fuses ``DequantizeLinear -> op -> QuantizeLinear`` into one integer kernel (a
    QLinearSoftmax, say); split across the border, its float op would run alone and round otherwise.
    """
    for node in index.nodes:
        if not refusals[_name(node)] or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for tensor in node.input:
            producer = index.producer(tensor) if tensor else None
            if producer is not None and producer.op_type == "DequantizeLinear" and not refusals[_name(producer)]:
                refusals[_name(producer)] = f"feeds {_name(node)}, which runs on the CPU provider"
        for tensor in node.output:
            for consumer in index.consumers(tensor):
                if consumer.op_type == "QuantizeLinear" and not refusals[_name(consumer)]:
                    refusals[_name(consumer)] = f"quantizes the output of {_name(node)}, which runs on the CPU provider"


def _name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _tensor_types(model: onnx.ModelProto,
                  index: GraphIndex) -> tuple[dict[str, int], dict[str, list[int | str | None]]]:
    """Element types of the tensors crossing segments: declared or inferred, else an input's that shares it.

    Also the shapes declared or inferred, where known.
    """
    types: dict[str, int] = {}
    shapes: dict[str, list[int | str | None]] = {}
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    for v in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
        if v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
        if v.type.tensor_type.HasField("shape"):
            shapes[v.name] = _arg(v).shape
    for node in index.nodes:  # the input whose element type the output has: a zero point, a lookup table
        typed = {"QLinearConv": 7, "QLinearMatMul": 7, "QGemm": 8, "QLinearAdd": 7, "QLinearMul": 7,
                 "QLinearGlobalAveragePool": 4, "QLinearAveragePool": 4, "QuantizeLinear": 2,
                 "QLinearConcat": 1, lookup.OP_TYPE: 1}.get(node.op_type)
        if typed is not None and len(node.input) > typed and node.input[typed] and \
                index.is_constant(node.input[typed]):
            dtype = index.constant(node.input[typed]).dtype
            types.setdefault(node.output[0], int(helper.np_dtype_to_tensor_dtype(dtype)))
    for node in index.nodes:  # ops that move values keep their input's type
        if node.output and node.output[0] not in types and node.input and node.input[0] in types and \
                node.op_type in MOVES:
            types[node.output[0]] = types[node.input[0]]
    return types, shapes


def _arg(value: onnx.ValueInfoProto) -> NodeArg:
    tensor = value.type.tensor_type
    name = onnx.TensorProto.DataType.Name(tensor.elem_type).lower() if tensor.elem_type else "float"
    dims = list(declared_dims(tensor))
    return NodeArg(value.name, f"tensor({name})", dims)
