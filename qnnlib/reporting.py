"""Assemble the :class:`~qnnlib.report.Report` from what each phase of :func:`qnnlib.quantize` produced."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx

from qnnlib.calibration.collect import CalibrationStats
from qnnlib.config import QuantConfig
from qnnlib.diagnosis import Diagnosis, LayerEvidence, TensorError, diagnose, tensor_error, values_error
from qnnlib.evaluate import Fidelity
from qnnlib.fusion import COMPUTE_OPS, FusionSummary
from qnnlib.graph.index import GraphIndex
from qnnlib.graph.rules import ALREADY_QUANTISED_ADVICE
from qnnlib.graph.select import Selection
from qnnlib.numerics.affine import weight_error
from qnnlib.numerics.metrics import error_of_sqnr, sqnr_of_error
from qnnlib.numerics.qtypes import QTYPES
from qnnlib.optimize.mixed_search import CurvePoint, MixedOutcome
from qnnlib.optimize.raising import Outcome
from qnnlib.optimize.ranges import RangeChoice
from qnnlib.plan import LayerPlan, QuantPlan
from qnnlib.precision import extent
from qnnlib.report import (
    CalibrationReport,
    CurvePointReport,
    FusionReport,
    GroupReport,
    LayerReport,
    MixedReport,
    OutputReport,
    Report,
    ThresholdReport,
    ThresholdStep,
)
from qnnlib.version import __version__


@dataclass(frozen=True)
class Phases:
    """What the phases of one quantisation produced, for the report."""

    config: QuantConfig
    index: GraphIndex
    selection: Selection
    plan: QuantPlan
    stats: CalibrationStats
    generation: tuple[str, ...] | None  # how generated inputs were drawn; None for the user's data
    fidelity: Fidelity | None
    fusion: FusionSummary | None
    ranges: Mapping[int, RangeChoice]
    threshold: Outcome | None
    validation: str
    timings: Mapping[str, float]
    notes: tuple[str, ...]
    mixed: MixedOutcome | None = None


def build_report(p: Phases) -> Report:
    """The report of one quantisation."""
    fusion = _fusion(p.fusion, p.index, p.selection, p.plan) if p.fusion is not None else None
    notes = list(p.notes)
    notes += [f"bias {w.tensor!r} of {w.node!r}: {w.clamped} values overflowed int32 and were clamped"
              for w in p.plan.weights if w.clamped]
    quantised_already = [p.index.node(n).op_type for n in p.selection.already_quantised]
    if quantised_already:
        counts = ", ".join(f"{op} x{k}" for op, k in sorted(Counter(quantised_already).items()))
        notes.append(f"the model was already quantised: {len(quantised_already)} nodes of its own quantisation "
                     f"or wrapped by it ({counts}) are left as they are; {ALREADY_QUANTISED_ADVICE}")
    if p.generation is not None:
        notes.append("calibration data was GENERATED from what the model implies: pass real data for "
                     "representative ranges")
    if fusion is not None and not fusion.complete:
        notes.append(f"onnxruntime left float compute ops: {fusion.float_compute_left}")
    fidelity = p.fidelity
    return Report(
        qnnlib_version=__version__,
        config=p.config.summary(),
        calibration=CalibrationReport(p.config.calibration.name, p.stats.samples, p.generation is not None,
                                      dict(p.stats.nonfinite), p.generation or ()),
        layers=_layers(p),
        groups=tuple(GroupReport(g.id, g.members, g.tied_by, g.params.scale, g.params.zero_point, g.params.range,
                                 len(g.members) - 1) for g in p.plan.groups),
        outputs=tuple(OutputReport(name, acc.sqnr_db, acc.cosine, acc.max_abs)
                      for name, acc in fidelity.outputs.items()) if fidelity is not None else (),
        timings={k: round(v, 4) for k, v in p.timings.items()},
        fusion=fusion,
        notes=tuple(notes),
        evaluation_samples=fidelity.samples if fidelity is not None else 0,
        threshold=_threshold(p.threshold, p.validation, p.config) if p.threshold is not None else None,
        mixed=_mixed(p.mixed) if p.mixed is not None else None,
    )


def _mixed(mixed: MixedOutcome) -> MixedReport:
    """The curve, the chosen point and what the sensitivity analysis cost."""
    assert mixed.report is not None
    names = {g.group: g.tensor for g in mixed.report.groups}
    def point(p: CurvePoint) -> CurvePointReport:
        return CurvePointReport(p.cost, p.estimate, p.counts(), p.value, p.met, p.chosen,
                                {names[g]: q for g, q in p.precisions.items() if g in names})

    return MixedReport(tuple(point(p) for p in mixed.curve), round(mixed.report.seconds, 3),
                       round(mixed.report.float_passes, 1), mixed.report.method, tuple(point(p) for p in mixed.refined))


def _fusion(summary: FusionSummary, index: GraphIndex, selection: Selection, plan: QuantPlan) -> FusionReport:
    """Float compute ops are expected for layers kept float and for layers raised above int8."""
    raised = {layer.node for layer in plan.layers if layer.precision != "int8"}
    float_compute = sum(1 for n in index.nodes
                        if n.op_type in COMPUTE_OPS and (not selection.is_layer(n.name) or n.name in raised))
    return FusionReport(summary.integer_kernels, summary.float_compute, float_compute)


def _threshold(outcome: Outcome, validation: str, config: QuantConfig) -> ThresholdReport:
    assert config.threshold is not None
    return ThresholdReport(
        requirement=config.threshold.describe(), value=outcome.value, met=outcome.met,
        initial_value=outcome.initial_value, float_score=outcome.float_score, validation=validation,
        raised=dict(outcome.raised),
        steps=tuple(ThresholdStep(s.raised, s.level, s.value, s.met, s.layers) for s in outcome.steps),
        seconds=round(outcome.seconds, 3),
        raised_tensors={group.members[0]: outcome.raised_groups[group.id] for group in outcome.plan.groups
                        if group.id in outcome.raised_groups},
    )


def _why_raised(layer: LayerPlan, plan: QuantPlan, outcome: Outcome) -> str:
    """Which raised group put ``layer`` above int8, and its harm: its error alone as a share of the plan's."""
    if layer.node not in outcome.raised:
        return ""
    touched = [g for t in (*layer.inputs, *layer.outputs)
               if (g := plan.group_of(t)) is not None and g.id in outcome.raised_groups]
    level = outcome.raised[layer.node]
    mixed = not outcome.harm  # mixed precision chose the groups' precisions from the accuracy/cost curve
    group = (next((g for g in touched if outcome.raised_groups[g.id] == level), touched[0]) if mixed
             else max(touched, key=lambda g: outcome.harm.get(g.id, 0.0)))
    role = "reads" if any(plan.group_of(t) is group for t in layer.inputs) else "writes"
    if mixed:
        return f"{level}: {role} {group.members[0]!r}, put at {outcome.raised_groups[group.id]} by mixed precision"
    share = 100 * outcome.harm.get(group.id, 0.0)  # above 100% where other groups' errors cancel part of it
    figure = f"{share:.2g}" if share < 100 else f"{share:.0f}"
    return (f"{level}: {role} {group.members[0]!r}, raised because at 8 bits alone it gives "
            f"{figure}% of the int8 model's output error")


