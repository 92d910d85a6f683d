"""Mixed-precision plans: every precision emits a model onnxruntime loads and runs, and the
simulation's figure for a configuration is what the emitted model measures."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import qnnlib
from qnnlib.calibration.collect import CalibrationStats, collect
from qnnlib.calibration.feeds import FeedSource
from qnnlib.config import QuantConfig
from qnnlib.emit.qdq import emit_qdq
from qnnlib.graph.model_io import make_session
from qnnlib.mixed import plan_with_precisions
from qnnlib.plan import LayerPlan, QuantPlan
from qnnlib.planner import build_plan
from qnnlib.prepare import PreparedModel, Timer, calibrated_plan, prepare
from qnnlib.threshold import output_metric
from tests import builders

CONFIG = QuantConfig(optimize=False)


@pytest.fixture(scope="module")
def planned() -> tuple[PreparedModel, QuantPlan, CalibrationStats, list[dict[str, np.ndarray]]]:
    """conv_net (Concat, MaxPool, Add, pools, Gemm), its int8 plan and calibration statistics."""
    model = builders.conv_net()
    calib = builders.calibration(model, 8)
    m = prepare(model, CONFIG, Timer())
    with FeedSource(calib, m.specs) as feeds:
        stats = collect(m.float_model, m.selection.observed(m.index), feeds, CONFIG.calibration, levels=256,
                        symmetric=False, low_bit_levels=16)
    return m, build_plan(m.index, m.selection, m.groups, stats.ranges, CONFIG), stats, calib


def _sqnr(m: PreparedModel, model: onnx.ModelProto, calib: list[dict[str, np.ndarray]]) -> float:
    reference = make_session(m.float_model)
    session = make_session(model)  # default optimisation: what a user's session does
    return output_metric("sqnr", [reference.run(None, f) for f in calib], [session.run(None, f) for f in calib])


@pytest.mark.parametrize("precision", ["int4", "int8", "int16", "float"])
def test_every_precision_loads_and_runs(planned, precision: str) -> None:  # type: ignore[no-untyped-def]
    m, base, stats, calib = planned
    plan = plan_with_precisions(m, base, stats, CONFIG, {g.id: precision for g in base.groups})
    model = emit_qdq(m.float_model, plan).model
    onnx.checker.check_model(model)
    sqnr = _sqnr(m, model, calib)
    expected = {"int4": (5, 40), "int8": (30, 70), "int16": (70, 200), "float": (200, np.inf)}[precision]
    assert expected[0] < sqnr <= expected[1], sqnr
    types = {i.data_type for i in model.graph.initializer}
    if precision == "int4":
        assert onnx.TensorProto.INT4 in types and onnx.TensorProto.UINT4 in types
        assert {layer.precision for layer in plan.layers} == {"int4"}
    if precision == "float":
        assert not any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def test_int4_maxpool_loads_under_default_optimisation(planned) -> None:  # type: ignore[no-untyped-def]
    """onnxruntime 1.31 rejects DQ -> MaxPool -> Q at 4 bits; the emitter leaves that pair out, exactly."""
    m, base, stats, calib = planned
    plan = plan_with_precisions(m, base, stats, CONFIG, {g.id: "int4" for g in base.groups})
    model = emit_qdq(m.float_model, plan).model
    pool = next(n for n in model.graph.node if n.op_type == "MaxPool")
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == pool.output[0] for n in model.graph.node)
    fast = make_session(model, optimization="all")
    plain = make_session(model, optimization="disable")
    for f in calib[:2]:
        np.testing.assert_allclose(fast.run(None, f)[0], plain.run(None, f)[0], rtol=1e-4, atol=1e-5)


def test_int4_concat_with_an_untied_input_quantises_its_output() -> None:
    """A Concat whose narrow input keeps its own grid (retie) writes off the group's 4-bit grid: Q/DQ stays."""
    from tests.test_fuzz import _case, _softmax_concat_model

    model = _softmax_concat_model()
    calib = _case(model).feeds(8, batch=1, seed=1)
    m = prepare(model, CONFIG, Timer())
    with FeedSource(calib, m.specs) as feeds:
        stats = collect(m.float_model, m.selection.observed(m.index), feeds, CONFIG.calibration, levels=256,
                        symmetric=False, low_bit_levels=16)
    m, base = calibrated_plan(m, stats.ranges, CONFIG)
    assert base.group_of("p") is not base.group_of("c")
    plan = plan_with_precisions(m, base, stats, CONFIG, {base.group_of("c").id: "int4"})  # type: ignore[union-attr]
    model = emit_qdq(m.float_model, plan).model
    assert any(n.op_type == "QuantizeLinear" and n.input[0] == "c" for n in model.graph.node)
    assert 5 < _sqnr(m, model, calib) < 40


