"""``qnnlib.quantize``: load, select, calibrate, plan, emit, verify, report."""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx

from qnnlib.calibration.collect import collect
from qnnlib.calibration.feeds import FeedSource, input_specs
from qnnlib.config import QuantConfig
from qnnlib.emit.qdq import emit_qdq
from qnnlib.errors import ConfigError
from qnnlib.evaluate import Fidelity, measure
from qnnlib.fusion import COMPUTE_OPS, FusionSummary, checked_session
from qnnlib.graph.index import GraphIndex
from qnnlib.graph.model_io import ModelLike, check_model, load_model
from qnnlib.graph.normalize import normalize
from qnnlib.graph.select import Selection, match_excluded, select
from qnnlib.graph.tying import tie_groups
from qnnlib.numerics.qtypes import qtype
from qnnlib.plan import QuantPlan
from qnnlib.planner import build_plan
from qnnlib.report import CalibrationReport, FusionReport, GroupReport, LayerReport, OutputReport, Report
from qnnlib.result import QuantResult
from qnnlib.version import __version__

log = logging.getLogger(__name__)


class _Timer:
    """Wall time per phase, in the order the phases ran."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - start


def quantize(model: ModelLike, calib: Any = None, *, config: QuantConfig | None = None) -> QuantResult:
    """Quantise a float ONNX model to an int8 QDQ model that onnxruntime runs on integer kernels.

    ``model``: a path, bytes or ``onnx.ModelProto`` (never modified). ``calib``: calibration data
    (see :mod:`qnnlib.calibration.feeds` for the accepted forms) or None to generate inputs.
    Returns a :class:`QuantResult` with ``.model``, ``.report``, ``.plan``, ``.save()``, ``.session()``.
    """
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a qnnlib.QuantConfig, got {type(config).__name__}")
    timer = _Timer()
    with timer("load"):
        proto = load_model(model)
        check_model(proto)
        specs = input_specs(proto)
    with timer("normalize"):
        normalized = normalize(proto, fold_batchnorm_nodes=config.fold_batchnorm)
        float_model = normalized.model
    with timer("select"):
        index = GraphIndex(float_model)
        excluded = _excluded_nodes(index, config)
        per_channel = config.per_channel and normalized.per_channel_ok
        selection = select(index, excluded=excluded, per_channel=per_channel)
        _check_overrides(index, selection, config)
        groups = tie_groups(selection.activations, selection.ties)
    qt = qtype(config.activation_type)
    layer_outputs = _layer_outputs(selection, index)
    with FeedSource(calib, specs, max_samples=config.max_calibration_samples, replay=config.report_samples,
                    rng=np.random.default_rng(config.seed)) as feeds:
        with timer("calibrate"):
            stats = collect(float_model, selection.observed(index), feeds, config.calibration, levels=qt.levels,
                            symmetric=config.activation_symmetric, capture=layer_outputs,
                            capture_samples=config.report_samples)
        with timer("plan"):
            plan = build_plan(index, selection, groups, stats.ranges, config)
        with timer("emit"):
            emitted = emit_qdq(float_model, plan)
        with timer("verify"):
            check_model(emitted.model)
            measured = [t for t in layer_outputs if t in emitted.quantized_names] if stats.references else []
            session, summary = checked_session(emitted.model, [emitted.quantized_names[t] for t in measured],
                                               verify=config.verify_fusion)
        with timer("evaluate"):
            fidelity = measure(session, emitted.quantized_names, plan, feeds=feeds.take(len(stats.references)),
                               references=stats.references, tensors=measured,
                               outputs=index.graph_outputs) if stats.references else None
        calibration = CalibrationReport(config.calibration.name, stats.samples, feeds.generated,
                                        dict(stats.nonfinite))
    fusion = _fusion_report(summary, index, selection) if summary is not None else None
    notes = list(normalized.notes)
    notes += [f"bias {w.tensor!r} of {w.node!r}: {w.clamped} values overflowed int32 and were clamped"
              for w in plan.weights if w.clamped]
    if calibration.generated:
        notes.append("calibration data was GENERATED from the input specification: pass real data for "
                     "representative ranges")
    if fusion is not None and not fusion.complete:
        notes.append(f"onnxruntime left float compute ops: {fusion.float_compute_left}")
    report = _build_report(config, index, selection, plan, fidelity=fidelity, calibration=calibration,
                           fusion=fusion, timings=timer.times, notes=notes)
    return QuantResult(emitted.model, report, plan)


def _excluded_nodes(index: GraphIndex, config: QuantConfig) -> set[str]:
    excluded, unmatched = match_excluded(index, config.exclude, config.exclude_op_types)
    if unmatched:
        names = [n.name for n in index.nodes]
        close = difflib.get_close_matches(unmatched[0], names, n=3)
        hint = f"; did you mean {close}?" if close else f"; nodes are named like {names[:3]}"
        raise ConfigError(f"exclude pattern {unmatched[0]!r} matches no node of the model{hint}")
    return excluded


def _check_overrides(index: GraphIndex, selection: Selection, config: QuantConfig) -> None:
    quantized = set(selection.activations)
    for name in config.overrides:
        if name in quantized:
            continue
        known = index.producer(name) is not None or name in index.graph_inputs or index.is_constant(name)
        if known:
            raise ConfigError(
                f"override for tensor {name!r}: it is not quantised (no quantised layer reads or writes it); "
                "overrides apply to quantised activations"
            )
        close = difflib.get_close_matches(name, list(quantized), n=3)
        raise ConfigError(f"override for tensor {name!r}: the model has no such tensor" +
                          (f"; did you mean {close}?" if close else ""))


def _layer_outputs(selection: Selection, index: GraphIndex) -> list[str]:
    """Where the report measures each quantised layer: its first output, or its folded activation's."""
    nodes = {n.name: n for n in index.nodes}
    quantised = set(selection.activations)
    activation_of = {nodes[name].input[0]: nodes[name].output[0] for name in selection.foldable}
    outs = (nodes[name].output[0] for name in selection.layers if nodes[name].output)
    return list(dict.fromkeys(activation_of.get(o, o) for o in outs if o in quantised))


