"""nn.Linear → QuantLinear with a named datatype set (no recipe or model knowledge here)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from quant.errors import InputError
from quant.qlinear import QuantLinear
from quant.select import choose_group_datatypes


@torch.no_grad()
def quantize_linear(
    linear: nn.Linear,
    dtset_name: str,
    group_size: int | None = 128,
    shrink_factors: Sequence[float] = (1.0,),
    channel_weights: torch.Tensor | None = None,
) -> QuantLinear:
    """Quantise ``linear.weight`` [out, in] per group (see :func:`quant.select.choose_group_datatypes`).

    channel_weights: [in] input-channel second moments E[x_j²] for the activation-aware choice, or None.
    The result lives on the weight's device; its bias keeps the original dtype.
    """
    if not isinstance(linear, nn.Linear):
        raise InputError(f"linear: expected torch.nn.Linear, got {type(linear).__name__}")
    qw = choose_group_datatypes(
        linear.weight.detach(), dtset_name, group_size, shrink_factors, channel_weights
    )
    qlinear = QuantLinear.from_quantized(qw, linear.bias)
    qlinear.dtypes = dtset_name
    return qlinear
