"""Meet the threshold at the least cost with a precision per tied group.

Used by :func:`qnnlib.quantize` when ``QuantConfig.precisions`` holds ``"int4"``:

1. The sensitivity estimate (:func:`qnnlib.sensitivity.analyse_plan`) of the calibrated int8 plan
   gives each group's output error ``e_g(p)`` at every allowed precision (``float``: 0).
2. The accuracy/cost curve: for :data:`CURVE_BUDGETS` error budgets spaced geometrically from a
   tenth of the smallest group error to the all-lowest-precision estimate, and zero, the least-cost
   assignment (:func:`qnnlib.assign.assign_milp`); points that another beats on both cost and
   estimate are dropped, the rest ordered from the cheapest.
3. The estimate orders the points; real runs decide. The all-int8 point is added to the curve
   (in cost order) and measured first: when it meets the threshold only cheaper points are
   searched, else only dearer ones. A binary search then measures the emitted model of a point on
   the validation data with the threshold's metric and finds the cheapest point that meets it,
   assuming that a dearer point (less estimated error) is not worse; every point measured is kept
   in the curve with its value. If no measured point meets the threshold, the best measured one is
   kept.
4. Refinement (:func:`_refine`): from the point found, each group above int8 is tried once at its
   next cheaper precision (not below int8), by real runs, and kept there while the threshold is
   still met. The estimate is additive and smooth; a metric such as top-1 agreement on a few
   samples is neither, and the curve point can raise far more than the one flipped sample needs.

The cost of a point is the model's weight bytes by default (each group's owned weights at its
precision, float 4 bytes), its bit-operations (``"bitops"``: ``sum_g macs_g * bits^2``), or
``sum_g cost(group, precision)`` for a callable ``cost``.

A point by cost: ``max_cost`` and ``max_above_int8`` (a share of the weighted layers at int16 or
float) limit every point of the curve (constraints of the integer programme). With a threshold the
search above runs over the limited curve; without one (:func:`choose_within`) the point with the
least estimated error within the limits is taken.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from qnnlib.assign import Assignment, Limit, assign_milp, most_accurate
from qnnlib.emit.qdq import Emitted
from qnnlib.errors import ConfigError
from qnnlib.optimize.raising import Evaluator, Outcome, Step
from qnnlib.plan import QuantPlan
from qnnlib.sensitivity import GroupSensitivity, SensitivityReport

log = logging.getLogger(__name__)

#: Error budgets the curve is computed at (plus zero).
CURVE_BUDGETS = 24
#: Real runs the refinement after the search may spend (one per group at most).
REFINE_RUNS = 64
#: The least share of the point's cost a refinement trial must save to be tried.
REFINE_MIN_SAVING = 0.001
#: Precisions that count as "above int8" for ``max_above_int8``.
ABOVE_INT8 = ("int16", "float")
#: A user cost: the cost of one group at one precision.
CostFn = Callable[[GroupSensitivity, str], float]


@dataclass
class CurvePoint:
    """One assignment on the accuracy/cost curve; ``value`` and ``met`` once measured."""

    precisions: dict[int, str]
    cost: float
    estimate: float
    value: float | None = None
    met: bool | None = None
    chosen: bool = False

    def counts(self) -> dict[str, int]:
        """Groups per precision."""
        return dict(Counter(self.precisions.values()))


@dataclass
class MixedOutcome:
    """The threshold outcome (as for raising) and the whole curve with the chosen point marked."""

    outcome: Outcome  # value NaN when chosen by cost alone (no threshold)
    curve: list[CurvePoint] = field(default_factory=list)
    report: SensitivityReport | None = None
    #: The refinement's trials (:func:`_refine`), in the order measured; the chosen point may be one.
    refined: list[CurvePoint] = field(default_factory=list)


def cost_table(report: SensitivityReport, allowed: Sequence[str], cost: str | CostFn) -> dict[int, dict[str, float]]:
    """Each group's cost at each allowed precision: weight bytes, bit-operations or the user's ``cost``."""
    if isinstance(cost, str):
        table = report.cost_table(cost)
        return {g: {p: c for p, c in row.items() if p in allowed} for g, row in table.items()}
    assert callable(cost)
    return {g.group: {p: float(cost(g, p)) for p in allowed} for g in report.groups}


def error_table(report: SensitivityReport, allowed: Sequence[str]) -> dict[int, dict[str, float]]:
    """Each group's estimated output error at each allowed precision (``float``: 0)."""
    table = report.error_table()
    return {g: {p: e for p, e in row.items() if p in allowed} for g, row in table.items()}