def _layers(p: Phases) -> tuple[LayerReport, ...]:
    index, plan, selection = p.index, p.plan, p.selection
    nodes = {n.name: n for n in index.nodes}
    folded_into = {name: nodes[name].input[0] for name in plan.dropped_activations}
    after_fold = {nodes[name].input[0]: nodes[name].output[0] for name in selection.foldable}
    float_reason = dict(selection.float_nodes)
    excluded = set(selection.excluded)
    layer_plans = {layer.node: layer for layer in plan.layers}
    chosen_by = p.threshold if p.threshold is not None else (p.mixed.outcome if p.mixed is not None else None)
    layers = []
    evidence = _Evidence(p)
    diagnosed: dict[str, tuple[str, Diagnosis]] = {}  # measured tensor -> (layer, its diagnosis)
    by_node: dict[str, Diagnosis] = {}
    for node in index.nodes:
        lp = layer_plans.get(node.name)
        if lp is None:
            reason = "excluded by config" if node.name in excluded else float_reason.get(node.name, "")
            layers.append(LayerReport(node.name, node.op_type, "float", note=reason))
            continue
        out, note = _measured_output(node, lp.outputs, index, plan, after_fold=after_fold, folded_into=folded_into)
        group = plan.group_of(out) if out else None
        search = p.ranges.get(group.id) if group is not None else None
        why = _why_raised(lp, plan, chosen_by) if chosen_by is not None else ""
        sqnr = _sqnr(p.fidelity, out)
        folded = node.name in folded_into  # measured, and diagnosed, as part of the layer it was folded into
        diagnosis = evidence.diagnose(lp, out, sqnr) if sqnr is not None and not folded else None
        if diagnosis is not None:
            diagnosed[out] = (node.name, diagnosis)
            by_node[node.name] = diagnosis
        layers.append(LayerReport(
            node.name, node.op_type, lp.precision, out,
            group.params.scale if group else None, group.params.zero_point if group else None,
            group.id if group else None, sqnr, note,
            range=tuple(group.params.range) if group else None,  # type: ignore[arg-type]
            error_before_db=sqnr_of_error(search.before) if search else None,
            error_after_db=sqnr_of_error(search.after) if search else None,
            raised=why,
            error_sources=({k: round(sqnr_of_error(v), 2) for k, v in diagnosis.sources.items() if v > 0}
                           if diagnosis else {}),
            cause=diagnosis.cause if diagnosis else "",
            explanation=diagnosis.explanation if diagnosis else "",
        ))
    return tuple(_with_origin(layer, evidence, diagnosed, by_node) for layer in layers)


