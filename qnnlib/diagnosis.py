"""Why a layer loses accuracy: its measured error split into what it inherits and what it adds.

The report measures each quantised layer's output against float with every layer before it
quantised too. Its relative error ``N = |y_q - y|^2 / |y|^2`` (``SQNR = -10 log10 N``) is split
into the sources a user can act on, each a relative error of the same kind:

* ``inputs``: the largest error its quantised inputs already carry: measured at the layer writing
  the input, or for an input no layer writes (a graph input) that input's own quantisation error;
* ``weights``: ``|W - s q|^2 / |W|^2`` over its quantised weights (rounding noise on the weights
  reaches the output as about the same relative error);
* ``output clipping``: from the output's calibration histogram, ``sum (x - clip(x, a, b))^2 / sum x^2``
  over the values beyond the representable range ``[a, b] = [s (qmin - z), s (qmax - z)]``;
* ``output rounding``: ``sum (x - s (q(x) - z))^2 / sum x^2`` over the values inside it (exact zeros
  cost nothing). An output tied to one of its inputs (MaxPool, Concat, Reshape) moves values that
  are already on the grid and adds neither.

Independent errors add, so ``N`` would be about the sum of these four if the layer passed the
relative error it receives on unchanged. What the measurement holds beyond that sum is a fifth
source, ``amplification = max(0, N - sum)``: the layer magnifies the relative error it receives,
because its output keeps a small part of the signal it sums while the error passes whole (nearly
cancelling terms, such as a filter that removes the large mean of its input but not the noise on
it; a folded Relu that cuts most of its values; a steep nonlinearity). The largest of the five is
the *cause*. The activation sources come from the calibration histogram (every method but
``minmax`` keeps one), else from the float values the report compares with (:func:`values_error`).
The weight source assumes the inputs a weight row multiplies carry similar power; a large weight
reading a near-silent input makes it too small.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from qnnlib.calibration.histogram import StreamingHistogram
from qnnlib.numerics.affine import fake_quantize, representable_range
from qnnlib.numerics.metrics import sqnr_of_error
from qnnlib.numerics.qtypes import qtype
from qnnlib.plan import ActivationParams

#: Error sources, in the order the report lists them.
SOURCES = ("inputs", "weights", "output clipping", "output rounding", "amplification")


@dataclass(frozen=True)
class TensorError:
    """One activation's quantisation error at given parameters, from its calibration histogram.

    ``clipped``: the fraction of its values beyond the representable range; ``clipping`` and
    ``rounding``: the two parts of its relative squared error (module docstring); ``rms``: the root
    mean square of its values.
    """

    clipped: float
    clipping: float
    rounding: float
    rms: float

    @property
    def total(self) -> float:
        """Clipping plus rounding: the tensor's whole relative error."""
        return self.clipping + self.rounding


def tensor_error(hist: StreamingHistogram, params: ActivationParams) -> TensorError | None:
    """The error of quantising the values counted in ``hist`` with ``params``; None without values or signal.

    Each bin stands for values at its centre ``c``: beyond ``[a, b]`` it costs ``(c - clip(c))^2``;
    inside, ``(c - s (q(c) - z))^2 + w^2 / 12`` for a bin of width ``w`` narrower than the step
    ``s``, and ``s^2 / 12`` (uniform rounding) for a wider one.
    """
    qt = qtype(params.qtype)
    counts = hist.nonzero_counts()
    total = float(hist.counts.sum())
    if hist.empty or total <= 0:
        return None
    centers = hist.centers()
    power = float(np.dot(counts, centers * centers))
    if power <= 0:
        return None
    lo, hi = representable_range(params.scale, params.zero_point, qt)
    outside = (centers < lo) | (centers > hi)
    beyond = centers - np.clip(centers, lo, hi)
    clipping = float(np.dot(counts[outside], beyond[outside] ** 2))
    inside = ~outside
    step, width = float(params.scale), hist.width
    if width < step:
        on_grid = fake_quantize(centers[inside], params.scale, params.zero_point, qt)
        per_value = (centers[inside] - on_grid) ** 2 + width * width / 12.0
        rounding = float(np.dot(counts[inside], per_value))
    else:
        rounding = float(counts[inside].sum()) * step * step / 12.0
    return TensorError(float(counts[outside].sum()) / total, clipping / power, rounding / power,
                       math.sqrt(power / total))


def values_error(x: np.ndarray, params: ActivationParams) -> TensorError | None:
    """The same figures as :func:`tensor_error`, exactly, for the values ``x`` (None without signal)."""
    x = np.asarray(x, np.float64).reshape(-1)
    power = float(np.dot(x, x))
    if x.size == 0 or power <= 0:
        return None
    qt = qtype(params.qtype)
    lo, hi = representable_range(params.scale, params.zero_point, qt)
    outside = (x < lo) | (x > hi)
    error = (x - fake_quantize(x, params.scale, params.zero_point, qt)) ** 2
    clipping = float(error[outside].sum())
    return TensorError(float(np.count_nonzero(outside)) / x.size, clipping / power,
                       float(error.sum()) / power - clipping / power, math.sqrt(power / x.size))