def test_a_mixed_model_measures_what_the_analysis_says(planned) -> None:  # type: ignore[no-untyped-def]
    m, base, stats, calib = planned
    model = builders.conv_net()
    report = qnnlib.analyze_sensitivity(model, calib, config=CONFIG, precisions=("int4", "int16"), samples=8,
                                        method="measure")
    for precision in ("int4", "int16"):
        plan = plan_with_precisions(m, base, stats, CONFIG, {g.id: precision for g in base.groups})
        measured = _sqnr(m, emit_qdq(m.float_model, plan).model, calib)
        assert measured == pytest.approx(report.all_lowered[precision], abs=0.5), precision


MIXED = ("int4", "int8", "int16", "float")


def _sqnr_config(db: float) -> QuantConfig:
    return QuantConfig(precisions=MIXED, threshold=qnnlib.Threshold(metric="sqnr", min=db))


def test_quantize_meets_the_threshold_at_the_least_measured_cost() -> None:
    model = builders.conv_net()
    calib = builders.calibration(model, 16)
    validation = builders.calibration(model, 6, seed=7)
    result = qnnlib.quantize(model, calib, validation=validation, config=_sqnr_config(30.0))
    t, mixed = result.report.threshold, result.report.mixed
    assert t is not None and mixed is not None and t.met
    # the report's figure is what the returned model measures
    reference = make_session(builders.conv_net())
    session = result.session()
    measured = output_metric("sqnr", [reference.run(None, f) for f in validation],
                             [session.run(None, f) for f in validation])
    assert measured == pytest.approx(t.value, abs=1e-6)
    # the curve: cheapest first, estimates falling (the all-int8 point, added for reference, aside);
    # the chosen point is the cheapest measured one that meets
    costs = [p.cost for p in mixed.curve]
    estimates = [p.estimate for p in mixed.curve if set(p.counts) != {"int8"}]
    assert costs == sorted(costs) and estimates == sorted(estimates, reverse=True)
    assert any(set(p.counts) == {"int8"} and p.value is not None for p in mixed.curve)
    chosen = mixed.chosen
    assert chosen is not None and chosen.met
    assert all(not p.met for p in mixed.curve if p.value is not None and p.cost < chosen.cost)
    assert "<- chosen" in result.report.to_text()


def test_a_loose_threshold_takes_int4_and_a_smaller_model() -> None:
    model = builders.conv_net()
    calib = builders.calibration(model, 16)
    int8 = qnnlib.quantize(model, calib)
    result = qnnlib.quantize(model, calib, config=_sqnr_config(15.0))
    assert result.report.threshold is not None and result.report.threshold.met
    assert result.report.mixed is not None and result.report.mixed.chosen is not None
    assert result.report.mixed.chosen.counts.get("int4", 0) > 0
    assert any(layer.precision == "int4" for layer in result.plan.layers)
    assert len(result.model.SerializeToString()) < len(int8.model.SerializeToString())


def test_int4_needs_a_threshold_or_a_cost_limit() -> None:
    with pytest.raises(qnnlib.ConfigError, match=r"under a threshold or a cost limit"):
        QuantConfig(precisions=MIXED)
    with pytest.raises(qnnlib.ConfigError, match="cost must be"):
        QuantConfig(precisions=MIXED, threshold=qnnlib.Threshold(metric="sqnr", min=20.0), cost="flops")
    with pytest.raises(qnnlib.ConfigError, match="add 'int4' to precisions"):
        QuantConfig(max_above_int8=0.1)
    with pytest.raises(qnnlib.ConfigError, match="from 0 to 1"):
        QuantConfig(precisions=MIXED, max_above_int8=10)
    with pytest.raises(qnnlib.ConfigError, match="positive"):
        QuantConfig(precisions=MIXED, max_cost=-1.0)


def test_a_point_by_cost_without_a_threshold() -> None:
    """At most 10% of layers above int8 and at most 60% of the int8 weight bytes: the most accurate such point."""
    model = builders.conv_net()
    calib = builders.calibration(model, 16)
    int8 = qnnlib.quantize(model, calib, config=QuantConfig(precisions=MIXED, max_above_int8=0.0,
                                                            max_cost=1e12))
    int8_cost = next(p.cost for p in int8.report.mixed.curve if set(p.counts) == {"int8"})  # type: ignore[union-attr]
    limit = 0.6 * int8_cost
    result = qnnlib.quantize(model, calib, config=QuantConfig(precisions=MIXED, max_above_int8=0.1, max_cost=limit))
    mixed = result.report.mixed
    assert mixed is not None and result.report.threshold is None
    chosen = mixed.chosen
    assert chosen is not None and chosen.value is None and chosen.cost <= limit
    weighted = _weighted_layers(result.plan)
    above = [layer for layer in weighted if layer.precision in ("int16", "float")]
    assert len(above) <= 0.1 * len(weighted)
    assert any(layer.precision == "int4" for layer in result.plan.layers)
    # the most accurate within the limits: every curve point is within them, none estimates less
    assert all(p.cost <= limit for p in mixed.curve)
    assert chosen.estimate == min(p.estimate for p in mixed.curve)
    # the report names every layer the chosen point took above int8, and why
    above_plan = {layer.node for layer in result.plan.layers if layer.precision in ("int16", "float")}
    assert {x.node for x in result.report.layers_above_int8} == above_plan
    assert all(f"put at {x.precision} by mixed precision" in x.raised for x in result.report.layers_above_int8)
    onnx.checker.check_model(result.model)
    result.session().run(None, calib[0])