def cost_limits(report: SensitivityReport, costs: Mapping[int, Mapping[str, float]], *,
                max_cost: float | None, max_above_int8: float | None) -> list[Limit]:
    """The limits a point by cost sets: total cost, and weighted layers at int16 or float."""
    limits = []
    if max_cost is not None:
        limits.append(Limit(costs, max_cost, f"max_cost={max_cost:g}"))
    if max_above_int8 is not None:
        # a group above int8 takes the weighted layers reading it (their weights follow it) and writing it
        # out of int8; a layer between two such groups counts twice, so the limit errs on the safe side
        layers = {g.group: len(set(g.layers) | set(g.writers)) for g in report.groups}
        total = len({n for g in report.groups for n in (*g.layers, *g.writers)})
        above = {g: {p: float(layers[g]) if p in ABOVE_INT8 else 0.0 for p in row} for g, row in costs.items()}
        allowed = math.floor(max_above_int8 * total + 1e-9)
        limits.append(Limit(above, allowed, f"max_above_int8={max_above_int8:g} ({allowed} of {total} weighted "
                                            "layers)"))
    return limits


def curve_points(errors: Mapping[int, Mapping[str, float]], costs: Mapping[int, Mapping[str, float]],
                 limits: Sequence[Limit] = ()) -> list[CurvePoint]:
    """The curve (see the module docstring): cheapest first, no point beaten on both cost and estimate.

    With ``limits`` every point keeps within them and the most accurate such point is on the curve;
    ConfigError when no choice does.
    """
    positive = [e for row in errors.values() for e in row.values() if e > 0]
    if not positive:
        found = [assign_milp(errors, costs, 0.0, limits)]
    else:
        lo, hi = min(positive) / 10, sum(max(row.values()) for row in errors.values())
        budgets = [0.0, *np.geomspace(lo, hi * 1.000001, CURVE_BUDGETS).tolist()]
        found = [assign_milp(errors, costs, b, limits) for b in budgets]
    if limits:
        found.append(most_accurate(errors, costs, limits))
        if all(a is None for a in found):
            cheapest = float(sum(min(row.values()) for row in costs.values()))
            raise ConfigError(f"no precision choice keeps within {', '.join(lim.name for lim in limits)}; the "
                              f"cheapest costs {cheapest:.6g}: raise the limit or allow cheaper precisions")
    unique: dict[tuple[tuple[int, str], ...], Assignment] = {}
    for a in found:
        if a is not None:
            unique.setdefault(tuple(sorted(a.precisions.items())), a)
    ordered = sorted(unique.values(), key=lambda a: (a.cost, a.estimate))
    front: list[Assignment] = []
    for a in ordered:
        if not front or a.estimate < front[-1].estimate:
            front.append(a)
    return [CurvePoint(a.precisions, a.cost, a.estimate) for a in front]


def choose_within(report: SensitivityReport, allowed: Sequence[str], cost: str | CostFn,
                  build: Callable[[Mapping[int, str]], tuple[QuantPlan, Emitted]], *,
                  max_cost: float | None, max_above_int8: float | None) -> MixedOutcome:
    """A point by cost without a threshold: the least estimated error within the limits, unmeasured."""
    start = time.perf_counter()
    errors, costs = error_table(report, allowed), cost_table(report, allowed, cost)
    points = curve_points(errors, costs, cost_limits(report, costs, max_cost=max_cost, max_above_int8=max_above_int8))
    chosen = points[-1]  # the curve runs from the cheapest to the least estimated error
    chosen.chosen = True
    plan, emitted = build(chosen.precisions)
    outcome = Outcome(plan, emitted, math.nan, True, None, math.nan,
                      raised={layer.node: layer.precision for layer in plan.layers if layer.precision != "int8"},
                      raised_groups={g: p for g, p in chosen.precisions.items() if p != "int8"},
                      seconds=time.perf_counter() - start)
    return MixedOutcome(outcome, points, report)


def search_mixed(evaluator: Evaluator, report: SensitivityReport, allowed: Sequence[str], cost: str | CostFn,
                 build: Callable[[Mapping[int, str]], tuple[QuantPlan, Emitted]], *,
                 max_cost: float | None = None, max_above_int8: float | None = None) -> MixedOutcome:
    """The cheapest curve point meeting the threshold on real runs (see the module docstring)."""
    start = time.perf_counter()
    errors, costs = error_table(report, allowed), cost_table(report, allowed, cost)
    limits = cost_limits(report, costs, max_cost=max_cost, max_above_int8=max_above_int8)
    points = curve_points(errors, costs, limits)
    base = _with_int8(points, errors, costs, limits)
    built: dict[int, tuple[QuantPlan, Emitted]] = {}

    def measure(i: int) -> bool:
        point = points[i]
        if point.value is None:
            built[i] = build(point.precisions)
            point.value = evaluator.value(built[i][1].model)
            point.met = evaluator.met(point.value)
            log.info("curve point %d/%d (cost %.4g, estimate %.3g): %.6g, %s", i + 1, len(points), point.cost,
                     point.estimate, point.value, "met" if point.met else "not met")
        return bool(point.met)

    # the all-int8 point (when within the limits) splits the curve: when it meets, only cheaper points can
    # do better
    if base is None:
        lo, hi = 0, len(points) - 1
    else:
        lo, hi = (0, base) if measure(base) else (base + 1, len(points) - 1)
    if lo <= hi and measure(hi):
        while lo < hi:  # invariant: hi meets
            mid = (lo + hi) // 2
            if measure(mid):
                hi = mid
            else:
                lo = mid + 1
        best = hi
    else:
        measured = [i for i, p in enumerate(points) if p.value is not None]
        best = measured[0]
        for i in measured[1:]:
            if evaluator.better(points[i].value, points[best].value):  # type: ignore[arg-type]
                best = i
    chosen, (plan, emitted) = points[best], built[best]
    refined: list[CurvePoint] = []
    if chosen.met:
        chosen, (plan, emitted) = _refine(chosen, (plan, emitted), refined, errors=errors, costs=costs,
                                          limits=limits, evaluator=evaluator, build=build)
    chosen.chosen = True
    steps = [Step(sum(1 for q in p.precisions.values() if q != "int8"), "mixed", p.value, bool(p.met),
                  _layers_off_int8(p.precisions, report))
             for p in [*points, *refined] if p.value is not None]
    assert chosen.value is not None
    outcome = Outcome(plan, emitted, chosen.value, bool(chosen.met), evaluator.float_score, math.nan,
                      raised={layer.node: layer.precision for layer in plan.layers if layer.precision != "int8"},
                      raised_groups={g: p for g, p in chosen.precisions.items() if p != "int8"},
                      steps=steps, seconds=time.perf_counter() - start)
    return MixedOutcome(outcome, points, report, refined)


