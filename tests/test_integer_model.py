"""The integer-operator model: integer operators replace the 8-bit layers, it runs in onnxruntime and
computes what the QDQ model computes; requantisation as multiplier and shift."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

import qnnlib
from qnnlib.emit.integer import METADATA_KEY, fixed_point
from tests import builders
from tests.conftest import run


@pytest.fixture(scope="module")
def conv_result() -> tuple[qnnlib.QuantResult, list[dict[str, np.ndarray]]]:
    model = builders.conv_net()
    return qnnlib.quantize(model, builders.calibration(model, 16)), builders.calibration(model, 4, seed=7)


#: Per builder, integer operators its integer model must hold (what the rewrite takes over).
EXPECTED = {
    "conv_net": {"QLinearConv", "QLinearConcat", "QLinearAdd", "QLinearAveragePool", "QLinearGlobalAveragePool",
                 "QGemm", "MaxPool"},
    "mlp": {"QGemm"},
    "transformer_block": {"QGemm", "QLinearAdd", "QLinearMul"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_integer_operators_compute_exactly_what_the_qdq_model_computes(name: str) -> None:
    model = getattr(builders, name)()
    result = qnnlib.quantize(model, builders.calibration(model, 16))
    details = result.integer_details()
    onnx.checker.check_model(details.model, full_check=True)
    ops = {n.op_type for n in details.model.graph.node}
    assert EXPECTED[name] <= ops
    assert not ops & {"Conv", "Gemm"}  # every 8-bit layer with weights was taken over
    # onnxruntime fuses the QDQ model into the same integer kernels: outputs are bit-identical
    for feed in builders.calibration(model, 4, seed=7):
        for want, got in zip(run(result.model, feed), run(details.model, feed), strict=True):
            np.testing.assert_array_equal(want, got)


def test_requantisation_metadata_matches_the_scales(conv_result) -> None:
    result, _ = conv_result
    details = result.integer_details()
    stored = json.loads({p.key: p.value for p in details.model.metadata_props}[METADATA_KEY])
    assert stored == json.loads(json.dumps(details.requantization))
    convs = [n for n in details.model.graph.node if n.op_type == "QLinearConv"]
    assert convs and all(n.name in stored for n in convs)
    for n in convs:
        entry = stored[n.name]
        for real, m, shift in zip(entry["output_real"], entry["output_multiplier"], entry["output_shift"],
                                  strict=True):
            assert 2**30 <= m < 2**31
            assert math.isclose(m * 2.0**-shift, real, rel_tol=2**-30)


def test_the_qdq_model_is_not_changed(conv_result) -> None:
    result, _ = conv_result
    before = result.model.SerializeToString()
    result.integer_model()
    assert result.model.SerializeToString() == before


@pytest.mark.parametrize("m", [1.0, 0.75, 3.1e-5, 0.999999999, 12345.678])
def test_fixed_point(m: float) -> None:
    multiplier, shift = fixed_point(m)
    assert 2**30 <= multiplier < 2**31
    assert math.isclose(multiplier * 2.0**-shift, m, rel_tol=2**-30)


def test_fixed_point_of_zero() -> None:
    assert fixed_point(0.0) == (0, 0)
