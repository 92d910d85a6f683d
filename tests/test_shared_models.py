"""The real models in ../shared/models (skipped when ../shared is absent)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import qnnlib
from tests.conftest import optimized_op_types, run, shared_model, sqnr_db

pytestmark = pytest.mark.shared


def _feeds(shape: tuple[int, ...], n: int, *, dtype: type = np.float32, scale: float = 1.0, offset: float = 0.0,
           seed: int = 0) -> list[np.ndarray]:
    """Smooth random images (8x8 blocks of colour plus fine noise): closer to photos than white noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.uniform(0, 1, (*shape[:2], shape[2] // 8 + 1, shape[3] // 8 + 1))
        img = np.kron(coarse, np.ones((1, 1, 8, 8)))[:, :, :shape[2], :shape[3]]
        img = np.clip(img + rng.normal(0, 0.05, shape), 0, 1)
        out.append((img * scale + offset).astype(dtype))
    return out


def _digits(n: int, start: int = 0) -> list[np.ndarray]:
    from qnnlib import demo

    images, _ = demo.digits()
    return [x[None] for x in images[start:start + n]]


# Output SQNR bounds (dB) over 16 held-out inputs, about 3 dB below what was measured when they were
# set: squeezenet 38.9, ultraface 49.3, mnist 32.4 (with overflow_fix='disable': 29.3, 37.8, 13.9).
# Real-photo figures against onnxruntime's quantiser are in docs/benchmarks.md.
@pytest.mark.parametrize(
    ("name", "input_name", "data", "convs", "bound"),
    [
        ("squeezenet1.0-fp32.onnx", "data_0", lambda n, s: _feeds((1, 3, 224, 224), n, scale=255.0, seed=s), 26, 35.5),
        ("ultraface-rfb-320.onnx", "input", lambda n, s: _feeds((1, 3, 240, 320), n, scale=2.0, offset=-1.0, seed=s),
         52, 46.0),
        ("mnist-cntk.onnx", "Input3", lambda n, s: _digits(n, 100 * s), 2, 29.0),
    ],
    ids=["squeezenet", "ultraface", "mnist"],
)
def test_real_model_quantises_and_fuses(name: str, input_name: str, data, convs: int, bound: float) -> None:  # type: ignore[no-untyped-def]
    path = shared_model(name)
    before = path.read_bytes()
    result = qnnlib.quantize(path, data(16, 0))
    assert path.read_bytes() == before
    onnx.checker.check_model(result.model)
    ops = optimized_op_types(result.model)
    assert ops["QLinearConv"] == convs
    assert not any(ops.get(op) for op in ("Conv", "FusedConv"))
    float_model, session = onnx.load(str(path)), result.session()
    held = data(16, 1)
    ref = np.concatenate([run(float_model, {input_name: x})[0].ravel() for x in held])
    got = np.concatenate([session.run(None, {input_name: x})[0].ravel() for x in held])
    assert sqnr_db(ref, got) > bound


#: Per real model: input name, shape, pixel scale and offset of its smooth random images, convolutions.
INTEGER_CASES = {
    "squeezenet1.0-fp32.onnx": ("data_0", (1, 3, 224, 224), 255.0, 0.0, 26),
    "ultraface-rfb-320.onnx": ("input", (1, 3, 240, 320), 2.0, -1.0, 52),
}


@pytest.mark.parametrize("name", sorted(INTEGER_CASES))
def test_real_model_integer_operators_are_bit_exact(name: str) -> None:
    input_name, shape, scale, offset, convs = INTEGER_CASES[name]
    result = qnnlib.quantize(shared_model(name), _feeds(shape, 8, scale=scale, offset=offset))
    integer = result.integer_model()
    assert sum(n.op_type == "QLinearConv" for n in integer.graph.node) == convs
    for x in _feeds(shape, 2, scale=scale, offset=offset, seed=3):
        for want, got in zip(run(result.model, {input_name: x}), run(integer, {input_name: x}), strict=True):
            np.testing.assert_array_equal(want, got)


def test_float16_squeezenet_keeps_float16_io() -> None:
    path = shared_model("squeezenet1.0-fp16.onnx")
    calib = _feeds((1, 3, 224, 224), 4, dtype=np.float16, scale=255.0)
    result = qnnlib.quantize(path, calib)
    session = result.session()
    assert session.get_inputs()[0].type == "tensor(float16)"
    assert optimized_op_types(result.model)["QLinearConv"] == 26
    out = session.run(None, {"data_0": calib[0]})[0]
    assert out.dtype == np.float16 and np.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(INTEGER_CASES))
def test_real_model_on_the_coprocessor_is_bit_exact(name: str) -> None:
    from qnnlib.coprocessor import InferenceSession
    from qnnlib.graph.edit import with_outputs
    from tests.conftest import session as ort_session

    input_name, shape, scale, offset, convs = INTEGER_CASES[name]
    integer = qnnlib.quantize(shared_model(name), _feeds(shape, 8, scale=scale, offset=offset)).integer_model()
    ours = InferenceSession(integer)
    claimed = ours.coprocessor_outputs()
    assert len(claimed) >= convs
    reference = ort_session(with_outputs(integer, claimed))
    x = _feeds(shape, 1, scale=scale, offset=offset, seed=4)[0]
    for tensor, want, got in zip(claimed, reference.run(claimed, {input_name: x}), ours.run(claimed, {input_name: x}),
                                 strict=True):
        assert np.count_nonzero(want != got) == 0, tensor