def _fusion_report(summary: FusionSummary, index: GraphIndex, selection: Selection) -> FusionReport:
    float_compute = sum(1 for n in index.nodes if n.op_type in COMPUTE_OPS and not selection.is_layer(n.name))
    return FusionReport(summary.integer_kernels, summary.float_compute, float_compute)


def _dropped(plan: QuantPlan, nodes: dict[str, onnx.NodeProto], activation_output: str) -> bool:
    return any(nodes[name].output[0] == activation_output for name in plan.dropped_activations)


def _build_report(config: QuantConfig, index: GraphIndex, selection: Selection, plan: QuantPlan, *,
                  fidelity: Fidelity | None, calibration: CalibrationReport,
                  fusion: FusionReport | None, timings: dict[str, float], notes: list[str]) -> Report:
    nodes = {n.name: n for n in index.nodes}
    folded_into = {name: nodes[name].input[0] for name in plan.dropped_activations}
    after_fold = {nodes[name].input[0]: nodes[name].output[0] for name in selection.foldable}
    producers = {t: index.producer(t) for t in folded_into.values()}
    float_reason = dict(selection.float_nodes)
    excluded = set(selection.excluded)
    layer_plans = {layer.node: layer for layer in plan.layers}
    layers = []
    for node in index.nodes:
        lp = layer_plans.get(node.name)
        if lp is None:
            reason = "excluded by config" if node.name in excluded else float_reason.get(node.name, "")
            layers.append(LayerReport(node.name, node.op_type, "float", note=reason))
            continue
        out = lp.outputs[0] if lp.outputs else ""
        note = ""
        if out in after_fold:
            out = after_fold[out]
            note = "activation folded in" if after_fold.get(lp.outputs[0]) and _dropped(plan, nodes, out) else ""
        if node.name in folded_into:
            producer = producers[folded_into[node.name]]
            note = f"dropped: folded into {producer.name!r}" if producer is not None else "dropped"
        if not out and node.output and index.is_graph_output(node.output[0]):
            out = node.output[0]
            note = "float output (integer kernel with float result)"
        group = plan.group_of(out) if out else None
        sqnr = None
        if fidelity is not None and out in fidelity.tensors:
            sqnr = fidelity.tensors[out].sqnr_db
        elif fidelity is not None and out in fidelity.outputs:
            sqnr = fidelity.outputs[out].sqnr_db
        layers.append(LayerReport(
            node.name, node.op_type, lp.precision, out,
            group.params.scale if group else None, group.params.zero_point if group else None,
            group.id if group else None, sqnr, note,
        ))
    groups = tuple(
        GroupReport(g.id, g.members, g.tied_by, g.params.scale, g.params.zero_point, g.params.range,
                    len(g.members) - 1)
        for g in plan.groups
    )
    outputs = tuple(
        OutputReport(name, acc.sqnr_db, acc.cosine, acc.max_abs) for name, acc in fidelity.outputs.items()
    ) if fidelity is not None else ()
    return Report(
        qnnlib_version=__version__,
        config=config.summary(),
        calibration=calibration,
        layers=tuple(layers),
        groups=groups,
        outputs=outputs,
        timings={k: round(v, 4) for k, v in timings.items()},
        fusion=fusion,
        notes=tuple(notes),
        evaluation_samples=fidelity.samples if fidelity is not None else 0,
    )
