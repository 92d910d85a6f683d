"""The compiled loops (the ``fast`` extra) compute exactly what the numpy kernels compute."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

import qnnlib
from qnnlib.coprocessor import InferenceSession, jit
from qnnlib.coprocessor.kernels import depthwise_accumulate, im2col, output_size
from qnnlib.coprocessor.ops import _Bias
from qnnlib.coprocessor.policy import Requantizer
from qnnlib.coprocessor.session import COPROCESSOR
from qnnlib.errors import ConfigError
from tests import builders
from tests.conftest import session as ort_session
from tests.test_coprocessor import _one_node

needs_numba = pytest.mark.skipif(not jit.available(), reason="numba (the fast extra) is not installed")

_DEPTHWISE = [  # channels, height, width, kernel, stride, dilation, pads (top, left, bottom, right)
    (3, 9, 40, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),
    (5, 17, 23, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1)),
    (4, 12, 33, (5, 3), (1, 3), (2, 1), (0, 2, 3, 1)),
    (24, 7, 7, (5, 5), (1, 1), (1, 1), (2, 2, 2, 2)),
    (16, 14, 14, (3, 3), (2, 2), (1, 1), (0, 0, 1, 1)),
    (8, 6, 9, (3, 2), (3, 1), (1, 2), (2, 0, 0, 0)),
]


@needs_numba
@pytest.mark.parametrize("case", _DEPTHWISE)
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_depthwise_equals_the_numpy_kernel(case: tuple, dtype: type) -> None:
    channels, h, w, kernel, strides, dilations, pads = case
    rng = np.random.default_rng(channels * h)
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max + 1, size=(2, channels, h, w)).astype(dtype)
    zero = int(rng.integers(info.min, info.max + 1))
    weights = rng.integers(-127, 128, size=(channels, *kernel)).astype(np.float32)
    want, out = depthwise_accumulate(x, zero, weights, strides=strides, dilations=dilations, pads=pads)
    assert out == tuple(output_size((h, w)[i], kernel[i], strides[i], dilations[i], (pads[i], pads[i + 2]))
                        for i in range(2))
    got = jit.depthwise(x, zero, weights, np.ascontiguousarray(np.moveaxis(weights, 0, -1)), strides=strides,
                        dilations=dilations, pads=pads, out=out)
    np.testing.assert_array_equal(want, got)


@needs_numba
@pytest.mark.parametrize("case", _DEPTHWISE)
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_patches_equal_im2col(case: tuple, dtype: type) -> None:
    channels, h, w, kernel, strides, dilations, pads = case
    rng = np.random.default_rng(channels + h)
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max + 1, size=(2, channels, h, w)).astype(dtype)
    zero = int(rng.integers(info.min, info.max + 1))
    raw, out = im2col(x, kernel, strides, dilations, pads, pad_value=zero)
    geometry = {"strides": strides, "dilations": dilations, "pads": pads, "out": out}
    got_raw = jit.patches(x, zero, kernel, **geometry, centred=False)
    assert got_raw.dtype == raw.dtype
    np.testing.assert_array_equal(raw, got_raw)
    np.testing.assert_array_equal(np.subtract(raw, np.float32(zero), dtype=np.float32),
                                  jit.patches(x, zero, kernel, **geometry, centred=True))


@needs_numba
@pytest.mark.parametrize("accumulator", [np.float32, np.float64])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_requantize_equals_the_policy_and_the_bias_add(accumulator: type, dtype: type, per_channel: bool,
                                                       with_bias: bool) -> None:
    """onnxruntime's requantisation: ties round to even, the clip bounds and large biases round as f32(int32)."""
    rng = np.random.default_rng(3)
    channels = 6
    acc = rng.integers(-(2**23), 2**23, size=(2, channels, 50)).astype(accumulator)
    acc[0, :, :4] = [2.0**24 - 1, -(2.0**24) + 1, 0, 1]  # the ends of float32's exact integers
    factor = (rng.random(channels if per_channel else 1) * 1e-4).astype(np.float32)
    factor[0] = 0.5  # acc * 0.5: exact halves, where half-to-even rounding shows
    bias = rng.integers(-(2**30), 2**30, size=channels).astype(np.int32) if with_bias else None
    zero = 7 if dtype == np.uint8 else -3
    reference = Requantizer.compile(factor.reshape(1, -1, 1) if per_channel else factor.reshape(()), zero,
                                    np.dtype(dtype), "ort-exact")
    bias_col = _Bias.of(bias, (1, -1, 1))
    want = reference(acc.copy() if bias_col is None else bias_col.add(acc.copy(), "ort-exact"))
    got = jit.Requantize.compile(bias, factor, channels, zero, np.dtype(dtype))(acc)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(want, got)