def _with_origin(layer: LayerReport, evidence: _Evidence, diagnosed: Mapping[str, tuple[str, Diagnosis]],
                 by_node: Mapping[str, Diagnosis]) -> LayerReport:
    """An inherited error's explanation, completed with the layer where that error first grows."""
    if layer.cause != "inputs":
        return layer
    origin = evidence.origin(by_node[layer.node].worst_input, diagnosed)
    if not origin or origin == layer.node:
        return layer
    return replace(layer, explanation=f"{layer.explanation}; it first grows at {origin!r} ({by_node[origin].cause})")


#: How far back a tensor no layer measured is traced through float ops to find the error it carries.
TRACE_DEPTH = 16


class _Evidence:
    """What the diagnoses are built from (:mod:`qnnlib.diagnosis`): measured, histogram and weight errors."""

    def __init__(self, p: Phases) -> None:
        self.p = p
        self._carried: dict[str, float] = {}

    def own_error(self, tensor: str) -> TensorError | None:
        """``tensor``'s own quantisation error at its group's parameters.

        From its (or a fellow member's) calibration histogram, else from its float reference values.
        """
        group = self.p.plan.group_of(tensor)
        if group is None or group.params.qtype not in QTYPES:
            return None
        kept = self.p.stats.histograms
        observed = [m for m in (tensor, *group.members) if m in kept]
        if observed:
            return tensor_error(kept[observed[0]], group.params)
        references = [r.tensors[tensor] for r in self.p.stats.references if tensor in r.tensors]
        return values_error(np.concatenate(references), group.params) if references else None

    def carried(self, tensor: str, depth: int = 0) -> float:
        """The relative error ``tensor`` carries in the quantised model.

        Measured where the report measured it; elsewhere the largest error among its producer's
        inputs (traced back through float ops) plus its own quantisation error.
        """
        if tensor in self._carried:
            return self._carried[tensor]
        measured = _sqnr(self.p.fidelity, tensor)
        if measured is not None:
            value = error_of_sqnr(measured)
        else:
            own = self.own_error(tensor)
            producer = self.p.index.producer(tensor)
            upstream = 0.0
            if producer is not None and depth < TRACE_DEPTH:
                upstream = max((self.carried(t, depth + 1) for t in producer.input
                                if t and not self.p.index.is_constant(t)), default=0.0)
            value = upstream + (own.total if own is not None else 0.0)
        self._carried[tensor] = value
        return value

    def weights(self, node: str) -> tuple[float, int] | None:
        """The largest relative error among ``node``'s quantised weights, and their bit width."""
        found = None
        for wp in self.p.plan.weights_of(node):
            if wp.kind == "weight" and wp.qtype in QTYPES:
                value = self.p.index.constant(wp.tensor).astype(np.float32)
                error = weight_error(value, np.asarray(wp.scales, np.float32), wp.axis, wp.qmax)
                if found is None or error > found[0]:
                    found = (error, QTYPES[wp.qtype].bits)
        return found

    def diagnose(self, layer: LayerPlan, out: str, sqnr: float) -> Diagnosis:
        """The sources of one measured layer's error."""
        plan = self.p.plan
        group = plan.group_of(out)
        tied = group is not None and any(plan.group_of(t) is group for t in layer.inputs)
        output = None if tied or group is None else self.own_error(out)
        own_grid = group is not None and not tied and group.params.qtype in QTYPES
        return diagnose(LayerEvidence(
            layer.node, error_of_sqnr(sqnr), {t: self.carried(t) for t in layer.inputs}, self.weights(layer.node),
            output, out, group.params if group is not None else None,
            extent(group.members, self.p.stats.extremes) if group is not None else None,
            output_known=output is not None or not own_grid))

    def origin(self, tensor: str, diagnosed: Mapping[str, tuple[str, Diagnosis]]) -> str:
        """The layer where the error ``tensor`` carries first grows: up the chain of inherited errors.

        Through a layer that inherits, to its worst input; through an op no layer measured, to its
        input carrying the largest error; "" when the chain ends at a graph input.
        """
        seen: set[str] = set()
        last = ""
        while tensor and tensor not in seen:
            seen.add(tensor)
            if tensor in diagnosed:
                last, d = diagnosed[tensor]
                if d.cause != "inputs":
                    return last
                tensor = d.worst_input
                continue
            producer = self.p.index.producer(tensor)
            upstream = [t for t in producer.input if t and not self.p.index.is_constant(t)] if producer else []
            tensor = max(upstream, key=self.carried) if upstream else ""
        return last


def _measured_output(node: onnx.NodeProto, outputs: tuple[str, ...], index: GraphIndex, plan: QuantPlan, *,
                     after_fold: Mapping[str, str], folded_into: Mapping[str, str]) -> tuple[str, str]:
    """The tensor where a layer is measured (its folded activation's output, or its float output) and a note."""
    out = outputs[0] if outputs else ""
    note = ""
    if out in after_fold:
        out = after_fold[out]
        if any(name for name in plan.dropped_activations if folded_into[name] == outputs[0]):
            note = "activation folded in"
    if node.name in folded_into:
        producer = index.producer(folded_into[node.name])
        note = f"dropped: folded into {producer.name!r}" if producer is not None else "dropped"
    if not out and node.output and index.is_graph_output(node.output[0]):
        out, note = node.output[0], "float output (integer kernel with float result)"
    return out, note


def _sqnr(fidelity: Fidelity | None, tensor: str) -> float | None:
    if fidelity is None or not tensor:
        return None
    if tensor in fidelity.tensors:
        return fidelity.tensors[tensor].sqnr_db
    if tensor in fidelity.outputs:
        return fidelity.outputs[tensor].sqnr_db
    return None