@dataclass(frozen=True)
class Diagnosis:
    """A layer's error sources (relative errors, :data:`SOURCES`), its cause and what to do about it."""

    sources: dict[str, float]
    cause: str
    explanation: str
    #: The quantised input carrying the largest error ("" for none).
    worst_input: str = ""


@dataclass(frozen=True)
class LayerEvidence:
    """What the diagnosis of one layer is built from (see the module docstring).

    ``inputs``: per quantised input, its relative error; ``weights``: the weights' relative error
    and bit width, or None; ``output``: the output's own quantisation error, or None when the
    output is float or tied to an input; ``output_known``: False when the output is quantised on a
    grid of its own whose error could not be found, so that what the measurement holds beyond the
    sources cannot be told from its rounding; ``measured``: the output's measured relative error.
    """

    node: str
    measured: float
    inputs: Mapping[str, float]
    weights: tuple[float, int] | None = None
    output: TensorError | None = None
    output_tensor: str = ""
    output_params: ActivationParams | None = None
    extremes: tuple[float, float] | None = None
    output_known: bool = True


def diagnose(e: LayerEvidence) -> Diagnosis:
    """Split the layer's measured error into its sources and name the cause (module docstring)."""
    worst_input = max(e.inputs, key=lambda t: e.inputs[t]) if e.inputs else ""
    sources = {
        "inputs": e.inputs[worst_input] if worst_input else 0.0,
        "weights": e.weights[0] if e.weights is not None else 0.0,
        "output clipping": e.output.clipping if e.output is not None else 0.0,
        "output rounding": e.output.rounding if e.output is not None else 0.0,
    }
    if e.measured <= 0:
        return Diagnosis({**sources, "amplification": 0.0}, "none", "no measurable error", worst_input)
    sources["amplification"] = max(0.0, e.measured - sum(sources.values())) if e.output_known else 0.0
    cause = max(SOURCES, key=lambda s: sources[s])
    explanation = _explain(cause, e, sources, worst_input)
    if not e.output_known:
        explanation += "; its output grid's own error is not known"
    return Diagnosis(sources, cause, explanation, worst_input)


def _explain(cause: str, e: LayerEvidence, sources: Mapping[str, float], worst_input: str) -> str:
    """One sentence: the cause with its figures, and what the user can change."""
    raise_hint = "a Threshold lets qnnlib raise it to int16"
    level = {k: sqnr_of_error(v) for k, v in sources.items()}  # each source in dB
    if cause == "amplification":
        passed = sum(v for k, v in sources.items() if k != "amplification")
        return (f"amplifies the error it receives: {sqnr_of_error(e.measured):.1f} dB at its output against "
                f"{sqnr_of_error(passed):.1f} dB from its inputs, weights and output grid together; its output "
                f"keeps a small part of what it sums (nearly cancelling terms, a Relu cutting most of it, "
                f"a steep nonlinearity) while the error passes whole; less error into it helps: 16 bits "
                f"for its input {worst_input!r} ({raise_hint})")
    if cause == "inputs":
        return (f"inherits its error: input {worst_input!r} already carries {level['inputs']:.1f} dB; "
                f"look at the layer writing it")
    if cause == "weights":
        bits = e.weights[1] if e.weights is not None else 8
        return (f"weight rounding at {bits} bits: {level['weights']:.1f} dB; QuantConfig(optimize=True) "
                f"searches per-channel weight clipping, or {raise_hint} (weights too), or "
                f"exclude=({e.node!r},) keeps it float")
    assert e.output is not None and e.output_params is not None
    lo, hi = representable_range(e.output_params.scale, e.output_params.zero_point, qtype(e.output_params.qtype))
    if cause == "output clipping":
        wider = (f"TensorOverride(range=({e.extremes[0]:.4g}, {e.extremes[1]:.4g})) for {e.output_tensor!r} "
                 f"(its observed extremes), " if e.extremes is not None else "")
        return (f"output clipping: {100 * e.output.clipped:.2g}% of its values fall outside [{lo:.4g}, {hi:.4g}] "
                f"({level['output clipping']:.1f} dB); widen the range: {wider}method='mse', or "
                f"QuantConfig(optimize=True)")
    spread = (hi - lo) / e.output.rms if e.output.rms > 0 else math.inf
    return (f"output rounding on a step of {e.output_params.scale:.3g} ({level['output rounding']:.1f} dB): "
            f"the range [{lo:.4g}, {hi:.4g}] spans {spread:.0f}x the values' RMS {e.output.rms:.3g}, so "
            f"rare large values set the step; a clipping method (method='percentile' or 'mse'), or "
            f"{raise_hint}")
