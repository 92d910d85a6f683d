"""The report's error diagnosis: the figures against direct computation, and each cause on a model built for it."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import qnnlib
from qnnlib.calibration.histogram import StreamingHistogram
from qnnlib.diagnosis import LayerEvidence, diagnose, tensor_error, values_error
from qnnlib.numerics.affine import activation_qparams, weight_error
from qnnlib.numerics.qtypes import qtype
from qnnlib.plan import ActivationParams
from qnnlib.report import LayerReport, Report
from tests.builders import GraphBuilder, calibration, conv_net


def _params(lo: float, hi: float, name: str = "uint8") -> ActivationParams:
    scale, zero_point = activation_qparams(lo, hi, qtype(name))
    return ActivationParams(name, float(scale), int(zero_point), (lo, hi))


@pytest.mark.parametrize(("lo", "hi", "name"), [(-3.0, 3.0, "uint8"), (-1.5, 2.0, "uint8"), (-6.0, 6.0, "uint16"),
                                                 (-2.0, 2.0, "uint4")])
def test_histogram_error_follows_the_values(lo: float, hi: float, name: str) -> None:
    """Clipping and rounding from a histogram are within 15% of the exact figures for the same values."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 200_000), rng.standard_t(2, 2_000), np.zeros(5_000)]).astype(np.float32)
    hist = StreamingHistogram(2048)
    for part in np.array_split(x, 7):
        hist.update(part)
    params = _params(lo, hi, name)
    got, exact = tensor_error(hist, params), values_error(x, params)
    assert got is not None and exact is not None
    assert got.clipped == pytest.approx(exact.clipped, rel=0.05)
    assert got.clipping == pytest.approx(exact.clipping, rel=0.15)
    assert got.rounding == pytest.approx(exact.rounding, rel=0.15)
    assert got.rms == pytest.approx(exact.rms, rel=0.02)


def test_values_error_is_the_quantisation_error() -> None:
    x = np.array([-2.0, -0.3, 0.0, 0.7, 1.1, 5.0])
    params = _params(-1.0, 2.0)
    s, z = params.scale, params.zero_point
    dq = s * (np.clip(np.rint(x / s) + z, 0, 255) - z)
    err = values_error(x, params)
    assert err is not None
    power = float(np.sum(x * x))
    clipped = (x < s * (0 - z)) | (x > s * (255 - z))
    assert err.clipped == pytest.approx(clipped.mean())
    assert err.clipping == pytest.approx(np.sum((x - dq)[clipped] ** 2) / power)
    assert err.total == pytest.approx(np.sum((x - dq) ** 2) / power)


def test_weight_error_formula() -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, (6, 3, 3, 3)).astype(np.float32)
    scales = (np.abs(w).reshape(6, -1).max(axis=1) / 127).astype(np.float32)
    q = np.clip(np.rint(w / scales[:, None, None, None]), -127, 127) * scales[:, None, None, None]
    assert weight_error(w, scales, 0, 127) == pytest.approx(np.sum((w - q) ** 2) / np.sum(w * w), rel=1e-5)
    assert weight_error(np.zeros((2, 2), np.float32), np.ones(2, np.float32), 0, 127) == 0.0


def _evidence(measured: float, *, output_known: bool = True) -> LayerEvidence:
    return LayerEvidence("n", measured, {"a": 1e-4, "b": 3e-4}, (2e-4, 8), output_known=output_known)


def test_the_cause_is_the_largest_source_and_amplification_the_rest() -> None:
    d = diagnose(_evidence(6e-4))
    assert d.cause == "inputs" and d.worst_input == "b"
    assert d.sources["amplification"] == pytest.approx(1e-4)
    d = diagnose(_evidence(5e-3))
    assert d.cause == "amplification" and d.sources["amplification"] == pytest.approx(4.5e-3)
    # an output grid whose error is unknown: the excess is not called amplification
    d = diagnose(_evidence(5e-3, output_known=False))
    assert d.cause == "inputs" and d.sources["amplification"] == 0.0 and "not known" in d.explanation
    assert diagnose(_evidence(0.0)).cause == "none"


# -- each cause on a model built for it -------------------------------------------------------------

def _single_conv(weights: np.ndarray, *, relu: bool = False, pool: bool = False) -> onnx.ModelProto:
    b = GraphBuilder(0)
    c_out, c_in = weights.shape[:2]
    y = b.op("Conv", ["x", b.const(weights.astype(np.float32), "w"), b.const(np.zeros(c_out, np.float32), "b")])
    if relu:
        y = b.op("Relu", [y])
    if pool:  # a MaxPool inside the quantised region: a conv reads it
        y = b.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
        y = b.op("Conv", [y, b.const(np.eye(c_out, dtype=np.float32).reshape(c_out, c_out, 1, 1), "w"),
                          b.const(np.zeros(c_out, np.float32), "b")])
    b.nodes[-1].output[0] = "y"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, 8, 8])
    side = 4 if pool else 8
    return b.model([x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_out, side, side])])


