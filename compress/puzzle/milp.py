"""Puzzle's architecture choice as an exact mixed-integer program (Bercovich et al. 2024, arXiv 2411.19146, §3).

Pure: score and cost tables in, one variant per sub-block out. With binary x_{g,v} (group g = one sub-block of one
layer, v = one of its variants), scores s_{g,v} and costs c^{(r)}_{g,v} for each resource r:

    minimise   Σ_g Σ_v s_{g,v} · x_{g,v}
    subject to Σ_v x_{g,v} = 1                      for every group g
               Σ_g Σ_v c^{(r)}_{g,v} · x_{g,v} ≤ B^{(r)}   for every budget r (parameters, KV bytes, latency, ...)

Scores are assumed additive over sub-blocks (the paper's approximation). Solved with SciPy's ``milp`` (HiGHS
branch and cut); the relative optimality gap HiGHS proves is reported (0 when the optimum is proven).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from quant.errors import InputError


@dataclass(frozen=True)
class MilpSolution:
    """choice[g] = index of the chosen variant of group g; totals of the objective and of every cost."""

    choice: list[int]
    objective: float
    costs: dict[str, float]
    gap: float  # relative MIP gap proven by HiGHS (|primal − dual bound| / |primal|; 0 = proven optimal)
    dual_bound: float
    seconds: float


def _check_tables(
    scores: Sequence[Sequence[float]], costs: Mapping[str, Sequence[Sequence[float]]], budgets: Mapping[str, float]
) -> None:
    if not scores or any(len(row) == 0 for row in scores):
        raise InputError("puzzle milp: every sub-block needs at least one variant (empty score table)")
    for name in budgets:
        if name not in costs:
            raise InputError(f"puzzle milp: budget {name!r} has no cost table; expected one of {sorted(costs)}")
    for name, table in costs.items():
        if len(table) != len(scores) or any(len(c) != len(s) for c, s in zip(table, scores, strict=True)):
            raise InputError(f"puzzle milp: cost table {name!r} does not have the shape of the score table")
    for g, row in enumerate(scores):
        if not all(math.isfinite(float(s)) for s in row):
            raise InputError(f"puzzle milp: score of sub-block {g} is not finite: {list(row)}")


def _check_feasible(costs: Mapping[str, Sequence[Sequence[float]]], budgets: Mapping[str, float]) -> None:
    """Each budget alone: the cheapest variant everywhere must fit (a one-line error says by how much not)."""
    for name, budget in budgets.items():
        least = sum(min(float(c) for c in row) for row in costs[name])
        if least > budget:
            raise InputError(
                f"puzzle: budget {name} = {budget:,.6g} is infeasible: the cheapest variant of every sub-block "
                f"already costs {least:,.6g}"
            )


def solve_choice(
    scores: Sequence[Sequence[float]],
    costs: Mapping[str, Sequence[Sequence[float]]],
    budgets: Mapping[str, float],
    time_limit: float | None = 60.0,
    rel_gap: float = 0.0,
) -> MilpSolution:
    """One variant per group minimising the summed score under the budgets (every budget r: Σ cost ≤ B^{(r)}).

    Args:
        scores: scores[g][v] (lower is better), one row per group (sub-block), one entry per variant.
        costs: {resource: costs[g][v]} with the shape of ``scores``; resources without a budget are only summed.
        budgets: {resource: upper bound on the summed cost}.
        rel_gap: HiGHS stops once the optimum is proven to within this relative gap (0: proven optimal; HiGHS's
            own default is 1e-4).
    Raises: InputError when the budgets cannot be met (alone or together) or the tables are malformed.
    """
    _check_tables(scores, costs, budgets)
    _check_feasible(costs, budgets)
    sizes = [len(row) for row in scores]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n = int(offsets[-1])
    c = np.array([float(s) for row in scores for s in row])
    rows = np.repeat(np.arange(len(sizes)), sizes)
    one_each = csr_array((np.ones(n), (rows, np.arange(n))), shape=(len(sizes), n))
    constraints = [LinearConstraint(one_each, 1.0, 1.0)]
    names = list(budgets)
    if names:
        a = np.array([[float(x) for row in costs[name] for x in row] for name in names])
        b = np.array([float(budgets[name]) for name in names])
        constraints.append(LinearConstraint(a, -np.inf, b))
    clock = time.perf_counter()
    options: dict[str, float] = {"mip_rel_gap": rel_gap}
    if time_limit is not None:
        options["time_limit"] = time_limit
    res = milp(c, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=constraints, options=options)
    seconds = time.perf_counter() - clock
    if res.status == 2:
        raise InputError(f"puzzle: the budgets {dict(budgets)} cannot all be met together (MILP infeasible)")
    if res.x is None:
        raise RuntimeError(f"puzzle milp: HiGHS stopped without a solution ({res.message})")
    x = np.asarray(res.x)
    choice = [int(np.argmax(x[offsets[g] : offsets[g + 1]])) for g in range(len(sizes))]
    totals = {name: float(sum(float(table[g][v]) for g, v in enumerate(choice))) for name, table in costs.items()}
    objective = float(sum(float(scores[g][v]) for g, v in enumerate(choice)))
    gap = float(getattr(res, "mip_gap", 0.0) or 0.0)
    bound = float(getattr(res, "mip_dual_bound", objective))
    return MilpSolution(choice, objective, totals, gap, bound, seconds)
