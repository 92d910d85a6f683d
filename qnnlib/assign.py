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
                                                 sum e_g(p) x[g, p] <= budget,
                                                 sum a_g(p) x[g, p] <= bound for each Limit.

:func:`most_accurate` solves the converse, a point by cost: the least estimated error within the
limits (at most a cost, at most a share of layers above int8).

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


@dataclass(frozen=True)
class Limit:
    """A linear limit on a choice: ``sum_g coefficients[g][p_g] <= bound``; ``name`` for messages."""

    coefficients: Table
    bound: float
    name: str

    def holds(self, choice: Mapping[int, str]) -> bool:
        """Whether ``choice`` keeps within the limit."""
        return sum(self.coefficients[g][p] for g, p in choice.items()) <= self.bound * (1 + 1e-9) + 1e-12


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


def assign_milp(errors: Table, costs: Table, budget: float, limits: Sequence[Limit] = ()) -> Assignment | None:
    """The least-cost choice whose estimate fits ``budget`` within ``limits``, or None if none does."""
    e = _row(errors, errors)
    return _solve(errors, costs, _row(errors, costs), [(e, budget)] + [(_row(errors, lim.coefficients), lim.bound)
                                                                        for lim in limits])


def most_accurate(errors: Table, costs: Table, limits: Sequence[Limit]) -> Assignment | None:
    """The least estimated error within ``limits`` (cost breaks ties), or None if no choice keeps within them."""
    e, c = _row(errors, errors), _row(errors, costs)
    tie = 1e-9 * max(float(np.abs(e).max(initial=0.0)), 1e-30) / max(float(np.abs(c).max(initial=0.0)), 1e-30)
    return _solve(errors, costs, e + tie * c, [(_row(errors, lim.coefficients), lim.bound) for lim in limits])


def _row(errors: Table, table: Table) -> np.ndarray:
    """``table`` laid out along the binaries ``x[g, p]`` (groups and precisions in the order of ``errors``)."""
    return np.array([table[g][p] for g in errors for p in errors[g]], np.float64)


def _solve(errors: Table, costs: Table, objective: np.ndarray,
           rows: Sequence[tuple[np.ndarray, float]]) -> Assignment | None:
    """Minimise ``objective . x`` with one precision per group and ``row . x <= bound`` for each row."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # imported here: scipy costs 0.4 s to import

    keys = [(g, p) for g in errors for p in errors[g]]
    if not keys:
        return Assignment({}, 0.0, 0.0)
    one = np.array([[1.0 if g == h else 0.0 for h, _ in keys] for g in errors])
    constraints = [LinearConstraint(one, 1.0, 1.0)]
    constraints += [LinearConstraint(row[None, :], -np.inf, bound) for row, bound in rows]
    result = milp(objective, constraints=constraints, integrality=np.ones(len(keys)), bounds=Bounds(0.0, 1.0))
    if result.x is None:
        return None
    choice = {g: p for (g, p), x in zip(keys, result.x, strict=True) if x > 0.5}
    return _evaluate(choice, errors, costs)


def curve(errors: Table, costs: Table, budgets: Sequence[float]) -> list[Assignment]:
    """The least-cost assignment at each budget (infeasible budgets left out), in the order given."""
    points = [assign_milp(errors, costs, b) for b in budgets]
    return [p for p in points if p is not None]