def test_an_impossible_cost_limit_is_a_config_error() -> None:
    model = builders.conv_net()
    with pytest.raises(qnnlib.ConfigError, match=r"no precision choice keeps within max_cost=1"):
        qnnlib.quantize(model, builders.calibration(model, 8), config=QuantConfig(precisions=MIXED, max_cost=1.0))


def test_a_threshold_within_a_cost_limit() -> None:
    model = builders.conv_net()
    calib = builders.calibration(model, 16)
    config = QuantConfig(precisions=MIXED, threshold=qnnlib.Threshold(metric="sqnr", min=25.0), max_above_int8=0.0)
    result = qnnlib.quantize(model, calib, config=config)
    assert result.report.mixed is not None and result.report.threshold is not None
    assert result.report.threshold.met
    # only weighted layers count: a group without weights (a pooling's input) may still be int16
    assert not any(layer.precision in ("int16", "float") for layer in _weighted_layers(result.plan))


def _weighted_layers(plan: QuantPlan) -> list[LayerPlan]:
    nodes = {w.node for w in plan.weights if w.kind == "weight"}
    return [layer for layer in plan.layers if layer.node in nodes]


def test_bitops_cost_counts_multiply_accumulates() -> None:
    """``"bitops"``: each group costs its layers' MACs times bits squared; a conv's MACs are weights x positions."""
    model = builders.conv_net()
    calib = builders.calibration(model, 8)
    report = qnnlib.analyze_sensitivity(model, calib, config=QuantConfig(optimize=False), precisions=("int4", "int8"))
    first = next(g for g in report.groups if g.tensor == "input")
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and n.input[0] == "input")
    weights = next(int(np.prod(t.dims)) for t in model.graph.initializer if t.name == conv.input[1])
    assert first.macs == weights * 16 * 16  # 3x3 "same" convolution on 16x16
    table = report.cost_table("bitops")[first.group]
    assert table["int8"] == pytest.approx(first.macs * 64, rel=1e-6)
    assert table["int4"] == pytest.approx(first.macs * 16, rel=1e-6)
    config = QuantConfig(precisions=MIXED, threshold=qnnlib.Threshold(metric="sqnr", min=15.0), cost="bitops")
    result = qnnlib.quantize(model, calib, config=config)
    assert result.report.mixed is not None and result.report.config["cost"] == "bitops"


def test_a_callable_cost_is_minimised() -> None:
    """A cost that makes int16 free and int4 dear: the search then never takes int4."""
    model = builders.conv_net()
    calib = builders.calibration(model, 16)

    def cost(group, precision):  # type: ignore[no-untyped-def]
        return {"int4": 10.0, "int8": 1.0, "int16": 0.0, "float": 5.0}[precision]

    config = QuantConfig(precisions=MIXED, threshold=qnnlib.Threshold(metric="sqnr", min=15.0), cost=cost)
    result = qnnlib.quantize(model, calib, config=config)
    assert result.report.mixed is not None and result.report.mixed.chosen is not None
    assert set(result.report.mixed.chosen.counts) == {"int16"}


class _OnlyGroupOneMatters:
    """A stand-in evaluator: the 'model' is the choice itself; met while group 1 stays at int16."""

    def value(self, model: dict[int, str]) -> float:
        return 1.0 if model[1] == "int16" else 0.0

    def met(self, value: float) -> bool:
        return value >= 1.0


def test_refinement_lowers_every_group_the_threshold_does_not_need() -> None:
    """The curve point raised three groups; real runs show only group 1 needs it. int8 stays int8."""
    from types import SimpleNamespace

    from qnnlib.optimize.mixed_search import CurvePoint, _refine

    costs = {g: {"int4": 1.0, "int8": 2.0, "int16": 4.0} for g in range(4)}
    errors = {g: {"int4": 0.1, "int8": 0.01, "int16": 0.0} for g in range(4)}
    start = CurvePoint({0: "int16", 1: "int16", 2: "int16", 3: "int8"}, 14.0, 0.01, 1.0, True)

    def build(choice: dict[int, str]) -> tuple[object, SimpleNamespace]:
        return None, SimpleNamespace(model=dict(choice))

    trials: list[CurvePoint] = []
    chosen, (_, emitted) = _refine(start, build(start.precisions), trials, errors=errors, costs=costs, limits=(),
                                   evaluator=_OnlyGroupOneMatters(), build=build)  # type: ignore[arg-type]
    assert chosen.precisions == {0: "int8", 1: "int16", 2: "int8", 3: "int8"} and chosen.cost == 10.0
    assert emitted.model == chosen.precisions
    assert len(trials) == 3 and [t.met for t in trials].count(True) == 2
