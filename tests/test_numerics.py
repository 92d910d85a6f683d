"""Properties of the pure numerics: affine quantisation, bias, histograms, range choices."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qnnlib.calibration.histogram import StreamingHistogram
from qnnlib.calibration.methods import (
    HISTOGRAM_VALUES_PER_BATCH,
    MSE,
    Entropy,
    MinMax,
    Percentile,
    kl_divergence,
    mse_range,
    percentile_range,
    quantization_error,
)
from qnnlib.numerics import affine
from qnnlib.numerics.metrics import ErrorAccumulator, cosine, sqnr_db
from qnnlib.numerics.qtypes import INT8, UINT8

finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


# -- affine quantisation ------------------------------------------------------------------------
@given(lo=finite, hi=finite)
def test_zero_is_exactly_representable(lo: float, hi: float) -> None:
    lo, hi = min(lo, hi), max(lo, hi)
    for qt in (UINT8, INT8):
        scale, zp = affine.activation_qparams(lo, hi, qt)
        assert qt.qmin <= zp <= qt.qmax
        assert affine.dequantize(affine.quantize(np.zeros(1, np.float32), scale, zp, qt), scale, zp)[0] == 0.0


@settings(max_examples=200)
@given(lo=finite, hi=finite, data=st.data())
def test_round_trip_error_within_half_a_step(lo: float, hi: float, data: st.DataObject) -> None:
    lo, hi = min(lo, hi), max(lo, hi)
    scale, zp = affine.activation_qparams(lo, hi, UINT8)
    r_lo, r_hi = affine.representable_range(scale, zp, UINT8)
    unit = data.draw(hnp.arrays(np.float64, 16, elements=st.floats(0.0, 1.0)))
    x = np.clip(r_lo + unit * (r_hi - r_lo), r_lo, r_hi).astype(np.float32)
    back = affine.fake_quantize(x, scale, zp, UINT8)
    assert np.all(np.abs(back - x) <= scale / 2 * (1 + 1e-5) + 1e-6 * np.abs(x))


@given(lo=finite, hi=finite)
def test_representable_range_covers_the_calibrated_range(lo: float, hi: float) -> None:
    lo, hi = min(lo, hi), max(lo, hi)
    scale, zp = affine.activation_qparams(lo, hi, UINT8)
    r_lo, r_hi = affine.representable_range(scale, zp, UINT8)
    # asymmetric rounding of the zero point may lose up to half a step at one end
    assert r_lo <= min(lo, 0) + scale / 2 + 1e-6 * abs(lo)
    assert r_hi >= max(hi, 0) - scale / 2 - 1e-6 * abs(hi)


def test_onnx_spec_quantizelinear_golden_case() -> None:
    """The QuantizeLinear example of the ONNX operator tests: rounding half to even, saturation."""
    x = np.array([0, 2, 3, 1000, -254, -1000], np.float32)
    q = affine.quantize(x, np.float32(2.0), 128, UINT8)
    np.testing.assert_array_equal(q, np.array([128, 129, 130, 255, 1, 0], np.uint8))


def test_rounding_is_half_to_even() -> None:
    q = affine.quantize(np.array([0.5, 1.5, 2.5, -0.5, -1.5], np.float32), 1.0, 0, INT8)
    np.testing.assert_array_equal(q, [0, 2, 2, 0, -2])


def test_symmetric_activation_params() -> None:
    scale, zp = affine.activation_qparams(-2.0, 1.0, INT8, symmetric=True)
    assert zp == 0 and scale == pytest.approx(2.0 / 127)
    with pytest.raises(ValueError, match="signed"):
        affine.activation_qparams(-2.0, 1.0, UINT8, symmetric=True)


def test_constant_zero_range_gets_a_fine_grid() -> None:
    """A constant-zero tensor's scale only sets its readers' bias step, so it is the [0, 1] grid, not 1."""
    assert affine.activation_qparams(0.0, 0.0, UINT8) == (np.float32(1 / 255), 0)
    assert affine.activation_qparams(0.0, 0.0, INT8, symmetric=True) == (np.float32(1 / 127), 0)
    assert affine.activation_qparams(0.0, 0.0, INT8) == (np.float32(1 / 255), -128)


@given(hnp.arrays(np.float32, (6, 3, 2, 2), elements=st.floats(-10, 10, width=32)))
def test_weights_symmetric_per_channel(w: np.ndarray) -> None:
    scales = affine.weight_scales(w, 0, 127)
    q = affine.quantize_weight(w, scales, 0, INT8, 127)
    assert q.dtype == np.int8 and q.min() >= -127
    back = affine.dequantize(q, scales, 0, axis=0)
    assert np.all(np.abs(back - w) <= scales.reshape(-1, 1, 1, 1) / 2 + 1e-6)
    # a channel uses the full range unless its weights are so small that the scale underflows float32
    representable = np.abs(w).reshape(6, -1).max(axis=1) / 127 >= affine.MIN_SCALE
    assert np.all(np.abs(q).reshape(6, -1).max(axis=1)[representable] == 127)


def _is_power_of_two(values: np.ndarray) -> bool:
    return bool(np.all(np.frexp(np.asarray(values, np.float32))[0] == 0.5))


@given(st.floats(float(np.float32(1e-30)), float(np.float32(1e30)), width=32))
def test_power_of_two_at_least_is_the_next_power(x: float) -> None:
    p = affine.power_of_two_at_least(x)
    assert _is_power_of_two(p)
    assert x <= p < 2 * x or p == x


@given(lo=finite, hi=finite)
def test_power_of_two_activation_scale_covers_the_range(lo: float, hi: float) -> None:
    """The scale is a power of two, at most twice the plain one, and the range still fits (half a step)."""
    lo, hi = min(lo, hi), max(lo, hi)
    plain, _ = affine.activation_qparams(lo, hi, UINT8)
    scale, zp = affine.activation_qparams(lo, hi, UINT8, power_of_two=True)
    assert _is_power_of_two(scale) and plain <= scale <= 2 * plain
    r_lo, r_hi = affine.representable_range(scale, zp, UINT8)
    assert r_lo <= min(lo, 0) + scale / 2 + 1e-6 * abs(lo)
    assert r_hi >= max(hi, 0) - scale / 2 - 1e-6 * abs(hi)
    sym, zero = affine.activation_qparams(lo, hi, INT8, symmetric=True, power_of_two=True)
    assert zero == 0 and _is_power_of_two(sym)


@given(hnp.arrays(np.float32, (5, 7), elements=st.floats(-10, 10, width=32)))
def test_power_of_two_weight_scales_pick_the_better_power(w: np.ndarray) -> None:
    """Each channel gets the next power of two above its scale, or half of it when that errs less."""
    plain = affine.weight_scales(w, 0, 127)
    pot = affine.power_of_two_weight_scales(w, 0, 127, plain)
    up = affine.power_of_two_at_least(plain)
    assert _is_power_of_two(pot) and np.all((pot == up) | (pot == up / 2))

    def error(scales: np.ndarray) -> np.ndarray:
        back = affine.dequantize(affine.quantize_weight(w, scales, 0, INT8, 127), scales, 0, axis=0)
        return np.sum((back - w) ** 2, axis=1)

    assert np.all(error(pot) <= error(up) * (1 + 1e-6) + 1e-12)


def test_bias_scale_and_overflow_clamp() -> None:
    scales = affine.bias_scales(np.float32(0.1), np.array([0.01, 1e-9], np.float32))
    q, clamped = affine.quantize_bias(np.array([1.0, 1e4], np.float32), scales)
    assert q[0] == 1000 and clamped == 1 and q[1] == np.iinfo(np.int32).max


def test_zero_weight_channel_gets_a_bias_safe_scale() -> None:
    w = np.zeros((2, 1, 1, 1), np.float32)
    w[0] = 1.0
    scales = affine.weight_scales(w, 0, 127)
    assert scales[1] == 1.0
    safe = affine.bias_safe_scales(scales, w, 0, np.array([0.5, 3.0], np.float32), np.float32(0.02))
    q, clamped = affine.quantize_bias(np.array([0.5, 3.0]), affine.bias_scales(np.float32(0.02), safe))
    assert clamped == 0
    assert abs(float(q[1]) * 0.02 * safe[1] - 3.0) < 1e-6


def test_near_dead_channel_gets_a_bias_safe_scale() -> None:
    """Tiny weights under a large bias (PP-OCRv5's detector): the scale rises instead of the bias clamping."""
    w = np.full((2, 4), 1e-7, np.float32)
    w[0] = 0.5
    bias = np.array([0.1, 300.0], np.float32)
    s_in = np.float32(0.01)
    scales = affine.weight_scales(w, 0, 127)
    assert affine.quantize_bias(bias, affine.bias_scales(s_in, scales))[1] == 1  # clamps unraised
    safe = affine.bias_safe_scales(scales, w, 0, bias, s_in)
    assert safe[0] == scales[0] and safe[1] > scales[1]
    q, clamped = affine.quantize_bias(bias, affine.bias_scales(s_in, safe))
    assert clamped == 0 and abs(float(q[1]) * float(s_in * safe[1]) - 300.0) < 1e-3


# -- metrics ------------------------------------------------------------------------------------
def test_sqnr_and_cosine() -> None:
    ref = np.array([1.0, -1.0, 2.0, 0.0])
    assert sqnr_db(ref, ref) == np.inf
    assert sqnr_db(ref, ref + np.array([0.1, 0, 0, 0])) == pytest.approx(10 * np.log10(6 / 0.01), rel=1e-5)
    assert cosine(ref, 2 * ref) == pytest.approx(1.0)
    acc = ErrorAccumulator()
    acc.update(ref[:2], ref[:2] * 0.5)
    acc.update(ref[2:], ref[2:] * 0.5)
    assert acc.sqnr_db == pytest.approx(sqnr_db(ref, ref * 0.5), rel=1e-6)


# -- streaming histogram -------------------------------------------------------------------------
@settings(max_examples=60)
@given(st.lists(hnp.arrays(np.float32, st.integers(1, 200),
                          elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False)),
                min_size=1, max_size=8))
