"""Every group's local error at every precision, from one pass of one model.

The *local error* of tied group ``g`` at precision ``p`` is what quantising ``g`` alone does at the
outputs of the layers that read it (its *readers*), all other inputs float:

    e[g, p] = sum over readers R, float outputs o of R, samples of |R_o(q_p(x_g), q_p(W_R)) - R_o(x)|^2
              ---------------------------------------------------------------------------------------
                          sum over the same outputs and samples of |R_o(x)|^2

where ``q_p(x_g)`` is ``g``'s activations quantised with its parameters at ``p`` (QuantizeLinear then
DequantizeLinear, so rounding and saturation are onnxruntime's) and ``q_p(W_R)`` the reader's owned
weights at ``p`` (:mod:`qnnlib.precision`). A reader is a node reading a member of
``g`` that does not itself write a member of ``g`` (a MaxPool or Concat inside the group moves values,
it does not add error); a member that is a graph output is its own reader.

The *probe model* computes all of them at once: the float model, plus for every group, precision and
reader a copy of the reader on the quantised inputs, and per copy the sum of squared differences to
the float reader's outputs as a scalar output. One onnxruntime run per sample gives every ``e[g, p]``
without copying any activation out of the session: about ``1 + len(precisions)`` float passes of
compute in all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qnnlib.graph.index import GraphIndex, subgraphs
from qnnlib.graph.names import NameAllocator
from qnnlib.numerics.qtypes import qtype
from qnnlib.plan import ActivationParams, QuantPlan, WeightPlan

#: onnxruntime's contrib domain: its QuantizeLinear and DequantizeLinear take 4-, 8- and 16-bit
#: types at any opset (the standard ones need opset 21 for 4 and 16 bits).
MS_DOMAIN = "com.microsoft"
#: A (group id, precision) pair.
Key = tuple[int, str]


@dataclass(frozen=True)
class Probe:
    """The probe model and, per ``(group, precision)``, the names of its error and signal outputs."""

    model: onnx.ModelProto
    errors: dict[Key, tuple[str, ...]]
    signals: dict[Key, tuple[str, ...]]
    diffs: dict[Key, tuple[tuple[str, str], ...]]

    @property
    def perturbed(self) -> list[str]:
        """Every tensor some ``(group, precision)`` changes: the readers' outputs and the end members."""
        return list(dict.fromkeys(t for pairs in self.diffs.values() for _, t in pairs))

    @property
    def outputs(self) -> list[str]:
        """Every scalar output the probe computes, each once."""
        names = [n for ns in self.errors.values() for n in ns] + [n for ns in self.signals.values() for n in ns]
        return list(dict.fromkeys(names))

    def local_errors(self, runs: Iterable[Mapping[str, float]]) -> dict[Key, float]:
        """``e[g, p]`` from the probe's scalar outputs of each sample (a name -> value map per run)."""
        noise = dict.fromkeys(self.errors, 0.0)
        signal = dict.fromkeys(self.errors, 0.0)
        for run in runs:
            for key in self.errors:
                noise[key] += sum(float(run[n]) for n in self.errors[key])
                signal[key] += sum(float(run[n]) for n in self.signals[key])
        return {k: (noise[k] / signal[k] if signal[k] > 0 else noise[k]) for k in self.errors}


def readers(index: GraphIndex, members: Sequence[str]) -> list[onnx.NodeProto]:
    """The nodes reading a member that do not write one (see the module docstring), in graph order."""
    inside = set(members)
    found: dict[int, onnx.NodeProto] = {}
    for member in members:
        for node in index.consumers(member):
            if any(o in inside for o in node.output) or any(True for _ in subgraphs(node)):
                continue
            if any(index.is_float(o) for o in node.output if o):
                found.setdefault(index.position(node), node)
    return [found[k] for k in sorted(found)]


