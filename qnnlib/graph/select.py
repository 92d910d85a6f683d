"""Which nodes are quantised, which tensors get Q/DQ, and which tensors are tied.

The selection reads the rules table (:mod:`qnnlib.graph.rules`) over the graph:

1. Every WEIGHTED, QUANTIZED_IO and TIE_ALL node that is not excluded is a quantised layer; its
   float activation inputs and outputs are quantised tensors.
2. PASS_THROUGH and FOLDABLE_ACTIVATION nodes join when their data input or an output is already
   quantised, repeated until nothing changes: a quantised region grows through them.
3. Ties: Concat ties every input to its output; a pass-through op ties its data input to its
   outputs; a foldable activation ties its input to its output when clipping the input's whole
   tied group changes no other reader's values (:func:`_fold_stays_local`).

The tail stays float: ops after the last Conv, MatMul or Gemm (a classifier's pooling and Softmax,
a detector's box decoding and output Concat) gain nothing from integer kernels and would only add
rounding to the user's outputs. So QUANTIZED_IO, TIE_ALL and PASS_THROUGH nodes from which no
weighted layer can be reached stay float.

A Log's input cone stays float (:func:`log_input_cones`): an audio front end (an STFT or CQT as
Conv, magnitudes, then a Log) spans 80-100 dB, and 8-bit linear steps turn its quiet bins into
zeros whose logarithm is garbage. The cone runs upstream from the Log through every op and stops
after an exponential op (Softmax, Exp, Sigmoid, ...), whose output's relative precision already
comes from its input's absolute precision.

A MatMul or Gemm output is quantised only when a quantised reader needs it: otherwise onnxruntime
runs the layer as MatMulIntegerToFloat or QGemm with a float output, which saves a rounding and a
requantisation. A Conv always quantises its output: onnxruntime has no Conv kernel with integer
inputs and a float output.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from qnnlib.graph.index import GraphIndex
from qnnlib.graph.rules import ALREADY_QUANTISED, Kind, OpRule, data_inputs, data_outputs, rule_for, weight_axis

#: A quantised constant's role: a per-channel weight or an int32 bias.
WEIGHT, BIAS = "weight", "bias"
#: Layers whose integer kernel can write a float output (MatMulIntegerToFloat, QGemm).
FLOAT_OUTPUT_KERNELS = frozenset({"MatMul", "Gemm"})
TAIL_REASON = "after the last weighted layer: kept float, an integer kernel gains nothing there"
#: Ops at which a Log's input cone stops: an additive error at their input is a relative one at their output.
EXPONENTIAL_OPS = frozenset({"Softmax", "Exp", "Sigmoid", "Tanh", "Softplus", "Elu", "Selu"})


@dataclass(frozen=True)
class Tie:
    """Tensors ``a`` and ``b`` share parameters because of ``node`` (an op of type ``op_type``).

    ``covered`` is the one of the two whose values need not be observed: a pass-through op's output
    (its values come from the input), a Concat input (its values are part of the output), or the
    input of a folded activation (the range wanted is the activation's output). A Concat input that
    another node also reads is covered by neither (``covered == ""``): it is observed on its own, and
    if its range is narrow next to its group's the tie is dropped (:func:`qnnlib.graph.tying.narrow_ties`).
    """

    a: str
    b: str
    node: str
    op_type: str
    covered: str


@dataclass(frozen=True)
class WeightSlot:
    """A constant input of a weighted layer that is quantised as a weight or a bias."""

    node: str
    input_index: int
    tensor: str
    kind: str
    axis: int | None


@dataclass(frozen=True)
class Selection:
    """The outcome of selection, all in graph order."""

    layers: tuple[str, ...]
    activations: tuple[str, ...]
    ties: tuple[Tie, ...]
    weights: tuple[WeightSlot, ...]
    foldable: tuple[str, ...]
    float_nodes: tuple[tuple[str, str], ...] = ()
    excluded: tuple[str, ...] = ()
    _layer_set: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_layer_set", frozenset(self.layers))

    @property
    def already_quantised(self) -> tuple[str, ...]:
        """Nodes left as they are because they belong to the model's own quantisation, or read its DQs."""
        return tuple(n for n, why in self.float_nodes if why.startswith(ALREADY_QUANTISED))

    def is_layer(self, node: str) -> bool:
        """Whether ``node`` runs quantised."""
        return node in self._layer_set

    def observed(self, index: GraphIndex) -> tuple[str, ...]:
        """Quantised activations whose values calibration must see: no constant, no covered tie member.

        A group's range is the union of its observed members' ranges, which contains every member's.
        """
        covered = {t.covered for t in self.ties}
        return tuple(t for t in self.activations if t not in covered and not index.is_constant(t))

    def constants(self, index: GraphIndex) -> dict[str, np.ndarray]:
        """Quantised constants (an Add's constant operand, an embedding table) and their values."""
        return {t: index.constant(t) for t in self.activations if index.is_constant(t)}


def match_excluded(index: GraphIndex, names: Iterable[str], op_types: Iterable[str]) -> tuple[set[str], list[str]]:
    """Node names matched by exact names or glob patterns and by op types; and patterns matching nothing."""
    node_names = [n.name for n in index.nodes]
    out: set[str] = set()
    unmatched: list[str] = []
    for pattern in names:
        hits = [n for n in node_names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            unmatched.append(pattern)
        out.update(hits)
    wanted_types = set(op_types)
    out.update(n.name for n in index.nodes if n.op_type in wanted_types)
    return out, unmatched


class _Region:
    """What selection has decided so far; :func:`select` fills it in two passes."""

    def __init__(self, index: GraphIndex, excluded: set[str] | frozenset[str], per_channel: bool) -> None:
        self.index = index
        self.excluded = excluded
        self.per_channel = per_channel
        self.tail = tail_nodes(index, excluded)
        self.quantised: dict[str, None] = {}
        self.layers: dict[str, None] = {}
        self.ties: list[Tie] = []
        self.weights: list[WeightSlot] = []
        self.float_nodes: list[tuple[str, str]] = []
        self.foldable: list[str] = []

    def is_activation(self, name: str) -> bool:
        return bool(name) and self.index.is_float(name)

    def add_layer(self, node: onnx.NodeProto, rule: OpRule) -> str:
        """Quantise a WEIGHTED, QUANTIZED_IO or TIE_ALL node; the reason it stays float otherwise."""
        inputs = data_inputs(node, rule)
        outputs = data_outputs(node, rule)
        if not outputs or not all(self.is_activation(o) for o in outputs):
            return "its output is not float32"
        if rule.kind is not Kind.WEIGHTED and node.name in self.tail:
            return TAIL_REASON
        if node.op_type in FLOAT_OUTPUT_KERNELS:  # quantised only if a quantised reader asks for it
            outputs = [o for o in outputs if _bias_add_follows(self.index, o)]
        slots = _weight_slots(node, rule, self.index, self.per_channel)
        slot_inputs = {s.input_index for s in slots}
        act_inputs = [t for i, t in inputs if i not in slot_inputs]
        if not all(self.is_activation(t) for t in act_inputs):
            return "an input is not float32"
        self.layers[node.name] = None
        self.weights.extend(slots)
        self.quantised.update(dict.fromkeys(act_inputs + outputs))
        if rule.kind is Kind.TIE_ALL:
            self.ties.extend(Tie(t, outputs[0], node.name, node.op_type,
                                 covered="" if self.read_elsewhere(t, node) else t) for t in act_inputs)
        return ""

    def read_elsewhere(self, tensor: str, node: onnx.NodeProto) -> bool:
        """Whether a node other than ``node`` reads ``tensor``, or it is a graph output."""
        return self.index.is_graph_output(tensor) or any(c.name != node.name for c in self.index.consumers(tensor))

    def can_grow(self, node: onnx.NodeProto, rule: OpRule) -> bool:
        """Whether a PASS_THROUGH or FOLDABLE_ACTIVATION node joins the quantised region now."""
        index = self.index
        data = node.input[0] if node.input else ""
        outputs = data_outputs(node, rule)
        if not outputs or not self.is_activation(data):
            return False
        if index.is_constant(data) and not _reads_constant_by_index(node, rule, index):
            return False
        if not all(self.is_activation(o) for o in outputs):
            return False
        if data not in self.quantised and not any(o in self.quantised for o in outputs):
            return False
        if rule.kind is Kind.PASS_THROUGH:
            return node.name not in self.tail
        return _fold_stays_local(index, data) and not any(index.is_graph_output(o) for o in outputs)

    def grow(self, node: onnx.NodeProto, rule: OpRule) -> None:
        """Add a pass-through or foldable node: its data input and outputs are tied."""
        data = node.input[0]
        self.layers[node.name] = None
        folding = rule.kind is Kind.FOLDABLE_ACTIVATION
        if folding:
            self.foldable.append(node.name)
        self.quantised[data] = None
        for out in data_outputs(node, rule):
            self.quantised[out] = None
            self.ties.append(Tie(data, out, node.name, node.op_type, covered=data if folding else out))


def log_input_cones(index: GraphIndex) -> dict[str, str]:
    """Nodes whose output reaches a Log's input with no exponential op between, each with the reason.

    The walk goes upstream from each Log (standard domain) over non-constant inputs; an op in
    :data:`EXPONENTIAL_OPS` joins the cone (its output stays float) but the walk stops there.
    """
    kept: dict[str, str] = {}
    for log_node in index.nodes:
        if log_node.op_type != "Log" or log_node.domain not in ("", "ai.onnx") or not log_node.input:
            continue
        reason = (f"feeds Log {log_node.name!r}: a logarithm needs relative precision, which 8-bit linear "
                  "steps cannot give small values (an audio front end's quiet bins); kept float")
        todo = [log_node.input[0]]
        while todo:
            producer = index.producer(todo.pop())
            if producer is None or producer.name in kept:
                continue
            kept[producer.name] = reason
            if producer.op_type not in EXPONENTIAL_OPS:
                todo.extend(t for t in producer.input if t and not index.is_constant(t))
    return kept


def select(index: GraphIndex, *, excluded: set[str] | frozenset[str] = frozenset(),
           kept_float: Mapping[str, str] | None = None, per_channel: bool = True) -> Selection:
    """Apply the rules table to the graph; see the module docstring.

    ``excluded``: nodes the user keeps float; ``kept_float``: nodes qnnlib keeps float, each with the
    reason the report gives (:func:`log_input_cones`).
    """
    kept_float = kept_float or {}
    region = _Region(index, set(excluded) | set(kept_float), per_channel)
    growing: list[tuple[onnx.NodeProto, OpRule]] = []
    for node in index.nodes:
        if node.name in excluded:
            continue
        if node.name in kept_float:
            region.float_nodes.append((node.name, kept_float[node.name]))
            continue
        rule, reason = rule_for(node, index)
        if rule is None:
            region.float_nodes.append((node.name, reason))
        elif rule.kind in (Kind.PASS_THROUGH, Kind.FOLDABLE_ACTIVATION):
            growing.append((node, rule))
        else:
            reason = region.add_layer(node, rule)
            if reason:
                region.float_nodes.append((node.name, reason))
    changed = True
    while changed:  # the quantised region grows through pass-through and foldable nodes
        ready = [(n, r) for n, r in growing if n.name not in region.layers and region.can_grow(n, r)]
        for node, rule in ready:
            region.grow(node, rule)
        changed = bool(ready)
    region.float_nodes.extend((n.name, "outside the quantised region") for n, _ in growing
                              if n.name not in region.layers)
    order = {n.name: i for i, n in enumerate(index.nodes)}
    return Selection(
        layers=tuple(sorted(region.layers, key=order.__getitem__)),
        activations=tuple(_graph_order(index, region.quantised)),
        ties=tuple(region.ties),
        weights=tuple(region.weights),
        foldable=tuple(sorted(region.foldable, key=order.__getitem__)),
        float_nodes=tuple(sorted(region.float_nodes, key=lambda p: order[p[0]])),
        excluded=tuple(sorted(excluded, key=order.__getitem__)),
    )


def _reads_constant_by_index(node: onnx.NodeProto, rule: OpRule, index: GraphIndex) -> bool:
    """Whether a pass-through ``node`` selects from a constant table by a computed input (an embedding Gather).

    The table then joins its output's tied group as a constant member: it is stored quantised at the
    group's parameters, and onnxruntime gathers from the integer table.
    """
    return rule.kind is Kind.PASS_THROUGH and any(n and not index.is_constant(n) for n in node.input[1:])


def tail_nodes(index: GraphIndex, excluded: set[str] | frozenset[str] = frozenset()) -> frozenset[str]:
    """Nodes from which no (non-excluded) weighted layer is reachable: the model's float tail."""
    reaches: set[str] = set()
    for node in reversed(index.nodes):
        rule, _ = rule_for(node, index)
        weighted = rule is not None and rule.kind is Kind.WEIGHTED and node.name not in excluded
        if weighted or any(c.name in reaches for o in node.output if o for c in index.consumers(o)):
            reaches.add(node.name)
    return frozenset(n.name for n in index.nodes if n.name not in reaches)


def _bias_add_follows(index: GraphIndex, tensor: str) -> bool:
    """Whether ``tensor`` feeds an Add with a constant operand.

    onnxruntime fuses a float-output MatMul with such an Add into a float Gemm before its QDQ
    fusions run, so that MatMul's output must stay quantised.
    """
    for use in index.uses(tensor):
        node = use.node
        if node.op_type == "Add" and any(index.is_constant(n) for n in node.input if n != tensor):
            return True
    return False


def _sole_reader(index: GraphIndex, tensor: str) -> bool:
    """Whether one node reads ``tensor`` once, and it is neither a graph output nor read by a subgraph."""
    return (len(index.uses(tensor)) == 1 and not index.is_graph_output(tensor)
            and not index.read_in_subgraph(tensor) and index.producer(tensor) is not None)


def _fold_stays_local(index: GraphIndex, tensor: str) -> bool:
    """Whether a foldable activation reading ``tensor`` may clip ``tensor``'s whole tied group.

    Folding gives the group the activation's output range. The group reaches upstream through
    pass-through ops, Concat and other folded activations, so every tensor on that way must be read
    by that one node only, and no pass-through there may have other outputs (a Split's siblings):
    otherwise a node that needs the unclipped values would get clipped ones.
    """
    todo = [tensor]
    while todo:
        current = todo.pop()
        if not _sole_reader(index, current):
            return False
        producer = index.producer(current)
        assert producer is not None  # _sole_reader checked it
        rule, _ = rule_for(producer, index)
        if rule is None or rule.kind in (Kind.WEIGHTED, Kind.QUANTIZED_IO):
            continue
        if rule.kind is Kind.TIE_ALL:
            todo.extend(t for _, t in data_inputs(producer, rule) if not index.is_constant(t))
        elif len(data_outputs(producer, rule)) > 1:
            return False
        else:
            todo.append(producer.input[0])
    return True


def _weight_slots(node: onnx.NodeProto, rule: OpRule, index: GraphIndex, per_channel: bool) -> list[WeightSlot]:
    slots: list[WeightSlot] = []
    if rule.weight_input is not None and rule.weight_input < len(node.input):
        weight = node.input[rule.weight_input]
        if index.is_constant(weight) and index.is_float(weight):
            rank = len(index.shape(weight) or ())
            axis = weight_axis(node, rank) if per_channel else None
            slots.append(WeightSlot(node.name, rule.weight_input, weight, WEIGHT, axis))
    if rule.bias_input is not None and rule.bias_input < len(node.input):
        bias = node.input[rule.bias_input]
        if bias and index.is_constant(bias) and index.is_float(bias):
            slots.append(WeightSlot(node.name, rule.bias_input, bias, BIAS, 0))
    return slots


def _graph_order(index: GraphIndex, tensors: dict[str, None]) -> list[str]:
    """Graph inputs and constants first (in input order), then tensors in producing-node order."""
    rank: dict[str, tuple[int, int]] = {}
    for i, name in enumerate(index.graph_inputs):
        rank[name] = (-2, i)
    for i, name in enumerate(index.initializers):
        rank.setdefault(name, (-1, i))
    for node in index.nodes:
        pos = index.position(node)
        for j, name in enumerate(node.output):
            rank.setdefault(name, (pos, j))
    return sorted(tensors, key=lambda t: rank.get(t, (len(index.nodes), 0)))
