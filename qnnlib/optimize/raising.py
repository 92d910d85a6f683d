"""Meet the user's threshold by raising the precision of the layers that hurt most.

1. The candidate model (onnxruntime, fused integer kernels) runs on the validation samples; if the
   threshold's metric is met, nothing more is done.
2. Otherwise every quantised layer's own harm is measured on the same samples: the relative noise
   ``|out_q - out_f|^2 / |out_f|^2`` at its output minus the largest at its quantised inputs, so a
   layer is not blamed for the error it receives.
3. Layers are raised in order of harm, first to 16 bits (their tied groups become uint16 and their
   weights int16), then, as the last resort, to float (groups and weights float): 1, 2, 4, ... layers at a
   time until the threshold is met, then a binary search finds the fewest raised layers that still
   meet it. Every candidate is measured, and the best one found is kept whether or not the
   threshold is ever met.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from qnnlib.emit.qdq import Emitted
from qnnlib.graph.edit import with_outputs
from qnnlib.graph.model_io import make_session
from qnnlib.numerics import affine
from qnnlib.plan import QuantPlan
from qnnlib.threshold import Threshold, output_metric

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
#: Precision levels a layer can be raised to, in order.
LEVELS = ("int16", "float")


@dataclass(frozen=True)
class Step:
    """One measured candidate: how many layers were raised to which level, and the metric value."""

    raised: int
    level: str
    value: float
    met: bool


@dataclass
class Outcome:
    """The chosen candidate, what was raised and why, and every step measured."""

    plan: QuantPlan
    emitted: Emitted
    value: float
    met: bool
    float_score: float | None
    initial_value: float
    raised: dict[str, str] = field(default_factory=dict)
    harm: dict[str, float] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    seconds: float = 0.0


def _cost(raised: Mapping[str, str]) -> tuple[int, int]:
    """Float layers weigh more than 16-bit ones: (float layers, 16-bit layers)."""
    levels = list(raised.values())
    return levels.count("float"), levels.count("int16")


class Evaluator:
    """Measures the threshold's metric of a candidate model on the validation samples."""

    def __init__(self, threshold: Threshold, float_model: onnx.ModelProto, validation: Sequence[Feed]) -> None:
        self.threshold = threshold
        self.validation = list(validation)
        float_session = make_session(float_model, log_errors_as="float model")
        self.reference = [float_session.run(None, f) for f in self.validation]
        self.float_score = float(threshold.eval_fn(float_session)) if threshold.eval_fn is not None else None

    def value(self, model: onnx.ModelProto) -> float:
        """The metric value of ``model`` (higher is better for eval_fn, per the threshold otherwise)."""
        session = make_session(model, log_errors_as="candidate model")
        if self.threshold.eval_fn is not None:
            return float(self.threshold.eval_fn(session))
        got = [session.run(None, f) for f in self.validation]
        return output_metric(self.threshold.metric, self.reference, got)  # type: ignore[arg-type]

    def met(self, value: float) -> bool:
        """Whether ``value`` satisfies the threshold."""
        return self.threshold.is_met(value, self.float_score)

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is a better value than ``b``."""
        return a > b if self.threshold.eval_fn is not None else self.threshold.better(a, b)


def layer_harm(float_model: onnx.ModelProto, emitted: Emitted, plan: QuantPlan, feeds: Sequence[Feed],
               measured: Mapping[str, str]) -> dict[str, float]:
    """Each quantising layer's own relative noise: at its output minus the largest at its inputs.

    ``measured`` maps a layer to the tensor its output is measured at (a folded activation's output,
    or its own float output, read by name).
    Layers whose inputs and output share one tied group (Relu, MaxPool, Concat, reshapes) add no
    quantisation of their own and are not ranked.
    """
    ranked = {}
    for layer in plan.layers:
        out = measured.get(layer.node, "")
        group = plan.group_of(out) if out else None
        if group is not None and layer.inputs and all(plan.group_of(t) is group for t in layer.inputs):
            continue
        if out and (out in emitted.quantized_names or group is None):
            ranked[layer.node] = (out, [t for t in layer.inputs if t in emitted.quantized_names])
    tensors = sorted({t for out, ins in ranked.values() for t in (out, *ins)})
    if not tensors:
        return {}
    float_session = make_session(with_outputs(float_model, tensors), log_errors_as="float model")
    names = [emitted.quantized_names.get(t, t) for t in tensors]  # a float output is read by its own name
    quant_session = make_session(with_outputs(emitted.model, names), log_errors_as="candidate model")
    noise = dict.fromkeys(tensors, 0.0)
    signal = dict.fromkeys(tensors, 0.0)
    for feed in feeds:
        ref = float_session.run(tensors, feed)
        got = quant_session.run(names, feed)
        for t, r, value in zip(tensors, ref, got, strict=True):
            q = value
            if t in emitted.quantized_names:
                p = plan.params(t)
                q = affine.dequantize(value, p.scale, p.zero_point)
            d = (np.asarray(r, np.float32) - np.asarray(q, np.float32)).ravel()
            noise[t] += float(d @ d)
            signal[t] += float(np.square(np.asarray(r, np.float32)).sum())
    relative = {t: noise[t] / signal[t] if signal[t] > 0 else 0.0 for t in tensors}
    return {node: max(0.0, relative[out] - max((relative[t] for t in ins), default=0.0))
            for node, (out, ins) in ranked.items()}


def unchanged(evaluator: Evaluator, plan: QuantPlan, emitted: Emitted) -> Outcome:
    """The outcome of keeping a candidate as it is: measured once, nothing raised."""
    start = time.perf_counter()
    value = evaluator.value(emitted.model)
    met = evaluator.met(value)
    return Outcome(plan, emitted, value, met, evaluator.float_score, value, steps=[Step(0, "int8", value, met)],
                   seconds=time.perf_counter() - start)


def meet_threshold(evaluator: Evaluator, initial: tuple[QuantPlan, Emitted],
                   build: Callable[[Mapping[str, str]], tuple[QuantPlan, Emitted]],
                   harm: Callable[[QuantPlan, Emitted], dict[str, float]], levels: Sequence[str]) -> Outcome:
    """Raise layers (``build(raised)`` makes the candidate for ``{layer: level}``); see the module docstring."""
    start = time.perf_counter()
    plan, emitted = initial
    outcome = unchanged(evaluator, plan, emitted)
    value = outcome.value
    if outcome.met:
        return outcome
    outcome.harm = harm(plan, emitted)
    order = [layer for layer, _ in sorted(outcome.harm.items(), key=lambda kv: -kv[1])]
    sizes = sorted({min(2**i, len(order)) for i in range(len(order).bit_length() + 1)} - {0})
    best: tuple[float, QuantPlan, Emitted, dict[str, str]] = (value, plan, emitted, {})

    def measure(raised: dict[str, str], level: str) -> bool:
        """Build, run and record one candidate; keep it if it is the best so far."""
        nonlocal best
        cand_plan, cand_emitted = build(raised)
        v = evaluator.value(cand_emitted.model)
        ok = evaluator.met(v)
        outcome.steps.append(Step(len(raised), level, v, ok))
        if ok:
            if not evaluator.met(best[0]) or _cost(raised) < _cost(best[3]):
                best = (v, cand_plan, cand_emitted, dict(raised))
        elif not evaluator.met(best[0]) and evaluator.better(v, best[0]):
            best = (v, cand_plan, cand_emitted, dict(raised))
        return ok

    def raise_at(level: str, base: dict[str, str]) -> bool:
        """Raise the fewest harmful layers to ``level`` (on top of ``base``) that meet the threshold."""
        previous = 0
        for size in sizes:
            if measure({**base, **dict.fromkeys(order[:size], level)}, level):
                lo, hi = previous, size  # the fewest layers that meet it lie in (lo, hi]
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if measure({**base, **dict.fromkeys(order[:mid], level)}, level) else (mid, hi)
                return True
            previous = size
        return False

    base: dict[str, str] = {}
    for level in (lv for lv in LEVELS if lv in levels):
        if raise_at(level, base):
            break
        base = dict.fromkeys(order, level)  # this level everywhere was not enough: go on from there
    outcome.value, outcome.plan, outcome.emitted, outcome.raised = best
    outcome.met = evaluator.met(outcome.value)
    outcome.seconds = time.perf_counter() - start
    return outcome
