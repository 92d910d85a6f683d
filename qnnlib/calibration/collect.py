"""Run the float model once over the calibration data and update observers batch by batch.

The tensors to observe become extra graph outputs of a private copy of the model; one
onnxruntime session runs it feed by feed. Only the current feed's tensors are in memory, so
memory does not grow with the number of samples.

For the first ``capture_samples`` feeds the pass also keeps a fixed, evenly spread subset of the
values of the ``capture`` tensors and of the graph outputs (:func:`reference_positions`): the float
references that the report's fidelity figures are measured against, without a second float pass.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import onnx

from qnnlib.calibration.feeds import FeedSource
from qnnlib.calibration.histogram import StreamingHistogram
from qnnlib.calibration.methods import CalibrationMethod, HistogramObserver, Observer
from qnnlib.errors import SessionError, first_line
from qnnlib.graph.model_io import make_session
from qnnlib.numerics.metrics import reference_positions

log = logging.getLogger(__name__)

#: onnxruntime threads in the calibration pipeline: one, so that the observers have the other core
#: (measured faster than two on three of the four benchmark models). Two single-thread runs in flight
#: on different samples were measured no faster in fresh processes, at 50 MB more peak memory.
CALIBRATION_THREADS: int | None = 1
#: Largest size of one sample's observed tensors at which two samples may be in flight.
PIPELINE_BYTES = 256 << 20
#: Values kept per captured tensor and sample; per graph output and sample.
CAPTURE_VALUES = 4096
OUTPUT_VALUES = 1 << 16


@dataclass(frozen=True)
class Reference:
    """Float reference values of one sample: subsets of captured tensors and of graph outputs."""

    tensors: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


@dataclass
class CalibrationStats:
    """Per-tensor ranges from one pass; NaN/inf counts; float references of the first samples."""

    ranges: dict[str, tuple[float, float]]
    samples: int
    nonfinite: dict[str, int] = field(default_factory=dict)
    references: list[Reference] = field(default_factory=list)
    extremes: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: Per tensor, the least-squared-error range at ``low_bit_levels`` levels, when asked for.
    low_bit_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: Per observed tensor, its histogram (histogram methods only): the report's error diagnosis reads
    #: it. The observers held them during the pass, so keeping them adds no peak memory.
    histograms: dict[str, StreamingHistogram] = field(default_factory=dict)


def collect(model: onnx.ModelProto, observe: Sequence[str], feeds: FeedSource, method: CalibrationMethod,
            *, levels: int, symmetric: bool, capture: Sequence[str] = (), capture_samples: int = 0,
            low_bit_levels: int | None = None, constants: Mapping[str, np.ndarray] | None = None) -> CalibrationStats:
    """Observe ``observe`` over every feed and return each tensor's chosen range (see the module docstring).

    ``low_bit_levels``: also give each tensor's least-squared-error range at that many levels (for
    4-bit precisions, where clipping decides: :meth:`Observer.mse_range_at`). ``constants``:
    quantised constants (an Add's constant operand, an embedding table) by name, observed once for
    their extremes and low-bit ranges; their 8-bit range is their min and max (the planner's).
    """
    observers: dict[str, Observer] = {t: method.observer(levels, symmetric) for t in observe}
    graph_outputs = [o.name for o in model.graph.output]
    wanted = list(dict.fromkeys([*observe, *capture, *graph_outputs])) if capture_samples else list(observe)
    nonfinite: dict[str, int] = {}
    references: list[Reference] = []
    samples = 0
    if not wanted:
        return CalibrationStats({}, sum(1 for _ in feeds))
    # A two-stage pipeline: onnxruntime (one thread) runs sample i + 1 while this thread updates the
    # observers with sample i, so two samples' tensors are alive at once. When one sample's tensors
    # exceed PIPELINE_BYTES the pass runs one sample at a time instead.
    sessions = [make_session(model, outputs=wanted, threads=CALIBRATION_THREADS,
                             log_errors_as="float model for calibration")]
    observe_only = list(observe)

    def run(index: int, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = wanted if index < capture_samples else observe_only
        if not names:  # onnxruntime's run([]) returns every output, not none
            return {}
        try:
            return dict(zip(names, sessions[-1].run(names, feed), strict=True))
        except Exception as exc:  # onnxruntime's own exception types
            raise SessionError(f"onnxruntime failed on calibration sample {index}: {first_line(exc)}") from exc

    def consume(values: dict[str, np.ndarray]) -> None:
        _consume(values, observers, nonfinite, references=references, captured=capture, outputs=graph_outputs,
                 capture=len(references) < capture_samples)

    pipelined = True
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qnnlib-calibrate") as pool:
        pending: Future[dict[str, np.ndarray]] | None = None
        for feed in feeds:
            upcoming = pool.submit(run, samples, feed)
            samples += 1
            if pending is not None:
                consume(pending.result())
            pending = upcoming
            if samples == 1:
                pipelined = sum(np.asarray(v).nbytes for v in pending.result().values()) <= PIPELINE_BYTES
                if not pipelined:  # one sample at a time: give onnxruntime every core
                    sessions.clear()  # one session alive at a time: each holds the model's weights
                    sessions.append(make_session(model, outputs=wanted, log_errors_as="float model for calibration"))
            if not pipelined:
                consume(pending.result())
                pending = None
        if pending is not None:
            consume(pending.result())
    for name, count in nonfinite.items():
        log.warning("tensor %r held %d NaN/inf values during calibration; they were ignored", name, count)
    everything = dict(observers)
    for name, value in (constants or {}).items():
        everything[name] = method.observer(levels, symmetric)
        _observe(everything[name], name, np.asarray(value), {})
    extremes = {t: (float(o.min_), float(o.max_)) for t, o in everything.items() if np.isfinite(o.min_)}
    low_bit = ({t: o.mse_range_at(low_bit_levels, symmetric) for t, o in everything.items()}
               if low_bit_levels is not None else {})
    histograms = {t: o.histogram for t, o in observers.items()
                   if isinstance(o, HistogramObserver) and not o.histogram.empty}
    return CalibrationStats({t: observers[t].range_ for t in observe}, samples, nonfinite, references, extremes,
                            low_bit, histograms)


def _consume(values: dict[str, np.ndarray], observers: dict[str, Observer], nonfinite: dict[str, int], *,
             references: list[Reference], captured: Sequence[str], outputs: Sequence[str], capture: bool) -> None:
    """Fold one sample's tensors into the observers; keep its references while they are wanted."""
    for name, observer in observers.items():
        _observe(observer, name, np.asarray(values[name]), nonfinite)
    if capture:
        references.append(_capture(values, captured, outputs))


def _capture(values: dict[str, np.ndarray], capture: Sequence[str], outputs: Sequence[str]) -> Reference:
    def subset(name: str, count: int) -> np.ndarray:
        flat = np.asarray(values[name]).reshape(-1)
        return flat[reference_positions(flat.size, count)].astype(np.float32)

    return Reference(
        {name: subset(name, CAPTURE_VALUES) for name in capture},
        {name: subset(name, OUTPUT_VALUES) for name in outputs if np.asarray(values[name]).dtype.kind == "f"},
    )


def _observe(observer: Observer, name: str, value: np.ndarray, nonfinite: dict[str, int]) -> None:
    if value.size == 0:
        return
    value = value.reshape(-1)
    if value.dtype != np.float32:
        value = value.astype(np.float32)
    lo, hi = float(value.min()), float(value.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        finite = np.isfinite(value)
        nonfinite[name] = nonfinite.get(name, 0) + int(value.size - np.count_nonzero(finite))
        value = value[finite]
        if value.size == 0:
            return
        lo, hi = float(value.min()), float(value.max())
    observer.update(value, lo, hi)
