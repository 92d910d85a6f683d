"""Precision assignment: the integer programme against greedy, the curve, infeasible budgets."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qnnlib.assign import assign_greedy, assign_milp, curve, weight_bytes

PRECISIONS = ("int4", "int8", "int16", "float")


def random_problem(seed: int, groups: int = 12) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, float]]]:
    """Errors falling ~16x per 4 bits (a group's sensitivity drawn log-uniformly); costs from weight counts."""
    rng = np.random.default_rng(seed)
    errors, costs = {}, {}
    for g in range(groups):
        sensitivity = 10 ** rng.uniform(-4, -1)
        errors[g] = {"int4": sensitivity, "int8": sensitivity / 256 * rng.uniform(0.5, 2),
                     "int16": sensitivity / 65536, "float": 0.0}
        weights = int(rng.integers(0, 5000))
        costs[g] = {p: weight_bytes(weights, p) for p in PRECISIONS}
    return errors, costs


@pytest.mark.parametrize("seed", range(20))
def test_the_integer_programme_is_never_worse_than_greedy(seed: int) -> None:
    errors, costs = random_problem(seed)
    total4 = sum(e["int4"] for e in errors.values())
    for budget in (total4 * 0.01, total4 * 0.1, total4 * 0.5):
        greedy, exact = assign_greedy(errors, costs, budget), assign_milp(errors, costs, budget)
        assert greedy is not None and exact is not None
        assert greedy.estimate <= budget + 1e-12 and exact.estimate <= budget * (1 + 1e-9)
        assert exact.cost <= greedy.cost + 1e-9


def test_the_curve_is_monotone() -> None:
    errors, costs = random_problem(3)
    budgets = list(np.geomspace(1e-7, 1.0, 25))
    points = curve(errors, costs, budgets)
    assert len(points) == len(budgets)
    assert all(a.cost >= b.cost for a, b in itertools.pairwise(points))
    assert points[-1].precisions == dict.fromkeys(errors, "int4")  # everything fits: all cheapest


def test_an_impossible_budget_is_none() -> None:
    errors = {0: {"int4": 1.0, "int8": 0.5}}
    costs = {0: {"int4": 1.0, "int8": 2.0}}
    assert assign_greedy(errors, costs, 0.1) is None and assign_milp(errors, costs, 0.1) is None
    assert assign_milp(errors, costs, 0.6) == assign_greedy(errors, costs, 0.6)
