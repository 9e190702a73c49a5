"""The MILP against exhaustive enumeration on hand-made tables, and its errors."""

from __future__ import annotations

import itertools
import random

import pytest

from compress.puzzle.milp import solve_choice
from quant.errors import InputError


def brute_force(scores, costs, budgets):
    best, best_choice = float("inf"), None
    for choice in itertools.product(*[range(len(r)) for r in scores]):
        if all(sum(costs[n][g][v] for g, v in enumerate(choice)) <= b for n, b in budgets.items()):
            total = sum(scores[g][v] for g, v in enumerate(choice))
            if total < best:
                best, best_choice = total, list(choice)
    return best, best_choice


def test_hand_made_optimum():
    # two sub-blocks; the cheap greedy choice (drop the lowest score per cost) is not optimal
    scores = [[0.0, 1.0, 5.0], [0.0, 2.0, 3.0]]
    params = [[10, 6, 0], [10, 4, 2]]
    sol = solve_choice(scores, {"params": params}, {"params": 12})
    # options within 12: (1,1)=3.0 at 10, (2,0)=5 at 10, (0,2)=3 at 12, (1,2)=4 at 8 → minimum 3.0
    assert sol.objective == pytest.approx(3.0)
    assert sol.choice in ([1, 1], [0, 2])
    assert sol.costs["params"] <= 12
    assert sol.gap == pytest.approx(0.0, abs=1e-9)


def test_unbudgeted_picks_best_scores():
    sol = solve_choice([[3.0, 1.0], [0.5, 2.0]], {"params": [[1, 9], [1, 9]]}, {})
    assert sol.choice == [1, 0] and sol.costs["params"] == 10


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_with_two_budgets(seed):
    rng = random.Random(seed)
    groups = [rng.randint(2, 4) for _ in range(5)]
    scores = [[rng.uniform(0, 5) for _ in range(k)] for k in groups]
    params = [[rng.randint(0, 20) for _ in range(k)] for k in groups]
    kv = [[rng.randint(0, 4) for _ in range(k)] for k in groups]
    budgets = {"params": 45, "kv": 9}
    expected, _ = brute_force(scores, {"params": params, "kv": kv}, budgets)
    if expected == float("inf"):
        with pytest.raises(InputError):
            solve_choice(scores, {"params": params, "kv": kv}, budgets)
        return
    sol = solve_choice(scores, {"params": params, "kv": kv}, budgets)
    assert sol.objective == pytest.approx(expected)
    assert sol.costs["params"] <= 45 and sol.costs["kv"] <= 9


def test_infeasible_budget_names_the_budget():
    with pytest.raises(InputError, match="budget params = 3 is infeasible.*costs 4"):
        solve_choice([[0.0, 1.0], [0.0, 1.0]], {"params": [[5, 2], [5, 2]]}, {"params": 3})


def test_jointly_infeasible_budgets():
    # each budget alone is feasible, together they are not
    costs = {"a": [[0, 10]], "b": [[10, 0]]}
    with pytest.raises(InputError, match="cannot all be met"):
        solve_choice([[0.0, 0.0]], costs, {"a": 5, "b": 5})


def test_malformed_tables():
    with pytest.raises(InputError, match="shape"):
        solve_choice([[0.0, 1.0]], {"params": [[1]]}, {})
    with pytest.raises(InputError, match="no cost table"):
        solve_choice([[0.0, 1.0]], {"params": [[1, 2]]}, {"latency": 1.0})
