"""Channel and unit importance scores for structured pruning (pure functions on tensors).

FLAP (An et al., AAAI 2024, arXiv 2312.11983), eq. (4)-(6): for input channel j of o_proj / down_proj with weight
W: [out, C] and calibration inputs x: [N, C],
    WIFV  S_j = V_j · ‖W[:, j]‖²₂          (V_j: sample variance of x_j over the N calibration tokens)
    IFV   S_j = V_j
    WIFN  S_j = mean_i |W_ij| · sqrt(mean_n x_nj²)
Baselines with the same units: Wanda-sp S_j = mean_i |W_ij| · ‖x_j‖₂ and magnitude-sp S_j = ‖W[:, j]‖₂.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Metric = Literal["WIFV", "IFV", "WIFN"]


def fluctuation_scores(metric: Metric, weight: Tensor, variance: Tensor, mean_sq: Tensor) -> Tensor:
    """FLAP channel scores. weight: [out, C]; variance, mean_sq: [C] → [C] (float64)."""
    w = weight.detach().to(torch.float64).cpu()
    if metric == "WIFV":
        return variance * (w * w).sum(0)
    if metric == "IFV":
        return variance.clone()
    if metric == "WIFN":
        return (w.abs() * mean_sq.sqrt().unsqueeze(0)).mean(0)
    raise ValueError(f"unknown metric {metric!r}")


def wanda_scores(weight: Tensor, sq_norm: Tensor) -> Tensor:
    """Wanda-sp channel scores: mean_i |W_ij| · ‖x_j‖₂. weight: [out, C]; sq_norm: [C] = Σ_n x_nj² → [C]."""
    w = weight.detach().to(torch.float64).cpu()
    return (w.abs() * sq_norm.sqrt().unsqueeze(0)).mean(0)


def magnitude_scores(weight: Tensor) -> Tensor:
    """magnitude-sp channel scores: ‖W[:, j]‖₂. weight: [out, C] → [C]."""
    return weight.detach().to(torch.float64).cpu().norm(dim=0)


def standardize(scores: Tensor) -> Tensor:
    """z-score over one module's channels: (S − mean S) / std S (unbiased std, as the FLAP reference)."""
    std = scores.std()
    if not torch.isfinite(std) or std == 0:
        return torch.zeros_like(scores)
    return (scores - scores.mean()) / std


def unit_scores(channel_scores: Tensor, n_units: int) -> Tensor:
    """Mean channel score per unit. channel_scores: [n_units · width] with unit u owning the contiguous channels
    [u·width, (u+1)·width) → [n_units]. For attention with GQA a unit is one KV group: its g query heads are
    consecutive o_proj column blocks (query head h belongs to KV group h // g)."""
    return channel_scores.reshape(n_units, -1).mean(1)