def test_histogram_counts_every_value_and_covers_the_range(batches: list[np.ndarray]) -> None:
    """Subnormal values are left out: -1e-45 is counted in bin [-w, 0) at the narrow grid of its own batch,
    while the check below, at the final grid, rounds ``x / w`` to -0.0 and expects bin [0, w).
    """
    hist = StreamingHistogram(bins=64)
    for b in batches:
        hist.update(b)
    values = np.concatenate(batches)
    assert hist.counts.sum() == values.size
    assert len(hist.counts) <= hist.capacity
    edges = hist.edges()
    assert edges[0] <= values.min() and edges[-1] >= values.max()
    # every value is counted in bin floor(x * (1 / w)), computed in float32 as the histogram defines it
    # (so a denormal that underflows to -0.0 counts as zero)
    idx = np.floor(values * np.float32(1.0 / hist.width)).astype(np.int64) - hist.start
    expected = np.bincount(np.clip(idx, 0, len(hist.counts) - 1), minlength=len(hist.counts))
    np.testing.assert_array_equal(hist.counts, expected)


def test_histogram_merges_bins_exactly_when_widening() -> None:
    hist = StreamingHistogram(bins=16)
    hist.update(np.linspace(0, 1, 1000, dtype=np.float32))
    width = hist.width
    hist.update(np.array([100.0], np.float32))
    assert hist.width > width and hist.counts.sum() == 1001