def build_probe(model: onnx.ModelProto, plan: QuantPlan, *, params: Mapping[str, Mapping[int, ActivationParams]],
                weights: Mapping[str, Mapping[tuple[str, int], np.ndarray]], owned: Mapping[int, Sequence[WeightPlan]],
                points: Sequence[str] = (), differences_at: Sequence[str] = ()) -> Probe:
    """The probe model over ``model`` (the normalised float model, unchanged).

    ``params[p][g]``: group ``g``'s parameters at precision ``p`` (a group missing stays float and is
    not probed at ``p``); ``weights[p][(node, input index)]``: an owned weight's dequantised value
    at ``p`` (a precision missing keeps float weights); ``owned[g]``: the weights group ``g`` owns;
    ``points``: tensors where the output error is measured
    (:func:`qnnlib.optimize.error.region_outputs`), which, like graph outputs, are their own readers;
    ``differences_at``: precisions whose difference tensors (:attr:`Probe.diffs`) are also outputs,
    for :func:`build_perturbation`.
    """
    writer = _ProbeWriter(model, set(points))
    errors: dict[Key, tuple[str, ...]] = {}
    signals: dict[Key, tuple[str, ...]] = {}
    diffs: dict[Key, tuple[tuple[str, str], ...]] = {}
    for precision, by_group in params.items():
        for group in plan.groups:
            p = by_group.get(group.id)
            if p is None:
                continue
            at_p = weights.get(precision, {})
            replaced = {(w.node, w.input_index): at_p[(w.node, w.input_index)]
                        for w in owned.get(group.id, ()) if (w.node, w.input_index) in at_p}
            pairs = writer.group(group.id, group.members, precision, p, replaced)
            if pairs:
                key = (group.id, precision)
                errors[key] = tuple(writer.error_of(got, want) for got, want in pairs)
                signals[key] = tuple(writer.signal_of(want) for _, want in pairs)
                diffs[key] = tuple(zip((writer.diff_of[e] for e in errors[key]), (w for _, w in pairs), strict=True))
    kept = [d for (_, precision), pairs in diffs.items() if precision in differences_at for d, _ in pairs]
    return Probe(writer.finish([n for ns in errors.values() for n in ns], kept), errors, signals, diffs)


