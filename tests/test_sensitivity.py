"""Sensitivity analysis: the fragile group is found, one simulation serves every configuration."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import qnnlib
from qnnlib import sensitivity
from qnnlib.progress import Progress
from tests import builders


def fragile_model() -> onnx.ModelProto:
    """Four convolutions; the second writes one huge channel that the third all but ignores.

    The huge channel stretches the per-tensor range of the group between the second and third
    convolution, so the channels that matter get a coarse step there: lowering that group hurts
    most, and lowering any other hurts little.
    """
    b = builders.GraphBuilder(5)
    x = b.conv("x", 3, 8)
    w2 = b.rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32)
    w2[0] *= 80.0
    fragile = b.op("Relu", [b.op("Conv", [x, b.const(w2, "w")], pads=[1, 1, 1, 1])])  # type: ignore[list-item]
    w3 = b.rng.normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32)
    w3[:, 0] *= 0.001
    y = b.op("Relu", [b.op("Conv", [fragile, b.const(w3, "w")])])  # type: ignore[list-item]
    b.conv(y, 8, 4, relu=False)  # type: ignore[arg-type]
    b.nodes[-1].output[0] = "y"
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])])


@pytest.mark.parametrize("method", ["estimate", "measure"])
def test_the_fragile_group_is_the_most_sensitive(method: str) -> None:
    model = fragile_model()
    report = qnnlib.analyze_sensitivity(model, builders.calibration(model, 16), precisions=("int4", "int8"),
                                        method=method)
    assert report.method == method
    fragile = _relu_after_second_conv(model)
    for precision in ("int4", "int8"):
        ranking = report.ranking(precision)
        assert fragile in ranking[0].members, [g.tensor for g in ranking]
        # everything but the fragile group lowered is better than everything lowered
        assert ranking[0].all_but[precision] > report.all_lowered[precision]
    # more bits, less error, for every group
    for g in report.groups:
        assert g.only["int8"] > g.only["int4"]
        assert g.only_error["int8"] < g.only_error["int4"]


def _relu_after_second_conv(model: onnx.ModelProto) -> str:
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    return next(n.output[0] for n in model.graph.node if n.op_type == "Relu" and n.input[0] == convs[1].output[0])


def test_one_simulation_serves_every_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    original = sensitivity.build_simulation

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        built.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(sensitivity, "build_simulation", counting)
    model = builders.conv_net()
    report = qnnlib.analyze_sensitivity(model, builders.calibration(model, 8), samples=2, method="measure")
    assert len(built) == 1 and len(report.groups) > 3
    assert report.samples == 2 and not report.generated
    data = json.loads(report.to_json())
    assert data["precisions"] == ["int4", "int8", "int16"] and len(data["groups"]) == len(report.groups)
    assert "int16 all but" in report.to_text() and "<table>" in report._repr_html_()
    assert report.to_text().startswith("sensitivity (sqnr, measured)") and "estimated:" not in report.to_text()


def test_eval_fn_gets_a_session_on_the_configuration() -> None:
    model = fragile_model()
    calib = builders.calibration(model, 8)
    seen: list[float] = []

    def negative_error(session) -> float:  # type: ignore[no-untyped-def]
        assert [i.name for i in session.get_inputs()] == ["x"]
        value = -float(np.abs(session.run(None, calib[0])[0]).sum())
        seen.append(value)
        return value

    config = qnnlib.QuantConfig(threshold=qnnlib.Threshold(eval_fn=negative_error, max_drop=1.0))
    report = qnnlib.analyze_sensitivity(model, calib, config=config, precisions=("int8",), samples=2,
                                        method="measure")
    assert report.metric == "eval_fn" and report.higher_is_better
    assert len(seen) == 2 * len(report.groups) + 1 and len(set(seen)) > 1  # configurations differ


def test_generated_inputs_are_reported() -> None:
    report = qnnlib.analyze_sensitivity(builders.mlp(), None, precisions=("int8",), samples=2)
    assert report.generated and "generated inputs" in report.to_text()
    assert report.to_text().startswith("sensitivity (sqnr, estimated)") and "method='measure'" in report.to_text()


@pytest.mark.parametrize(("kwargs", "match"), [({"precisions": ("int3",)}, "precisions must be"),
                                               ({"precisions": ()}, "precisions must be"),
                                               ({"samples": 0}, "samples must be"),
                                               ({"method": "guess"}, "method must be")])
def test_invalid_arguments(kwargs: dict[str, object], match: str) -> None:
    model = builders.mlp()
    with pytest.raises(qnnlib.ConfigError, match=match):
        qnnlib.analyze_sensitivity(model, builders.calibration(model, 2), **kwargs)  # type: ignore[arg-type]


def test_progress_bar_draws_only_when_enabled() -> None:
    stream = io.StringIO()
    bar = Progress(3, "work", stream=stream)  # a StringIO is no terminal
    bar.advance(3)
    bar.close()
    assert stream.getvalue() == ""
    bar = Progress(3, "work", enabled=True, stream=stream)
    bar.advance(3)
    bar.close()
    assert "3/3" in stream.getvalue()


def test_progress_bar_says_the_time_left_at_the_rate_so_far() -> None:
    bar = Progress(4, "work", enabled=False)
    bar.done = 1
    assert bar.line(10.0) == f"work [{'#' * 7}{'.' * 23}] 1/4 10s, about 30s left"
    bar.done = 4
    assert bar.line(40.0) == f"work [{'#' * 30}] 4/4 40s"  # finished: no time left shown


def test_the_assignment_keeps_the_fragile_group_precise() -> None:
    model = fragile_model()
    report = qnnlib.analyze_sensitivity(model, builders.calibration(model, 16), precisions=("int4", "int8"))
    fragile = next(g for g in report.groups if _relu_after_second_conv(model) in g.members)
    budget = 0.5 * fragile.only_error["int4"]  # the fragile group cannot stay at int4
    choice = report.assign(budget)
    assert choice is not None and choice.estimate <= budget
    assert choice.precisions[fragile.group] != "int4"
    cheap = [g.group for g in report.groups if g.group != fragile.group and g.only_error["int4"] < budget / 10]
    assert cheap and all(choice.precisions[g] == "int4" for g in cheap)


def test_the_estimate_follows_the_measurement() -> None:
    """On a small CNN the estimated output errors stay within a factor of 4 of the measured ones,
    and the estimate needs no simulation model."""
    model = builders.conv_net()
    calib = builders.calibration(model, 8)
    measured = qnnlib.analyze_sensitivity(model, calib, samples=4, method="measure")
    estimated = qnnlib.analyze_sensitivity(model, calib, samples=4, method="estimate")
    assert [g.group for g in measured.groups] == [g.group for g in estimated.groups]
    for m, e in zip(measured.groups, estimated.groups, strict=True):
        for p in ("int4", "int8", "int16"):
            assert 0.25 < e.only_error[p] / m.only_error[p] < 4.0, (m.tensor, p)
    for p in ("int4", "int8"):
        assert 0.25 < estimated.all_lowered_error[p] / measured.all_lowered_error[p] < 4.0
    assert estimated.metric == "sqnr" and estimated.method == "estimate"