def _refine(start: CurvePoint, model: tuple[QuantPlan, Emitted], trials: list[CurvePoint], *,
            errors: Mapping[int, Mapping[str, float]], costs: Mapping[int, Mapping[str, float]],
            limits: Sequence[Limit], evaluator: Evaluator,
            build: Callable[[Mapping[int, str]], tuple[QuantPlan, Emitted]]) -> tuple[CurvePoint, tuple[QuantPlan,
                                                                                                     Emitted]]:
    """Lower groups of the met point ``start`` one step each while real runs still meet the threshold.

    A curve point is the least-cost choice for an *estimated* error; when the estimate is
    pessimistic (one flipped sample decides a top-1 threshold) it raises more than needed. Each
    group above int8 is tried once at its next cheaper precision (never below int8), those adding
    the least estimated error per unit of cost saved first, and kept there if the model still
    meets the threshold: at most one real run per raised group, :data:`REFINE_RUNS` in all, and
    only for a step that saves at least :data:`REFINE_MIN_SAVING` of the point's cost. Both limits
    were measured: lowering int8 groups to int4 as well met the validation threshold at 1% less
    size on UltraFace and the orientation model and lost 6-7 points more on held-out inputs; lowering
    the orientation model's raised groups that own no weights (their cost only breaks ties) or 144
    bytes saved 0.02% and lost it 10 points on held-out inputs (the validation threshold, one sample
    in 32, cannot tell). On SqueezeNet the steps kept saved 0.3-2.7% each. Every trial is
    appended to ``trials``; returns the cheapest point that met (``start`` if none) and its model.
    """
    best, current = start, dict(start.precisions)
    order = []
    for g, p in current.items():
        floor = costs[g].get("int8", math.inf)
        cheaper = [q for q in costs[g] if floor <= costs[g][q] < costs[g][p]]
        if cheaper:
            q = max(cheaper, key=lambda c: costs[g][c])
            saved = costs[g][p] - costs[g][q]
            if saved >= REFINE_MIN_SAVING * start.cost:
                order.append(((errors[g][q] - errors[g][p]) / saved, g, q))
    for _, g, q in sorted(order)[:REFINE_RUNS]:
        choice = {**current, g: q}
        if not all(lim.holds(choice) for lim in limits):
            continue
        point = CurvePoint(choice, float(sum(costs[k][v] for k, v in choice.items())),
                           float(sum(errors[k][v] for k, v in choice.items())))
        made = build(choice)
        point.value = evaluator.value(made[1].model)
        point.met = evaluator.met(point.value)
        trials.append(point)
        log.info("refining: group %d %s -> %s (cost %.4g): %.6g, %s", g, current[g], q, point.cost, point.value,
                 "met" if point.met else "not met")
        if point.met:
            best, current, model = point, choice, made
    return best, model


def _with_int8(points: list[CurvePoint], errors: Mapping[int, Mapping[str, float]],
               costs: Mapping[int, Mapping[str, float]], limits: Sequence[Limit] = ()) -> int | None:
    """Put the all-int8 point in ``points`` (in cost order) if it is not there; its index (None: outside limits)."""
    int8 = dict.fromkeys(errors, "int8")
    if not all(lim.holds(int8) for lim in limits):
        return None
    for i, p in enumerate(points):
        if p.precisions == int8:
            return i
    point = CurvePoint(int8, float(sum(costs[g]["int8"] for g in int8)), float(sum(errors[g]["int8"] for g in int8)))
    at = next((i for i, p in enumerate(points) if (p.cost, p.estimate) > (point.cost, point.estimate)), len(points))
    points.insert(at, point)
    return at


def _layers_off_int8(precisions: Mapping[int, str], report: SensitivityReport) -> int:
    """Weighted layers whose group is not at int8."""
    return sum(len(g.layers) for g in report.groups if precisions.get(g.group, "int8") != "int8")