class _ProbeWriter:
    """Adds the probe's nodes to a copy of the float model."""

    def __init__(self, model: onnx.ModelProto, ends: set[str]) -> None:
        self.out = onnx.ModelProto()
        self.out.CopyFrom(model)
        self.index = GraphIndex(self.out)
        self.names = NameAllocator(self.out)
        self.ends = ends
        self.added: list[onnx.NodeProto] = []
        self.power: dict[str, str] = {}
        self.diff_of: dict[str, str] = {}

    def constant(self, base: str, value: np.ndarray) -> str:
        """A new initializer holding ``value``."""
        name = self.names.fresh(base)
        self.out.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], base: str, **kwargs: Any) -> str:
        """Append a node ``op`` (one output, named after ``base``); return its output."""
        output = self.names.fresh(base)
        self.added.append(helper.make_node(op, inputs, [output], name=self.names.fresh(f"{output}_node"), **kwargs))
        return output

    def signal_of(self, tensor: str) -> str:
        """The scalar ``sum(tensor^2)`` (one per tensor)."""
        if tensor not in self.power:
            self.power[tensor] = self.node("ReduceSumSquare", [tensor], f"{tensor}_probe_signal", keepdims=0)
        return self.power[tensor]

    def error_of(self, got: str, want: str) -> str:
        """The scalar ``sum((got - want)^2)``; the difference tensor is kept in :attr:`diff_of`."""
        diff = self.node("Sub", [got, want], f"{want}_probe_diff")
        result = self.node("ReduceSumSquare", [diff], f"{want}_probe_error", keepdims=0)
        self.diff_of[result] = diff
        return result

    def group(self, gid: int, members: Sequence[str], precision: str, p: ActivationParams,
              replaced: Mapping[tuple[str, int], np.ndarray]) -> list[tuple[str, str]]:
        """Quantise group ``gid``'s members at ``p`` and copy its readers with ``replaced`` weights.

        Returns the ``(quantised, float)`` tensor pairs to compare: end members, then readers' outputs.
        """
        index = self.index
        qt = qtype(p.qtype)
        scale = self.constant(f"qnnlib_probe_{precision}_g{gid}_scale", np.array(p.scale, np.float32))
        zero = self.names.fresh(f"qnnlib_probe_{precision}_g{gid}_zero_point")
        self.out.graph.initializer.append(helper.make_tensor(zero, qt.onnx_type, [], [int(p.zero_point)]))
        quantised: dict[str, str] = {}
        for member in members:
            if index.producer(member) is None and not (member in index.graph_inputs or index.is_constant(member)):
                continue
            q = self.node("QuantizeLinear", [member, scale, zero], f"{member}_probe_{precision}_q", domain=MS_DOMAIN)
            quantised[member] = self.node("DequantizeLinear", [q, scale, zero], f"{member}_probe_{precision}",
                                          domain=MS_DOMAIN)
        pairs = [(quantised[m], m) for m in members if m in quantised and (m in self.ends or index.is_graph_output(m))]
        for node in readers(index, [m for m in members if m in quantised and m not in self.ends]):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = self.names.fresh(f"{node.name}_probe_{precision}_g{gid}")
            for i, name in enumerate(node.input):
                if name in quantised:
                    copy.input[i] = quantised[name]
                elif (node.name, i) in replaced:
                    copy.input[i] = self.constant(f"{name}_probe_{precision}", replaced[(node.name, i)])
            for i, name in enumerate(node.output):
                copy.output[i] = self.names.fresh(f"{name}_probe_{precision}_g{gid}") if name else ""
            self.added.append(copy)
            pairs.extend((got, want) for got, want in zip(copy.output, node.output, strict=True)
                         if want and index.is_float(want))
        return pairs

    def finish(self, scalars: Sequence[str], differences: Sequence[str]) -> onnx.ModelProto:
        """The probe model: the added nodes appended, ``scalars`` and ``differences`` as outputs."""
        out = self.out
        out.graph.node.extend(self.added)
        if not any(o.domain == MS_DOMAIN for o in out.opset_import):
            out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        present = {o.name for o in out.graph.output}
        for name in [*scalars, *self.power.values()]:
            if name not in present:
                out.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, []))
                present.add(name)
        out.graph.output.extend(helper.make_tensor_value_info(d, TensorProto.FLOAT, None) for d in differences)
        return out


@dataclass(frozen=True)
class Perturbation:
    """The float model with an additive input on chosen tensors: ``t = t_float + delta_t``."""

    model: onnx.ModelProto
    inputs: dict[str, str]


def build_perturbation(model: onnx.ModelProto, tensors: Sequence[str]) -> Perturbation:
    """``model`` (unchanged) with each of ``tensors`` written as ``Add(t_float, delta_t)``, ``delta_t`` an input.

    Fed with a probe's differences for one ``(group, precision)`` and zeros elsewhere, it computes
    exactly the configuration with only that group at that precision: a reader's output on quantised
    inputs and weights is its float output plus the difference the probe measured.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = GraphIndex(out)
    names = NameAllocator(out)
    inputs: dict[str, str] = {}
    adds: dict[int, list[onnx.NodeProto]] = {}
    for tensor in tensors:
        producer = index.producer(tensor)
        if producer is None:
            continue
        raw = names.fresh(f"{tensor}_unperturbed")
        producer.output[list(producer.output).index(tensor)] = raw
        inputs[tensor] = names.fresh(f"{tensor}_delta")
        out.graph.input.append(helper.make_tensor_value_info(inputs[tensor], TensorProto.FLOAT, None))
        adds.setdefault(id(producer), []).append(
            helper.make_node("Add", [raw, inputs[tensor]], [tensor], name=names.fresh(f"{tensor}_perturb")))
    nodes: list[onnx.NodeProto] = []
    for node in index.nodes:
        nodes.append(node)
        nodes.extend(adds.get(id(node), ()))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return Perturbation(out, inputs)