@needs_numba
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_lookup_equals_indexing(dtype: type) -> None:
    table = np.random.default_rng(0).integers(0, 256, size=256).astype(np.uint8)
    x = np.arange(256).astype(np.uint8).view(dtype).reshape(4, 8, 8)
    want = table[x.astype(np.int32) + 128] if dtype == np.int8 else table[x]
    np.testing.assert_array_equal(want, jit.lookup(table, x))


@needs_numba
@pytest.mark.parametrize("case", _DEPTHWISE[:4])
def test_a_depthwise_layer_equals_onnxruntime_with_and_without_the_compiled_loops(case: tuple) -> None:
    channels, h, w, kernel, strides, dilations, pads = case
    rng = np.random.default_rng(11)
    x = rng.integers(0, 256, size=(1, channels, h, w)).astype(np.uint8)
    constants = {
        "xs": np.array(0.02, np.float32), "xz": np.array(121, np.uint8),
        "w": rng.integers(-127, 128, size=(channels, 1, *kernel)).astype(np.int8),
        "ws": (rng.random(channels) * 0.01 + 0.001).astype(np.float32), "wz": np.zeros(channels, np.int8),
        "ys": np.array(0.05, np.float32), "yz": np.array(110, np.uint8),
        "b": rng.integers(-5000, 5000, size=channels).astype(np.int32),
    }
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"],
                            group=channels, kernel_shape=list(kernel), strides=list(strides),
                            dilations=list(dilations), pads=list(pads))
    model = _one_node(node, {"x": x}, constants)
    want = ort_session(model).run(None, {"x": x})[0]
    for flag in (True, False):
        session = InferenceSession(model, jit=flag)
        assert set(session.placement().values()) == {COPROCESSOR}
        np.testing.assert_array_equal(want, session.run(None, {"x": x})[0])


@needs_numba
@pytest.mark.parametrize("builder", ["conv_net", "transformer_block"])
def test_sessions_with_and_without_the_compiled_loops_give_identical_outputs(builder: str) -> None:
    model = getattr(builders, builder)()
    integer = qnnlib.quantize(model, builders.calibration(model, 8)).integer_model()
    fast, plain = InferenceSession(integer, jit=True), InferenceSession(integer, jit=False)
    assert fast.jit and not plain.jit
    claimed = fast.coprocessor_outputs()
    for feed in builders.calibration(model, 2, seed=7):
        for want, got in zip(plain.run(claimed, feed), fast.run(claimed, feed), strict=True):
            np.testing.assert_array_equal(want, got)


def test_jit_true_without_numba_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jit, "numba", None)
    model = builders.conv_net()
    integer = qnnlib.quantize(model, builders.calibration(model, 4)).integer_model()
    with pytest.raises(ConfigError, match=r"qnnlib\[fast\]"):
        InferenceSession(integer, jit=True)
    assert not InferenceSession(integer).jit  # None: numpy kernels when numba is missing


def test_quantize_does_not_import_numba() -> None:
    """numba and LLVM cost about 0.4 s and 150 MB at import: only the coprocessor's compiled loops load them."""
    code = ("import sys, qnnlib; from tests import builders; m = builders.conv_net(); "
            "qnnlib.quantize(m, builders.calibration(m, 2)); print('numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "False"