def test_histogram_observer_counts_a_subsample_and_every_value_beyond_it() -> None:
    """Each batch: about 4096 strided values, each standing for ``stride`` values, plus the exact tails."""
    rng = np.random.default_rng(9)
    batch = rng.laplace(size=50_000).astype(np.float32)
    obs = MSE().observer(256)
    obs.update(batch, float(batch.min()), float(batch.max()))
    stride = -(-batch.size // HISTOGRAM_VALUES_PER_BATCH)
    sample = batch[::stride]
    tails = batch[(batch > sample.max()) | (batch < sample.min())]
    assert tails.size > 0
    want = StreamingHistogram(obs.method.bins)  # type: ignore[attr-defined]
    want.update(sample, float(batch.min()), float(batch.max()), weight=float(stride))
    want.update(tails, float(batch.min()), float(batch.max()))
    np.testing.assert_array_equal(obs.histogram.counts, want.counts)  # type: ignore[attr-defined]


# -- range choices ------------------------------------------------------------------------------
def _observe(method, x: np.ndarray) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    obs = method.observer(256)
    for chunk in np.array_split(x, 4):
        obs.update(chunk, float(chunk.min()), float(chunk.max()))
    return obs.range_


@pytest.mark.parametrize("method", [MinMax(), Percentile(), Entropy(), MSE()], ids=lambda m: m.name)
def test_ranges_lie_within_min_and_max(method) -> None:  # type: ignore[no-untyped-def]
    x = np.random.default_rng(0).laplace(size=50_000).astype(np.float32)
    lo, hi = _observe(method, x)
    assert x.min() <= lo < 0 < hi <= x.max()


@pytest.mark.parametrize("method", [Entropy(), MSE()], ids=lambda m: m.name)
def test_exact_zeros_do_not_move_entropy_or_mse_ranges(method) -> None:  # type: ignore[no-untyped-def]
    """A Relu output is mostly exact zeros, which any range represents exactly: they must not decide the clip."""
    rng = np.random.default_rng(6)
    positive = np.abs(rng.laplace(size=20_000)).astype(np.float32)
    relu_like = rng.permutation(np.concatenate([np.zeros(180_000, np.float32), positive]))
    _, hi_positive = _observe(method, positive)
    _, hi_relu = _observe(method, relu_like)
    assert hi_relu == pytest.approx(hi_positive, rel=0.15)


def test_minmax_is_exact() -> None:
    x = np.random.default_rng(1).normal(size=10_000).astype(np.float32)
    assert _observe(MinMax(), x) == (float(x.min()), float(x.max()))


def test_mse_clips_long_tails_but_not_uniform_data() -> None:
    rng = np.random.default_rng(2)
    laplace = rng.laplace(size=100_000).astype(np.float32)
    lo, hi = _observe(MSE(), laplace)
    assert hi < 0.95 * laplace.max() and lo > 0.95 * laplace.min()
    uniform = rng.uniform(-1, 1, 100_000).astype(np.float32)
    lo, hi = _observe(MSE(), uniform)
    assert hi > 0.97 and lo < -0.97


def test_mse_choice_has_least_error_among_candidates() -> None:
    rng = np.random.default_rng(3)
    x = rng.laplace(size=50_000).astype(np.float32)
    hist = StreamingHistogram(2048)
    hist.update(x)
    lo, hi = mse_range(hist.counts, hist.centers(), float(x.min()), float(x.max()), levels=256, symmetric=False)
    chosen = quantization_error(hist.counts, hist.centers(), np.array([lo]), np.array([hi]), levels=256,
                                symmetric=False)[0]
    full = quantization_error(hist.counts, hist.centers(), np.array([x.min()]), np.array([x.max()]), levels=256,
                              symmetric=False)[0]
    assert chosen < full


@pytest.mark.parametrize("symmetric", [False, True])
def test_quantization_error_is_its_formula_per_candidate(symmetric: bool) -> None:
    rng = np.random.default_rng(8)
    centers = (np.arange(-300, 900) + 0.5) * 2.0**-6
    counts = rng.integers(0, 40, centers.size).astype(np.float64)
    los, his = -rng.uniform(0.1, 5.0, 12), rng.uniform(0.1, 14.0, 12)
    for levels in (16, 256):
        got = quantization_error(counts, centers, los, his, levels=levels, symmetric=symmetric)
        for k, (lo, hi) in enumerate(zip(los, his, strict=True)):
            if symmetric:
                qmax = levels // 2 - 1
                scale = hi / qmax
                deq = np.clip(np.rint(centers / scale), -qmax, qmax) * scale
            else:
                scale = (hi - lo) / (levels - 1)
                zero = np.rint(-lo / scale)
                deq = (np.clip(np.rint(centers / scale) + zero, 0, levels - 1) - zero) * scale
            assert got[k] == pytest.approx(float(np.sum((centers - deq) ** 2 * counts)), rel=1e-12)


def test_channel_error_is_its_formula() -> None:
    rng = np.random.default_rng(9)
    rows = (rng.laplace(size=(6, 500)) * np.array([[1e-3], [1], [30], [1], [0.5], [2]])).astype(np.float32)
    for qmax in (7, 127):
        scales = (np.abs(rows).max(axis=1) * rng.uniform(0.5, 1.0, 6) / qmax).astype(np.float32)
        want = np.sum((rows - np.clip(np.rint(rows / scales[:, None]), -qmax, qmax) * scales[:, None]) ** 2, axis=1)
        assert np.array_equal(affine._channel_error(rows, scales, qmax), want)


def test_percentile_range() -> None:
    counts = np.ones(1000)
    centers = np.arange(1000) + 0.5
    lo, hi = percentile_range(counts, centers, 99.0)
    assert lo == pytest.approx(9, abs=1.01) and hi == pytest.approx(990, abs=1.01)


def test_kl_penalises_clipping_and_is_finite() -> None:
    x = np.random.default_rng(4).normal(size=100_000).astype(np.float32)
    hist = StreamingHistogram(2048)
    hist.update(x)
    c, ctr = hist.counts, hist.centers()
    tight = kl_divergence(c, ctr, -1.0, 1.0, 256)
    wide = kl_divergence(c, ctr, -3.5, 3.5, 256)
    assert np.isfinite(tight) and np.isfinite(wide) and tight > wide


def test_mse_weight_scales_never_worse_and_clip_long_tails() -> None:
    rng = np.random.default_rng(5)
    w = rng.laplace(size=(8, 4096)).astype(np.float32)  # long tails: clipping trades a few for many
    w[1] = rng.uniform(-1, 1, 4096)  # uniform: nothing to gain from clipping
    full = affine.weight_scales(w, 0, 127)
    best = affine.mse_weight_scales(w, 0, 127)

    def err(scales: np.ndarray) -> np.ndarray:
        q = affine.quantize_weight(w, scales, 0, INT8, 127)
        return ((w - affine.dequantize(q, scales, 0, axis=0)) ** 2).sum(axis=1)

    assert np.all(err(best) <= err(full) + 1e-9)
    assert err(best).sum() < err(full).sum()
    laplace = [c for c in range(8) if c != 1]
    assert np.count_nonzero(best[laplace] < full[laplace]) >= 5  # most long-tailed channels are clipped
    assert best[1] >= 0.97 * full[1]
