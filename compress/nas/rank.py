"""Correlation math for the proxy (pure functions on 1-D tensors, float64).

- Pearson ρ(a, b) = Σ (a−ā)(b−b̄) / √(Σ (a−ā)² · Σ (b−b̄)²)  (TraceNAS's per-sub-block similarity).
- Spearman = Pearson of the average ranks (ties share their mean rank).
- Kendall τ-b = (C − D) / √((n₀ − n₁)(n₀ − n₂)) over all pairs, n₀ = n(n−1)/2, n₁/n₂ = tied pairs in a/b.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two equally long vectors (flattened); 0.0 when either is constant."""
    x = a.detach().reshape(-1).to(torch.float64)
    y = b.detach().reshape(-1).to(torch.float64)
    if x.numel() != y.numel():
        raise ValueError(f"pearson: {x.numel()} vs {y.numel()} elements")
    x = x - x.mean()
    y = y - y.mean()
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return 0.0 if denom == 0.0 else float((x * y).sum()) / denom


def average_ranks(values: Tensor) -> Tensor:
    """Ranks 1..n of ``values`` [n]; tied values get the mean of their ranks."""
    x = values.detach().reshape(-1).to(torch.float64)
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    sorted_x = x[order]
    i = 0
    n = x.numel()
    while i < n:
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    return pearson(average_ranks(a), average_ranks(b))


def kendall_tau_b(a: Tensor, b: Tensor) -> float:
    """Kendall's τ-b (O(n²) pairs; n is a few hundred candidates at most)."""
    x = a.detach().reshape(-1).to(torch.float64)
    y = b.detach().reshape(-1).to(torch.float64)
    dx = torch.sign(x[:, None] - x[None, :])
    dy = torch.sign(y[:, None] - y[None, :])
    upper = torch.triu(torch.ones_like(dx, dtype=torch.bool), diagonal=1)
    s = float((dx * dy)[upper].sum())
    n0 = float(upper.sum())
    n1 = float((dx[upper] == 0).sum())
    n2 = float((dy[upper] == 0).sum())
    denom = math.sqrt((n0 - n1) * (n0 - n2))
    return 0.0 if denom == 0.0 else s / denom
