"""Structure allocation: how many units each layer's attention and MLP keep (pure functions).

A *unit* is what surgery removes at once: one KV group in attention (1 k head, 1 v head, its g query heads and
their o_proj columns; cost hidden·d_h·(2g + 2) parameters) or one MLP channel (a row of gate and up, a column of
down; cost 3·hidden). Scores are standardised per layer and module (FLAP §3.2), so they compare across modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Structure = Literal["AL-AM", "AL-MM", "UL-UM", "UL-MM"]
Rounding = Literal["floor", "nearest"]


@dataclass(frozen=True)
class ModuleUnits:
    """Scores of the units of one module of one layer. scores: [n_units]; cost: parameters per unit."""

    scores: Tensor
    cost: int


def top_units(scores: Tensor, k: int) -> Tensor:
    """Boolean keep-mask of the k highest scores ([n] → [n]); ties broken by lower index (deterministic)."""
    order = torch.sort(-scores, stable=True).indices
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep


def mlp_widths(full: int, step: int) -> list[int]:
    """Allowed widths of a present MLP sub-block: the multiples of ``step`` below ``full``, and ``full``."""
    return list(range(step, full, step)) + [full]


def snap_width(target: float, full: int, step: int) -> int:
    """The one MLP-width snapping rule: the allowed width (:func:`mlp_widths`) nearest to ``target``, ties to the
    narrower; never below one step. (Fractions of a recipe and NAS operators both go through here.)"""
    return min(mlp_widths(full, step), key=lambda w: (abs(w - target), w))


def _minimums(modules: list[ModuleUnits], min_units: int | Sequence[int]) -> list[int]:
    wanted = [min_units] * len(modules) if isinstance(min_units, int) else list(min_units)
    return [min(k, m.scores.numel()) for k, m in zip(wanted, modules, strict=True)]


def allocate_global(
    modules: list[ModuleUnits], keep_cost: float, min_units: int | Sequence[int] = 1
) -> list[Tensor]:
    """Adaptive global structure (FLAP "AL-AM"): one list of all units sorted by score (descending); keep units
    while walking it until the kept cost reaches ``keep_cost``. Every module first keeps its ``min_units`` best
    units (one number, or one per module; 0 lets the threshold remove a whole module, as in the reference); their
    cost counts towards the budget.

    Returns one boolean keep-mask per module.
    """
    guard = [top_units(m.scores, k) for m, k in zip(modules, _minimums(modules, min_units), strict=True)]
    spent = sum(int(g.sum()) * m.cost for g, m in zip(guard, modules, strict=True))
    scores = torch.cat([m.scores.to(torch.float64) for m in modules])
    costs = torch.cat([torch.full((m.scores.numel(),), m.cost, dtype=torch.float64) for m in modules])
    guarded = torch.cat(guard)
    order = torch.sort(-scores, stable=True).indices
    order = order[~guarded[order]]
    cumulative = spent + torch.cumsum(costs[order], 0)
    n_take = int(torch.searchsorted(cumulative, torch.tensor(float(keep_cost), dtype=torch.float64)).item())
    n_take = min(n_take + 1, order.numel()) if spent < keep_cost else 0  # first prefix whose cost reaches it
    keep = guarded.clone()
    keep[order[:n_take]] = True
    return list(keep.split([m.scores.numel() for m in modules]))


def uniform_count(n: int, ratio: float, rounding: Rounding = "nearest") -> int:
    """Units kept of ``n`` when a fraction ``ratio`` is removed: n − floor(ratio·n) ("floor", the Wanda-sp
    reference: ``sort(score)[int(ratio·n)]`` is its threshold) or round((1 − ratio)·n) ("nearest")."""
    if rounding == "floor":
        return n - math.floor(ratio * n + 1e-9)
    return round((1.0 - ratio) * n)


def allocate_uniform(
    modules: list[ModuleUnits], ratio: float, min_units: int | Sequence[int] = 1, rounding: Rounding = "nearest"
) -> list[Tensor]:
    """Same fraction for every module: remove ``ratio`` of each module's units ("UL-UM"), best units kept."""
    return [
        top_units(m.scores, max(k, uniform_count(m.scores.numel(), ratio, rounding)))
        for m, k in zip(modules, _minimums(modules, min_units), strict=True)
    ]


def allocate(
    structure: Structure,
    attn: list[ModuleUnits],
    mlp: list[ModuleUnits],
    ratio: float,
    attn_ratio: float | None = None,
    min_units: int = 1,
    rounding: Rounding = "nearest",
) -> tuple[list[Tensor], list[Tensor]]:
    """Keep-masks for attention units and MLP units of every layer, removing ``ratio`` of the prunable cost.

    - AL-AM: global ranking over attention and MLP units of all layers together.
    - AL-MM: attention allocated globally over layers at ``attn_ratio``; MLP globally with the rest of the budget.
    - UL-UM: every module of every layer removes the same fraction (attention in whole KV groups, ``rounding``).
    - UL-MM: every layer removes ``attn_ratio`` of its KV groups (``rounding``); every layer's MLP then keeps the
      same width, chosen so that the total kept cost matches the budget (to within one channel per layer).

    ``attn`` and ``mlp`` are in layer order: layer 0's attention always keeps ≥ 1 unit (the KV cache's length is
    read from layer 0), whatever ``min_units``.
    """
    attn_min = [max(min_units, 1)] + [min_units] * (len(attn) - 1)
    total = sum(m.cost * m.scores.numel() for m in attn + mlp)
    keep_cost = (1.0 - ratio) * total
    if structure == "AL-AM":
        masks = allocate_global(attn + mlp, keep_cost, attn_min + [min_units] * len(mlp))
        return masks[: len(attn)], masks[len(attn) :]
    if structure == "UL-UM":
        return (
            allocate_uniform(attn, ratio, attn_min, rounding),
            allocate_uniform(mlp, ratio, min_units, rounding),
        )
    a_ratio = ratio if attn_ratio is None else attn_ratio
    attn_total = sum(m.cost * m.scores.numel() for m in attn)
    if structure == "AL-MM":
        attn_masks = allocate_global(attn, (1.0 - a_ratio) * attn_total, attn_min)
    else:
        attn_masks = allocate_uniform(attn, a_ratio, attn_min, rounding)
    attn_kept = sum(int(k.sum()) * m.cost for k, m in zip(attn_masks, attn, strict=True))
    mlp_budget = max(keep_cost - attn_kept, 0.0)
    if structure == "AL-MM":
        return attn_masks, allocate_global(mlp, mlp_budget, min_units)
    per_layer = mlp_budget / max(len(mlp), 1)
    mlp_masks = [
        top_units(m.scores, max(k, min(m.scores.numel(), round(per_layer / m.cost))))
        for m, k in zip(mlp, _minimums(mlp, min_units), strict=True)
    ]
    return attn_masks, mlp_masks
