"""The coprocessor's segments as onnxruntime-extensions Python ops inside one onnxruntime session."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest

import qnnlib
from qnnlib.coprocessor import InferenceSession
from qnnlib.errors import ConfigError, SessionError
from qnnlib.graph.model_io import make_session
from tests import builders

pytest.importorskip("onnxruntime_extensions")

from qnnlib.coprocessor.extensions import DOMAIN, ExtensionsSession


@pytest.fixture(scope="module")
def transformer() -> qnnlib.QuantResult:
    model = builders.transformer_block()
    return qnnlib.quantize(model, builders.calibration(model, 8))


@pytest.fixture(scope="module")
def conv() -> qnnlib.QuantResult:
    model = builders.conv_net()
    return qnnlib.quantize(model, builders.calibration(model, 8))


def _feed(result: qnnlib.QuantResult, seed: int = 7) -> dict[str, np.ndarray]:
    return builders.calibration(result.model, 1, seed=seed)[0]


@pytest.mark.parametrize("policy", ["ort-exact", "q31", "pot"])
def test_segments_in_onnxruntime_equal_the_coprocessor_session(conv: qnnlib.QuantResult, policy: str) -> None:
    session = ExtensionsSession(conv.model, policy=policy)
    feed = _feed(conv)
    for want, got in zip(InferenceSession(conv.model, policy=policy).run(None, feed), session.run(None, feed),
                         strict=True):
        np.testing.assert_array_equal(want, got)


def test_cpu_nodes_stay_onnxruntime_nodes_between_segment_ops(transformer: qnnlib.QuantResult) -> None:
    session = ExtensionsSession(transformer.model)
    ops = [(n.domain, n.op_type) for n in session.model.graph.node]
    assert sum(domain == DOMAIN for domain, _ in ops) >= 3
    assert ("", "Softmax") in ops and ("", "LayerNormalization") in ops
    assert "onnxruntime" in type(session.session).__module__
    onnx.checker.check_model(session.model)
    feed = _feed(transformer)
    reference = make_session(transformer.integer_model()).run(None, feed)
    for want, got in zip(reference, session.run(None, feed), strict=True):
        np.testing.assert_array_equal(want, got)  # ort-exact: onnxruntime's integers, in its own session


def test_a_failure_inside_a_segment_op_is_a_session_error_not_an_abort(transformer: qnnlib.QuantResult,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    session = ExtensionsSession(transformer.model)
    feed = _feed(transformer)
    before = session.run(None, feed)

    def boom(position: int, inputs: object) -> list[np.ndarray]:
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(session._engine, "run_segment", boom)
    with pytest.raises(SessionError, match="segment op 0 failed: RuntimeError: kernel exploded"):
        session.run(None, feed)
    monkeypatch.undo()
    np.testing.assert_array_equal(before[0], session.run(None, feed)[0])


def test_a_second_session_leaves_the_first_working(conv: qnnlib.QuantResult,
                                                   transformer: qnnlib.QuantResult) -> None:
    """onnxruntime-extensions crashes a session when a Python op is defined after it: all are defined up front."""
    first = ExtensionsSession(conv.model)
    want = first.run(None, _feed(conv))
    second = ExtensionsSession(transformer.model)
    second.run(None, _feed(transformer))
    np.testing.assert_array_equal(want[0], first.run(None, _feed(conv))[0])


def test_without_the_extra_the_error_names_it(conv: qnnlib.QuantResult, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)
    with pytest.raises(ConfigError, match=r"qnnlib\[extensions\]"):
        ExtensionsSession(conv.model)