def _layer(report: Report, op_type: str) -> LayerReport:
    return next(x for x in report.layers if x.op_type == op_type)


def test_clipped_outliers_are_named_with_the_range_that_keeps_them() -> None:
    """Rare huge outputs past a percentile range: the conv's cause is output clipping, and MaxPool inherits it."""
    rng = np.random.default_rng(2)
    w = np.eye(4)
    w[0, 0] = 400.0  # a sparse input channel becomes rare huge outputs; the input itself stays narrow
    model = _single_conv(w.reshape(4, 4, 1, 1), pool=True)
    calib = []
    for _ in range(8):
        x = rng.normal(0, 1, (1, 4, 8, 8)).astype(np.float32)
        x[0, 0] = 0.0
        x[0, 0].reshape(-1)[rng.integers(0, 64, 2)] = 1.0
        calib.append({"x": x})
    report = qnnlib.quantize(model, calib, config=qnnlib.QuantConfig(method=qnnlib.Percentile(percentile=99.0))).report
    conv = _layer(report, "Conv")
    assert conv.cause == "output clipping", report.explain(conv.node)
    assert "TensorOverride(range=" in conv.explanation and "400" in conv.explanation  # the observed maximum
    pool = _layer(report, "MaxPool")
    assert pool.cause == "inputs" and "output clipping" not in pool.error_sources  # tied: adds no grid of its own
    after = [x for x in report.layers if x.op_type == "Conv"][1]
    assert after.cause == "inputs" and f"first grows at {conv.node!r} (output clipping)" in after.explanation


def test_heavy_tailed_weights_are_named() -> None:
    """Per-channel int8 steps set by a few huge weights: the cause is weight rounding."""
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.01, (8, 16, 1, 1))
    w[:, 0, 0, 0] = 1.0  # each channel's step is 1/127: the small weights mostly round to 0
    model = _single_conv(w)
    calib = [{"x": rng.uniform(0, 1, (1, 16, 8, 8)).astype(np.float32)} for _ in range(8)]
    report = qnnlib.quantize(model, calib).report
    conv = _layer(report, "Conv")
    assert conv.cause == "weights", report.explain(conv.node)
    assert "weight rounding at 8 bits" in conv.explanation


def test_cancelling_sum_is_named_amplification() -> None:
    """The difference of two channels riding on a large common value: the error it receives grows."""
    rng = np.random.default_rng(4)
    model = _single_conv(np.array([1.0, -1.0]).reshape(1, 2, 1, 1))
    calib = [{"x": (10.0 + 0.1 * rng.normal(0, 1, (1, 2, 8, 8))).astype(np.float32)} for _ in range(8)]
    report = qnnlib.quantize(model, calib).report
    conv = _layer(report, "Conv")
    assert conv.cause == "amplification", report.explain(conv.node)
    assert conv.error_sources["inputs"] > conv.sqnr_db + 20  # 20 dB or more lost in the layer itself
    assert report.growing_layers(1)[0].node == conv.node
    text = report.to_text()
    assert "where the error grows most" in text and conv.node in text


def test_the_diagnosis_is_in_the_json_and_explain() -> None:
    model = conv_net()
    report = qnnlib.quantize(model, calibration(model)).report
    data = json.loads(report.to_json())
    diagnosed = [x for x in data["layers"] if x["cause"]]
    assert diagnosed and all(x["explanation"] for x in diagnosed)
    for x in diagnosed:
        assert set(x["error_sources"]) <= {"inputs", "weights", "output clipping", "output rounding", "amplification"}
        assert all(isinstance(v, float) or v == "inf" for v in x["error_sources"].values())
    node = diagnosed[0]["node"]
    assert node in report.explain(node) and "sources:" in report.explain(node)
    assert not math.isnan(report.layer(node).sqnr_db or 0.0)


def test_minmax_has_no_histogram_and_still_diagnoses() -> None:
    rng = np.random.default_rng(4)
    model = _single_conv(np.array([1.0, -1.0]).reshape(1, 2, 1, 1))
    calib = [{"x": (10.0 + 0.1 * rng.normal(0, 1, (1, 2, 8, 8))).astype(np.float32)} for _ in range(8)]
    report = qnnlib.quantize(model, calib, config=qnnlib.QuantConfig(method="minmax")).report
    conv = _layer(report, "Conv")
    assert conv.cause == "amplification", report.explain(conv.node)
    assert "output rounding" in conv.error_sources  # from the report's float reference values
