"""Structure allocation: how many units each layer's attention and MLP keep (pure functions).

A *unit* is what surgery removes at once: one KV group in attention (1 k head, 1 v head, its g query heads and
their o_proj columns; cost hidden·d_h·(2g + 2) parameters) or one MLP channel (a row of gate and up, a column of
down; cost 3·hidden). Scores are standardised per layer and module (FLAP §3.2), so they compare across modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Structure = Literal["AL-AM", "AL-MM", "UL-UM", "UL-MM"]


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


def allocate_global(modules: list[ModuleUnits], keep_cost: float, min_units: int = 1) -> list[Tensor]:
    """Adaptive global structure (FLAP "AL-AM"): one list of all units sorted by score (descending); keep units
    while walking it until the kept cost reaches ``keep_cost``. Every module first keeps its ``min_units`` best
    units (the guard against emptying a module); their cost counts towards the budget.

    Returns one boolean keep-mask per module.
    """
    guard = [top_units(m.scores, min(min_units, m.scores.numel())) for m in modules]
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


def allocate_uniform(modules: list[ModuleUnits], keep_fraction: float, min_units: int = 1) -> list[Tensor]:
    """Same fraction for every module: keep round((1 − ratio)·n) best units of each ("UL-UM")."""
    masks = []
    for m in modules:
        k = max(min(min_units, m.scores.numel()), round(keep_fraction * m.scores.numel()))
        masks.append(top_units(m.scores, k))
    return masks


def allocate(
    structure: Structure,
    attn: list[ModuleUnits],
    mlp: list[ModuleUnits],
    ratio: float,
    attn_ratio: float | None = None,
    min_units: int = 1,
) -> tuple[list[Tensor], list[Tensor]]:
    """Keep-masks for attention units and MLP units of every layer, removing ``ratio`` of the prunable cost.

    - AL-AM: global ranking over attention and MLP units of all layers together.
    - AL-MM: attention allocated globally over layers at ``attn_ratio``; MLP globally with the rest of the budget.
    - UL-UM: every module of every layer keeps the same fraction (attention rounds to whole KV groups).
    - UL-MM: every layer keeps round((1 − attn_ratio)·G) KV groups; every layer's MLP then keeps the same width,
      chosen so that the total kept cost matches the budget (to within one channel per layer).
    """
    total = sum(m.cost * m.scores.numel() for m in attn + mlp)
    keep_cost = (1.0 - ratio) * total
    if structure == "AL-AM":
        masks = allocate_global(attn + mlp, keep_cost, min_units)
        return masks[: len(attn)], masks[len(attn) :]
    if structure == "UL-UM":
        return allocate_uniform(attn, 1.0 - ratio, min_units), allocate_uniform(mlp, 1.0 - ratio, min_units)
    a_ratio = ratio if attn_ratio is None else attn_ratio
    attn_total = sum(m.cost * m.scores.numel() for m in attn)
    if structure == "AL-MM":
        attn_masks = allocate_global(attn, (1.0 - a_ratio) * attn_total, min_units)
    else:
        attn_masks = allocate_uniform(attn, 1.0 - a_ratio, min_units)
    attn_kept = sum(int(k.sum()) * m.cost for k, m in zip(attn_masks, attn, strict=True))
    mlp_budget = max(keep_cost - attn_kept, 0.0)
    if structure == "AL-MM":
        return attn_masks, allocate_global(mlp, mlp_budget, min_units)
    per_layer = mlp_budget / max(len(mlp), 1)
    mlp_masks = [
        top_units(
            m.scores, max(min(min_units, m.scores.numel()), min(m.scores.numel(), round(per_layer / m.cost)))
        )
        for m in mlp
    ]
    return attn_masks, mlp_masks
