"""``qnnlib.quantize``: load, select, calibrate, plan, optimise, meet the threshold, emit, verify, report."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import ExitStack
from typing import Any

import numpy as np
import onnx

from qnnlib.calibration.collect import CalibrationStats, collect
from qnnlib.calibration.feeds import Feed, FeedSource
from qnnlib.config import QuantConfig
from qnnlib.emit.qdq import Emitted, emit_qdq
from qnnlib.errors import ConfigError, InternalError, InvalidModelError, ThresholdError
from qnnlib.evaluate import measure
from qnnlib.fusion import checked_session
from qnnlib.graph.index import GraphIndex
from qnnlib.graph.model_io import ModelLike, check_model
from qnnlib.graph.select import Selection
from qnnlib.mixed import plan_with_precisions
from qnnlib.numerics.qtypes import FLOAT, WIDER, qtype
from qnnlib.optimize.bias import bias_corrections
from qnnlib.optimize.mixed_search import MixedOutcome, choose_within, search_mixed
from qnnlib.optimize.raising import (
    HARM_SAMPLES,
    Evaluator,
    Outcome,
    group_harm,
    meet_threshold,
    raised_layers,
    unchanged,
)
from qnnlib.optimize.ranges import RangeChoice, optimize_ranges
from qnnlib.plan import QuantPlan
from qnnlib.planner import GroupChoice, build_plan
from qnnlib.precision import extent, widened
from qnnlib.prepare import PreparedModel, Timer, calibrated_plan, open_feeds, prepare
from qnnlib.reporting import Phases, build_report
from qnnlib.result import QuantResult
from qnnlib.sensitivity import DEFAULT_SAMPLES as SENSITIVITY_SAMPLES
from qnnlib.sensitivity import LOW_BIT_LEVELS, analyse_plan

log = logging.getLogger(__name__)

#: Without validation data, every n-th calibration sample is held back to check the threshold.
HOLDOUT_EVERY = 4
#: Calibration samples reused for the threshold check when too few can be held back.
REUSED_VALIDATION = 16


def quantize(model: ModelLike, calib: Any = None, *, validation: Any = None,
             config: QuantConfig | None = None, progress: bool | None = None) -> QuantResult:
    """Quantise a float ONNX model to an int8 QDQ model that onnxruntime runs on integer kernels.

    ``model``: a path, bytes or ``onnx.ModelProto`` (never modified). ``calib``: calibration data
    (see :mod:`qnnlib.calibration.feeds` for the accepted forms) or None to generate inputs.
    ``validation``: data (same forms) on which ``config.threshold`` is checked; without it a part of
    the calibration data is held back. ``progress``: progress bars on stderr for the long steps (range
    search, ranking groups by harm, sensitivity analysis); None draws them when stderr is a terminal.
    Returns a :class:`QuantResult` with ``.model``, ``.report``, ``.plan``, ``.save()``, ``.session()``.
    """
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a qnnlib.QuantConfig, got {type(config).__name__}")
    timer = Timer()
    m = prepare(model, config, timer)
    holdout = HOLDOUT_EVERY if config.threshold is not None and validation is None else 0
    replay = max(config.report_samples, config.optimize_samples if config.optimizing else 0,
                 SENSITIVITY_SAMPLES if config.mixed else 0)
    with ExitStack() as stack:
        feeds = stack.enter_context(open_feeds(m, calib, config, timer, replay=replay, holdout=holdout))
        given = stack.enter_context(FeedSource(validation, m.specs)) if validation is not None else None
        layer_outputs = _layer_outputs(m.selection, m.index)
        with timer("calibrate"):
            stats = collect(m.float_model, m.selection.observed(m.index), feeds, config.calibration,
                            levels=qtype(config.activation_type).levels, symmetric=config.activation_symmetric,
                            capture=layer_outputs, capture_samples=config.report_samples,
                            low_bit_levels=LOW_BIT_LEVELS if config.mixed else None,
                            # constants' extremes serve raising (threshold) and mixed precision only
                            constants=m.selection.constants(m.index)
                            if config.threshold is not None or config.mixed else None)
        with timer("plan"):
            m, plan = calibrated_plan(m, stats.ranges, config)
        with timer("emit"):
            emitted = emit_qdq(m.float_model, plan)
        ranges: dict[int, RangeChoice] = {}
        corrections: dict[str, np.ndarray] = {}
        outcome, validation_note, evaluator = None, "", None
        if config.threshold is not None:
            with timer("threshold"):
                samples, validation_note = _validation(given, feeds)
                evaluator = Evaluator(config.threshold, m.float_model, samples)
                outcome = unchanged(evaluator, plan, emitted)  # a calibrated model that meets it is kept as it is
        if config.optimizing and (outcome is None or not outcome.met or config.optimize):
            with timer("optimize"):
                plan, ranges, corrections = _optimize(m, plan, stats, list(feeds.take(config.optimize_samples)),
                                                      config, progress=progress)
                emitted = emit_qdq(m.float_model, plan)
        mixed = None
        if evaluator is not None and outcome is not None:
            searched, mixed = _search(m, config, stats, plan, emitted, ranges=ranges, corrections=corrections,
                                      timer=timer, evaluator=evaluator, calibrated=outcome, samples=samples,
                                      feeds=feeds, progress=progress)
            if searched is not outcome:
                plan, emitted = searched.plan, searched.emitted
            outcome = searched
        elif config.mixed:  # a point by cost, no threshold
            with timer("mixed precision"):
                mixed = _mixed(m, config, stats, plan, corrections, evaluator=None,
                               samples=list(feeds.take(SENSITIVITY_SAMPLES)), generation=feeds.generation,
                               progress=progress)
            plan, emitted = mixed.outcome.plan, mixed.outcome.emitted
        with timer("verify"):
            _check_emitted(emitted.model)
            # 4-bit tensors cannot be fetched into numpy (onnxruntime has no numpy type for them)
            measured = [t for t in layer_outputs if t in emitted.quantized_names
                        and qtype(plan.params(t).qtype).bits > 4] if stats.references else []
            session, summary = checked_session(emitted.model, [emitted.quantized_names[t] for t in measured],
                                               verify=config.verify_fusion)
        with timer("evaluate"):
            fidelity = measure(session, emitted.quantized_names, plan, feeds=feeds.take(len(stats.references)),
                               references=stats.references, tensors=measured,
                               outputs=m.index.graph_outputs) if stats.references else None
        generation = feeds.generation
    report = build_report(Phases(config, m.index, m.selection, plan, stats, generation, fidelity, summary, ranges,
                                 outcome, validation_note, timer.times, tuple(m.normalized.notes), mixed))
    if outcome is not None and not outcome.met and config.threshold is not None and config.threshold.strict:
        raise ThresholdError(
            f"threshold {config.threshold.describe()} not met: the best model reached {outcome.value:.6g} on "
            f"{validation_note}; allow more precisions (QuantConfig(precisions=...)) or relax the threshold"
        )
    return QuantResult(emitted.model, report, plan)


def _check_emitted(model: onnx.ModelProto) -> None:
    """onnx.checker on the model qnnlib built; a failure is qnnlib's bug, not the user's (InternalError)."""
    try:
        check_model(model)
    except InvalidModelError as exc:
        raise InternalError(
            f"qnnlib built an invalid model ({exc}); this is a bug in qnnlib: please report it with the "
            "model. Until it is fixed, QuantConfig(exclude=(...)) on the node the message names may avoid it"
        ) from exc


def _optimize(m: PreparedModel, plan: QuantPlan, stats: CalibrationStats, samples: list[Feed],
              config: QuantConfig, *,
              progress: bool | None) -> tuple[QuantPlan, dict[int, RangeChoice], dict[str, np.ndarray]]:
    """Search ranges and rebuild the plan on them, with weight clipping and bias correction.

    Ranges are judged by the error at their readers; bias correction (:mod:`qnnlib.optimize.bias`)
    is measured on the plan with the chosen ranges and clipped weights.
    """
    ranges = optimize_ranges(m.float_model, plan, stats.extremes, samples, objective=config.objective,
                             symmetric=config.activation_symmetric, power_of_two=config.power_of_two_scales,
                             progress=progress)
    choices = {gid: GroupChoice(range=c.range) for gid, c in ranges.items() if c.after < c.before}
    plan = build_plan(m.index, m.selection, m.groups, stats.ranges, config, choices=choices)
    corrections = bias_corrections(m.float_model, plan, samples)
    plan = build_plan(m.index, m.selection, m.groups, stats.ranges, config, choices=choices,
                      bias_corrections=corrections)
    return plan, ranges, corrections


def _validation(given: FeedSource | None, feeds: FeedSource) -> tuple[list[Feed], str]:
    """The samples the threshold is checked on, and how the report names them."""
    if given is not None:
        samples = list(given)
        return samples, f"{len(samples)} validation samples"
    held = list(feeds.held_out())
    if held:
        return held, f"{len(held)} calibration samples held back (every {HOLDOUT_EVERY}th)"
    samples = list(feeds.take(REUSED_VALIDATION))
    return samples, f"{len(samples)} calibration samples reused (too few to hold any back; pass validation=)"


def _meet(m: PreparedModel, config: QuantConfig, stats: CalibrationStats, ranges: Mapping[int, RangeChoice],
          corrections: Mapping[str, np.ndarray], *, initial: tuple[QuantPlan, Emitted], evaluator: Evaluator,
          samples: list[Feed], progress: bool | None) -> Outcome:
    """Raise the most harmful tied groups until the threshold is met on ``samples``."""
    assert config.threshold is not None
    wide = WIDER[config.activation_type]
    searched = {gid: c.range for gid, c in ranges.items() if c.after < c.before}
    # a raised group takes its whole observed range and a margin: rounding is negligible, clipping is not
    extents = {g.id: widened(extent(g.members, stats.extremes)) for g in initial[0].groups}

    def build(raised: Mapping[int, str]) -> tuple[QuantPlan, Emitted]:
        choices = {gid: GroupChoice(range=searched.get(gid)) for gid in searched}
        for gid, level in raised.items():
            choices[gid] = GroupChoice(range=extents[gid] or searched.get(gid),
                                       qtype=FLOAT if level == "float" else wide, source="raised")
        layers = raised_layers(initial[0], raised)
        floats = frozenset(node for node, level in layers.items() if level == "float")
        wides = frozenset(node for node, level in layers.items() if level == "int16")
        candidate = build_plan(m.index, m.selection, m.groups, stats.ranges, config, choices=choices,
                               float_layers=floats, wide_layers=wides, bias_corrections=corrections)
        return candidate, emit_qdq(m.float_model, candidate)

    def raisable(plan: QuantPlan) -> list[int]:
        """Groups raising may take: quantised, not overridden, with an observed extent to widen."""
        return [g.id for g in plan.groups if g.params.qtype != FLOAT and g.params.source != "override"
                and extents.get(g.id) is not None]

    levels = [p for p in config.precisions if p != "int8"]
    ranking = samples[:HARM_SAMPLES]
    return meet_threshold(evaluator, initial, build,
                          lambda plan: group_harm(m.float_model, plan, raisable(plan), ranking, progress=progress),
                          levels)


def _search(m: PreparedModel, config: QuantConfig, stats: CalibrationStats, plan: QuantPlan, emitted: Emitted, *,
            ranges: Mapping[int, RangeChoice], corrections: Mapping[str, np.ndarray], timer: Timer,
            evaluator: Evaluator, calibrated: Outcome, samples: list[Feed], feeds: FeedSource,
            progress: bool | None) -> tuple[Outcome, MixedOutcome | None]:
    """Meet the threshold: by mixed precision when ``"int4"`` is allowed, else by raising groups.

    ``calibrated`` is the measured outcome of ``plan`` as it is; it is kept when it meets the
    threshold and optimisation changed nothing (raising only).
    """
    if config.mixed:
        with timer("mixed precision"):
            mixed = _mixed(m, config, stats, plan, corrections, evaluator=evaluator,
                           samples=list(feeds.take(SENSITIVITY_SAMPLES)), generation=feeds.generation,
                           progress=progress)
        mixed.outcome.initial_value = calibrated.value
        return mixed.outcome, mixed
    if not ranges and calibrated.met:
        return calibrated, None
    with timer("threshold"):
        outcome = _meet(m, config, stats, ranges, corrections, initial=(plan, emitted), evaluator=evaluator,
                        samples=samples, progress=progress)
    outcome.initial_value = calibrated.value  # what the calibrated int8 model reached
    outcome.steps[:0] = calibrated.steps
    return outcome, None


def _mixed(m: PreparedModel, config: QuantConfig, stats: CalibrationStats, plan: QuantPlan,
           corrections: Mapping[str, np.ndarray], *, evaluator: Evaluator | None, samples: list[Feed],
           generation: tuple[str, ...] | None, progress: bool | None) -> MixedOutcome:
    """A precision per tied group, from the accuracy/cost curve.

    The cheapest point that meets the threshold within the cost limits, or without a threshold
    (``evaluator`` None) the most accurate point within them.
    """
    analysed = tuple(p for p in config.precisions if p != FLOAT)
    report = analyse_plan(m, plan, stats, samples, config=config, precisions=analysed, generation=generation,
                          progress=progress)

    def build(precisions: Mapping[int, str]) -> tuple[QuantPlan, Emitted]:
        candidate = plan_with_precisions(m, plan, stats, config, precisions, corrections=corrections)
        return candidate, emit_qdq(m.float_model, candidate)

    if evaluator is None:
        return choose_within(report, config.precisions, config.cost, build, max_cost=config.max_cost,
                             max_above_int8=config.max_above_int8)
    return search_mixed(evaluator, report, config.precisions, config.cost, build, max_cost=config.max_cost,
                        max_above_int8=config.max_above_int8)


def _layer_outputs(selection: Selection, index: GraphIndex) -> list[str]:
    """The tensors the report measures, one per quantised layer.

    A layer is measured at its first output, or at its folded activation's output; layers whose
    output stays float (MatMul, Gemm) are not measured.
    """
    nodes = {n.name: n for n in index.nodes}
    quantised = set(selection.activations)
    activation_of = {nodes[name].input[0]: nodes[name].output[0] for name in selection.foldable}
    outs = {name: nodes[name].output[0] for name in selection.layers if nodes[name].output}
    return list(dict.fromkeys(activation_of.get(o, o) for o in outs.values() if o in quantised))
