"""nn.Linear → QuantLinear with a named datatype set (no recipe or model knowledge here)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from quant.datatypes import get_datatype_set
from quant.errors import InputError
from quant.gptq import gptq_quantize
from quant.hf import use_compact_storage
from quant.qlinear import QuantLinear
from quant.select import choose_group_datatypes, scale_bound
from quant.storage import expand_ceiling, scale_block_ceiling

# GPTQ's error updates can grow a group past the largest scale the original weights wanted: leave 2^(8/32) headroom
GPTQ_CEILING_MARGIN = 2.0 ** (8 / 32)


@torch.no_grad()
def quantize_linear(
    linear: nn.Linear,
    dtset_name: str,
    group_size: int | None = 128,
    shrink_factors: Sequence[float] = (1.0,),
    channel_weights: torch.Tensor | None = None,
    *,
    hessian: torch.Tensor | None = None,
    damp: float = 0.01,
    act_order: bool = False,
    scale_bits: int = 16,
    compact_storage: bool = False,
) -> QuantLinear:
    """Quantise ``linear.weight`` [out, in] per group.

    Round to nearest (:func:`quant.select.choose_group_datatypes`) or, given ``hessian`` H = 2XXᵀ/N [in, in],
    GPTQ (:func:`quant.gptq.gptq_quantize`). channel_weights: [in] E[x_j²] for the E[x²]-weighted type choice
    (round to nearest only), or None. scale_bits: 16 (fp16 group scales) or 8 (double-quantized, the choice is
    made with the 8-bit scales). compact_storage: write the module's state dict in format version 2
    (:func:`quant.hf.use_compact_storage`; default: the in-memory layout, format version 1). The result lives on
    the weight's device; its bias keeps the original dtype.
    """
    if not isinstance(linear, nn.Linear):
        raise InputError(f"linear: expected torch.nn.Linear, got {type(linear).__name__}")
    if scale_bits not in (8, 16):
        raise InputError(f"scale_bits: expected 8 or 16, got {scale_bits}")
    W = linear.weight.detach()
    hi = ceiling = None
    if scale_bits == 8:
        if any(m.pow2_scale for m in get_datatype_set(dtset_name).members):
            raise InputError(f"scale_bits: 8-bit scales are not available for {dtset_name} (power-of-two scales)")
        margin = GPTQ_CEILING_MARGIN if hessian is not None else 1.0
        hi = scale_block_ceiling(scale_bound(W, dtset_name, group_size, shrink_factors) * margin)
        ceiling = expand_ceiling(hi, W.shape[0])
    if hessian is not None:
        qw = gptq_quantize(W, hessian, dtset_name, group_size, shrink_factors, damp, act_order, scale_ceiling=ceiling)
    else:
        qw = choose_group_datatypes(W, dtset_name, group_size, shrink_factors, channel_weights, ceiling)
    qlinear = QuantLinear.from_quantized(qw, linear.bias)
    qlinear.dtypes = dtset_name
    qlinear.scale_hi = hi  # type: ignore[assignment]
    return use_compact_storage(qlinear, hi) if compact_storage else qlinear
