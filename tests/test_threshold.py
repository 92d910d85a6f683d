"""The accuracy threshold: layer-wise range search, precision raising, the eval_fn path, strictness."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import qnnlib
from qnnlib.emit.simulation import dequantised_weight
from qnnlib.graph.index import GraphIndex
from qnnlib.graph.model_io import load_model
from qnnlib.graph.normalize import normalize
from qnnlib.numerics import affine
from qnnlib.numerics.qtypes import UINT8
from qnnlib.optimize.bias import bias_corrections
from qnnlib.optimize.error import region_outputs
from qnnlib.optimize.raising import group_harm, raised_layers, raising_order
from qnnlib.plan import ActivationParams, GroupPlan, LayerPlan, QuantPlan
from tests import builders
from tests.conftest import run, sqnr_db


def outlier_model() -> onnx.ModelProto:
    """Channel 0 of the first Conv carries huge activations that the second Conv all but ignores.

    Min-max stretches the shared range over channel 0, so the channels that matter get a coarse step;
    the range search judges the range at the second Conv and clips channel 0 instead.
    """
    b = builders.GraphBuilder(21)
    w1 = b.rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32)
    w1[0] *= 60.0
    r = b.op("Relu", [b.op("Conv", ["x", b.const(w1, "w1")], pads=[1, 1, 1, 1])])  # type: ignore[list-item]
    w2 = b.rng.normal(0, 0.4, (8, 8, 1, 1)).astype(np.float32)
    w2[:, 0] *= 0.002
    b.op("Conv", [r, b.const(w2, "w2")])  # type: ignore[list-item]
    b.nodes[-1].output[0] = "y"
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])])


def held_out_sqnr(model: onnx.ModelProto, quantised: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> float:
    ref = np.concatenate([run(model, f)[0].ravel() for f in feeds])
    return sqnr_db(ref, np.concatenate([run(quantised, f)[0].ravel() for f in feeds]))


# Measured when written: min-max 10.7 dB, min-max + range search 22.9 dB on these held-out inputs.
OUTLIER_THRESHOLD = qnnlib.Threshold(metric="sqnr", min=18.0)


def test_range_search_meets_a_threshold_that_minmax_misses() -> None:
    model = outlier_model()
    calib, held = builders.calibration(model, 16), builders.calibration(model, 8, seed=7)
    int8_only = ("int8",)
    plain = qnnlib.quantize(model, calib, config=qnnlib.QuantConfig(method="minmax", threshold=OUTLIER_THRESHOLD,
                                                                     optimize=False, precisions=int8_only))
    assert plain.report.threshold_met is False
    assert held_out_sqnr(model, plain.model, held) < 18.0
    searched = qnnlib.quantize(model, calib, config=qnnlib.QuantConfig(method="minmax", threshold=OUTLIER_THRESHOLD,
                                                                       precisions=int8_only))
    report = searched.report
    assert report.threshold_met is True and report.threshold is not None
    assert report.threshold.value >= 18.0 and not report.threshold.raised
    assert held_out_sqnr(model, searched.model, held) > 18.0
    relu = next(layer for layer in report.layers if layer.op_type == "Relu")
    assert relu.error_after_db is not None and relu.error_before_db is not None
    assert relu.error_after_db > relu.error_before_db + 3  # the searched range costs the reader much less
    assert relu.range is not None and relu.range[1] < max(g.range[1] for g in plain.report.groups)


def test_impossible_threshold_returns_the_best_model() -> None:
    model = builders.conv_net()
    config = qnnlib.QuantConfig(threshold=qnnlib.Threshold(metric="max_abs", max=0.0), precisions=("int8", "int16"))
    result = qnnlib.quantize(model, builders.calibration(model, 8), config=config)
    report = result.report
    assert report.threshold_met is False and report.threshold is not None
    assert report.threshold.value > 0
    values = [s.value for s in report.threshold.steps]
    assert report.threshold.value == min(values)  # the best candidate measured was kept
    assert result.session().run(None, builders.calibration(model, 1)[0])[0].shape == (1, 10)
    assert "NOT MET" in report.to_text()
    strict = qnnlib.QuantConfig(threshold=qnnlib.Threshold(metric="max_abs", max=0.0, strict=True),
                                precisions=("int8", "int16"))
    with pytest.raises(qnnlib.ThresholdError, match="not met"):
        qnnlib.quantize(model, builders.calibration(model, 8), config=strict)


def test_raising_meets_a_threshold_int8_misses() -> None:
    model = builders.conv_net()
    calib = builders.calibration(model, 12)
    config = qnnlib.QuantConfig(threshold=qnnlib.Threshold(metric="sqnr", min=50.0))  # int8 reaches about 40 dB
    report = qnnlib.quantize(model, calib, config=config).report
    assert report.threshold_met is True and report.threshold is not None
    assert report.threshold.initial_value < 50.0 <= report.threshold.value
    assert 0 < len(report.threshold.raised) < len([x for x in report.layers if x.precision != "float" or x.raised])
    raised = [x for x in report.layers if x.raised]
    assert raised and all(x.precision in ("int16", "float") for x in raised)
    # the unit raised is a tied group: every layer above int8 reads or writes a raised tensor
    raised_groups = {g.id for g in report.groups if g.members[0] in report.threshold.raised_tensors}
    assert raised_groups and all(x.group in raised_groups or "reads" in x.raised for x in raised)
    assert all(x.raised.split("'")[1] in report.threshold.raised_tensors for x in raised)  # why: the tensor named
    assert "tensors raised" in report.to_text()


def _chain_plan() -> QuantPlan:
    """a -> Conv1 -> b -> Conv2 -> c -> Conv3 (float output), with a Relu reading c too; one group per tensor."""
    params = ActivationParams("uint8", 0.1, 0, (0.0, 25.5))
    groups = tuple(GroupPlan(i, (name,), (), params) for i, name in enumerate(["a", "b", "c", "d"]))
    layers = (LayerPlan("Conv1", "Conv", "int8", ("a",), ("b",)), LayerPlan("Conv2", "Conv", "int8", ("b",), ("c",)),
              LayerPlan("Conv3", "Conv", "int8", ("c",), ()), LayerPlan("Relu", "Relu", "int8", ("c",), ("d",)))
    return QuantPlan("uint8", "int8", groups, (), layers)


def test_raised_layers_are_the_readers_and_writers_of_raised_groups() -> None:
    plan = _chain_plan()
    assert raised_layers(plan, {1: "int16"}) == {"Conv1": "int16", "Conv2": "int16"}
    assert raised_layers(plan, {1: "int16", 2: "float"}) == {"Conv1": "int16", "Conv2": "float", "Conv3": "float",
                                                             "Relu": "float"}


def test_raising_order_weighs_harm_by_the_compute_layers_a_raise_costs() -> None:
    plan = _chain_plan()
    # by harm alone: c, b, a; but c takes two Convs off integer kernels and a only one, and once a is
    # raised, b costs one more Conv (Conv2), then c one more (Conv3); d harms nothing
    harm = {0: 0.2, 1: 0.3, 2: 0.35, 3: -0.01}
    assert raising_order(plan, harm) == [0, 1, 2, 3]
    # c first (0.35 for two Convs beats 0.3 for two), then b costs only Conv1: 0.3 beats a's 0.05
    assert raising_order(plan, {0: 0.05, 1: 0.3, 2: 0.35, 3: 0.0}) == [2, 1, 0, 3]


def test_group_harm_finds_the_group_that_hurts(capsys: pytest.CaptureFixture[str]) -> None:
    model = outlier_model()
    calib = builders.calibration(model, 8)
    plan = qnnlib.quantize(model, calib, config=qnnlib.QuantConfig(method="minmax")).plan
    wide = {g.id: ActivationParams("uint16", g.params.scale / 256, g.params.zero_point * 256, g.params.range)
            for g in plan.groups}
    capsys.readouterr()
    harm = group_harm(model, plan, wide, calib[:4], progress=True)
    runs = len(wide) * 4  # every group on every feed: too few groups to screen
    assert f"ranking groups by harm [{'#' * 30}] {runs}/{runs}" in capsys.readouterr().err
    relu = next(layer for layer in plan.layers if layer.op_type == "Relu")
    relu_group = plan.group_of(relu.outputs[0])
    assert relu_group is not None
    # the min-max Relu range is stretched by the outlier channel: it alone gives most of the error
    assert max(harm, key=lambda g: harm[g]) == relu_group.id
    assert harm[relu_group.id] > 0.5


def lost_twice_model() -> onnx.ModelProto:
    """x -> Conv (identity) -> b -> Conv (identity) -> c -> Conv (channel 1 only) -> y, channel 0 huge.

    Channel 1 (below 0.1) is less than half a step of the per-tensor 8-bit grid that channel 0 (up
    to 100) sets on x, b and c, so each of the three rounds it to zero on its own: the output is lost
    with any one of them quantised, and switching any one back to float leaves it lost.
    """
    b = builders.GraphBuilder(21)
    eye = np.eye(2, dtype=np.float32).reshape(2, 2, 1, 1)
    t = b.op("Conv", ["x", b.const(eye, "w1")])  # type: ignore[list-item]
    t = b.op("Conv", [t, b.const(eye.copy(), "w2")])  # type: ignore[list-item]
    b.op("Conv", [t, b.const(np.array([0.0, 1.0], np.float32).reshape(1, 2, 1, 1), "w3")])  # type: ignore[list-item]
    b.nodes[-1].output[0] = "y"
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])])


def test_group_harm_sees_each_of_several_points_that_ruin_the_output_alone() -> None:
    model = lost_twice_model()
    rng = np.random.default_rng(3)
    calib = [{"x": np.concatenate([rng.uniform(50, 100, (1, 1, 4, 4)), rng.uniform(0.01, 0.09, (1, 1, 4, 4))],
                                  axis=1).astype(np.float32)} for _ in range(8)]
    plan = qnnlib.quantize(model, calib, config=qnnlib.QuantConfig(method="minmax")).plan
    ruinous = {g.id for g in plan.groups if g.members[0] != "y"}
    assert len(ruinous) == 3
    harm = group_harm(model, plan, [g.id for g in plan.groups], calib[:4], progress=False)
    # leave one out would score each of them 0: switching one back leaves channel 1 lost to the others
    assert all(harm[g] > 0.9 for g in ruinous)
    assert all(harm[g] < 0.1 for g in harm if g not in ruinous)


def test_group_harm_screens_many_groups_on_one_feed_and_measures_the_worst_on_all() -> None:
    model = outlier_model()
    calib = builders.calibration(model, 8)
    plan = qnnlib.quantize(model, calib, config=qnnlib.QuantConfig(method="minmax")).plan
    gids = [g.id for g in plan.groups]
    on_all = group_harm(model, plan, gids, calib[:4], keep=len(gids), progress=False)
    on_first = group_harm(model, plan, gids, calib[:1], progress=False)
    screened = group_harm(model, plan, gids, calib[:4], keep=2, progress=False)
    assert len(gids) == 3 and all(on_all[g] != pytest.approx(on_first[g], rel=1e-3) for g in gids)
    # the two worst on the first feed are measured again on all four; the third keeps its first-feed harm
    top = sorted(gids, key=lambda g: -on_first[g])[:2]
    assert all(screened[g] == pytest.approx(on_all[g], rel=1e-9) for g in top)
    assert all(screened[g] == pytest.approx(on_first[g], rel=1e-9) for g in gids if g not in top)
    # on two feeds, screening 3 groups to 2 would take 3 + 2 * 2 runs against 3 * 2: not done
    on_two = group_harm(model, plan, gids, calib[:2], keep=len(gids), progress=False)
    assert group_harm(model, plan, gids, calib[:2], keep=2, progress=False) == on_two
    assert any(on_two[g] != pytest.approx(on_first[g], rel=1e-3) for g in gids if g not in top)


def test_progress_bars_of_the_long_steps_only_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    model = builders.conv_net()
    calib = builders.calibration(model, 8)
    config = qnnlib.QuantConfig(optimize=True)
    capsys.readouterr()
    qnnlib.quantize(model, calib, config=config, progress=False)
    assert capsys.readouterr().err == ""  # pytest's captured stderr is no terminal either
    qnnlib.quantize(model, calib, config=config, progress=True)
    assert "range search [" in capsys.readouterr().err


def test_eval_fn_path() -> None:
    model = builders.mlp()
    data = builders.calibration(model, 8, seed=3)

    def score(session) -> float:  # type: ignore[no-untyped-def]
        """Negative mean squared error against fixed targets: higher is better."""
        errors = [np.mean((session.run(None, f)[0] - t) ** 2) for f, t in zip(data, targets, strict=True)]
        return -float(np.mean(errors))

    targets = [run(model, f)[0] for f in data]
    calls: list[float] = []

    def tracked(session) -> float:  # type: ignore[no-untyped-def]
        calls.append(score(session))
        return calls[-1]

    config = qnnlib.QuantConfig(threshold=qnnlib.Threshold(eval_fn=tracked, max_drop=1e-5))
    report = qnnlib.quantize(model, builders.calibration(model, 12), config=config).report
    assert report.threshold is not None and report.threshold.float_score == pytest.approx(0.0, abs=1e-12)
    assert len(calls) >= 2  # the float model and at least one candidate
    assert report.threshold_met is True and report.threshold.value >= -1e-5


def test_threshold_met_by_calibration_changes_nothing() -> None:
    model = builders.conv_net()
    calib = builders.calibration(model, 8)
    plain = qnnlib.quantize(model, calib)
    held = builders.calibration(model, 8, seed=11)
    config = qnnlib.QuantConfig(threshold=qnnlib.Threshold(metric="cosine", min=0.99))
    result = qnnlib.quantize(model, calib, validation=held, config=config)
    assert result.report.threshold_met is True and result.report.threshold is not None
    assert not result.report.threshold.raised and len(result.report.threshold.steps) == 1
    assert result.report.threshold.validation == "8 validation samples"
    assert "optimize" not in result.report.timings  # nothing searched when calibration already meets it
    # only the held-back calibration samples differ: with validation given, the plan is the plain one
    assert result.plan == plain.plan


def test_held_back_validation_is_reported() -> None:
    model = builders.conv_net()
    config = qnnlib.QuantConfig(threshold=qnnlib.Threshold(metric="cosine", min=0.9))
    report = qnnlib.quantize(model, builders.calibration(model, 12), config=config).report
    assert report.threshold is not None and "held back" in report.threshold.validation
    assert report.calibration.samples == 9  # every 4th of 12 held back
    few = qnnlib.quantize(model, builders.calibration(model, 2), config=config).report
    assert few.threshold is not None and "reused" in few.threshold.validation


def test_optimize_without_threshold_never_hurts_the_search_objective() -> None:
    model = outlier_model()
    result = qnnlib.quantize(model, builders.calibration(model, 16), config=qnnlib.QuantConfig(optimize=True))
    searched = [x for x in result.report.layers if x.error_after_db is not None]
    assert searched and all(x.error_after_db >= x.error_before_db for x in searched)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of metric"),
        ({"metric": "cosine"}, "needs min"),
        ({"metric": "max_abs", "min": 1.0}, "needs max"),
        ({"metric": "bleu", "min": 1.0}, "unknown threshold metric"),
        ({"metric": "cosine", "min": 2.0}, r"lies in \[-1, 1\]"),
        ({"eval_fn": len}, "needs max_drop"),
        ({"eval_fn": len, "max_drop": -1}, "needs max_drop >= 0"),
        ({"metric": "sqnr", "min": 20, "max_drop": 0.1}, "max_drop goes with eval_fn"),
    ],
)
def test_invalid_threshold(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(qnnlib.ConfigError, match=match):
        qnnlib.Threshold(**kwargs)  # type: ignore[arg-type]


def test_invalid_threshold_config() -> None:
    with pytest.raises(qnnlib.ConfigError, match="precisions must include 'int8'"):
        qnnlib.QuantConfig(precisions=("int16",))
    with pytest.raises(qnnlib.ConfigError, match="objective"):
        qnnlib.QuantConfig(objective="l1")
    with pytest.raises(qnnlib.ConfigError, match=r"threshold must be a qnnlib\.Threshold"):
        qnnlib.QuantConfig(threshold=0.99)  # type: ignore[arg-type]


def test_bias_correction_is_the_mean_shift_of_the_quantised_weights() -> None:
    model = builders.mlp()
    rng = np.random.default_rng(0)
    calib = [{"x": rng.normal(size=(32, 32)).astype(np.float32)} for _ in range(8)]  # 32 rows per sample
    result = qnnlib.quantize(model, calib, config=qnnlib.QuantConfig(optimize=True))
    plan = result.plan
    normalized = normalize(load_model(model)).model
    corrections = bias_corrections(normalized, plan, calib[:4])
    assert not bias_corrections(normalized, plan, [{"x": f["x"][:1]} for f in calib[:4]])  # 4 rows: noise
    first = next(layer for layer in plan.layers if layer.inputs == ("x",))
    wp = next(w for w in plan.weights_of(first.node) if w.kind == "weight")
    node = next(n for n in normalized.graph.node if n.name == first.node)
    assert node.op_type == "Gemm"
    w = GraphIndex(normalized).constant(wp.tensor).astype(np.float32)
    error = w - dequantised_weight(w, wp)  # in the model's layout
    if any(a.name == "transB" and a.i for a in node.attribute):
        error = error.T
    p = plan.params("x")
    x_q = [affine.fake_quantize(f["x"], p.scale, p.zero_point, UINT8) for f in calib[:4]]
    expected = np.mean([(x.astype(np.float64) @ error).mean(axis=0) for x in x_q], axis=0)
    np.testing.assert_allclose(corrections[first.node], expected, rtol=1e-4, atol=1e-6)
    assert np.abs(expected).max() > 0
    # the plan carries the correction of every 8-bit layer's bias, and the emitted bias includes it
    bias = next(w for w in plan.weights_of(first.node) if w.kind == "bias")
    np.testing.assert_allclose(bias.correction, corrections[first.node], rtol=1e-3, atol=1e-6)
    assert qnnlib.QuantPlan.from_json(plan.to_json()) == plan


def test_error_is_measured_where_the_quantised_region_ends() -> None:
    b = builders.GraphBuilder(3)
    logits = b.conv(b.conv("x", 3, 8), 8, 4, relu=False)
    b.op("Softmax", [logits], axis=1)
    b.nodes[-1].output[0] = "p"
    model = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                    [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 4, 8, 8])])
    result = qnnlib.quantize(model, builders.calibration(model, 4))
    normalized = normalize(load_model(model)).model
    assert not result.plan.is_quantized("p")  # the Softmax tail stays float
    assert region_outputs(normalized, result.plan) == [logits]
    assert region_outputs(normalized, replace(result.plan, groups=())) == ["p"]  # nothing quantised behind it
