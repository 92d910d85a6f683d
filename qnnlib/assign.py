"""Choose each tied group's precision: the least cost whose estimated output error fits a budget.

Over the measured sensitivities (:mod:`qnnlib.sensitivity`) the output error of a configuration is
estimated as additive,

    E(p_1, ..., p_G) ~ sum over groups g of e_g(p_g),

where ``e_g(p)`` is the output error with only group ``g`` at ``p`` (``e_g("float") = 0``), and its
cost as ``sum_g c_g(p_g)``: by default the bytes of the group's owned weights at ``p``
(``weights * bits / 8``, float 32 bits). Two solvers:

* :func:`assign_greedy`: every group starts at its cheapest precision; while the estimate exceeds
  the budget, the move (one group to a dearer precision) that removes the most error per unit of
  cost added is taken;
* :func:`assign_milp`: the exact optimum of the same problem as an integer programme with
  ``scipy.optimize.milp``, binaries ``x[g, p]``:

      minimise sum c_g(p) x[g, p]   subject to   sum_p x[g, p] = 1 for each g,
                                                 sum e_g(p) x[g, p] <= budget.

The estimate is only an estimate (errors of different groups partly cancel or compound); a
choice is to be checked with a real run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: Bits per weight at each precision, for the default cost.
WEIGHT_BITS = {"int4": 4, "int8": 8, "int16": 16, "float": 32}

Table = Mapping[int, Mapping[str, float]]


@dataclass(frozen=True)
class Assignment:
    """A precision per group, its estimated output error and its cost."""

    precisions: dict[int, str]
    estimate: float
    cost: float


def weight_bytes(weights: int, precision: str) -> float:
    """``weights * bits(precision) / 8``: the bytes a group's owned weights take at ``precision``."""
    return weights * WEIGHT_BITS[precision] / 8


def _evaluate(choice: Mapping[int, str], errors: Table, costs: Table) -> Assignment:
    return Assignment(dict(choice), float(sum(errors[g][p] for g, p in choice.items())),
                      float(sum(costs[g][p] for g, p in choice.items())))


def _cheapest(errors: Mapping[str, float], costs: Mapping[str, float]) -> str:
    """The cheapest precision, the least error among equally cheap ones."""
    return min(errors, key=lambda p: (costs[p], errors[p]))


def assign_greedy(errors: Table, costs: Table, budget: float) -> Assignment | None:
    """The greedy choice (see the module docstring), or None when even the dearest choice misses ``budget``."""
    choice = {g: _cheapest(errors[g], costs[g]) for g in errors}
    while (current := _evaluate(choice, errors, costs)).estimate > budget:
        best: tuple[float, int, str] | None = None
        for g, p in choice.items():
            for q in errors[g]:
                gain, extra = errors[g][p] - errors[g][q], costs[g][q] - costs[g][p]
                if gain > 0 and extra >= 0:
                    ratio = gain / extra if extra > 0 else np.inf
                    if best is None or ratio > best[0]:
                        best = (ratio, g, q)
        if best is None:
            return None
        choice[best[1]] = best[2]
    return current


def assign_milp(errors: Table, costs: Table, budget: float) -> Assignment | None:
    """The least-cost choice whose estimate fits ``budget`` (see the module docstring), or None if none does."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # imported here: scipy costs 0.4 s to import

    keys = [(g, p) for g in errors for p in errors[g]]
    if not keys:
        return Assignment({}, 0.0, 0.0)
    groups = list(errors)
    c = np.array([costs[g][p] for g, p in keys], np.float64)
    e = np.array([errors[g][p] for g, p in keys], np.float64)
    one = np.array([[1.0 if g == h else 0.0 for h, _ in keys] for g in groups])
    constraints = [LinearConstraint(one, 1.0, 1.0), LinearConstraint(e[None, :], -np.inf, budget)]
    result = milp(c, constraints=constraints, integrality=np.ones(len(keys)), bounds=Bounds(0.0, 1.0))
    if result.x is None:
        return None
    choice = {g: p for (g, p), x in zip(keys, result.x, strict=True) if x > 0.5}
    return _evaluate(choice, errors, costs)


def curve(errors: Table, costs: Table, budgets: Sequence[float]) -> list[Assignment]:
    """The least-cost assignment at each budget (infeasible budgets left out), in the order given."""
    points = [assign_milp(errors, costs, b) for b in budgets]
    return [p for p in points if p is not None]
