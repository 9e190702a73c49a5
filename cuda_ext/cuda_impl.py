"""CUDA kernels for ``secateurs::dequantize`` and ``secateurs::quant_matmul`` (``cuda_ext/csrc``).

:func:`register` adds them to the ops of :mod:`cuda_ext.ops` with ``op.register_kernel("cuda")``. Inputs the
kernels do not cover (float32 activations, a group size that is neither a multiple of 32 nor per channel,
non-contiguous packed tensors) go to the torch reference, so the CUDA registration never narrows what the op
accepts. ``dequantize`` is bit-exact with the reference. ``quant_matmul`` with at most 8 rows of activations
runs the fused GEMV, which multiplies by the unrounded fp32 weights (the reference rounds Ŵ to x.dtype
first): results agree within that rounding and fp32 accumulation error; above 8 rows it is the reference's
computation (dequantise to x.dtype, then cuBLAS).
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import torch

from cuda_ext import build, reference

logger = logging.getLogger("secateurs")

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_logged = False


def register(dequantize_op: Any, quant_matmul_op: Any) -> bool:
    """Register the CUDA kernels on both ops. False (logged once, never raised) without the extension."""
    try:
        ext = build.load_extension()
        if ext is None:
            _log_unavailable(build.unavailable_reason())
            return False
        dequantize_op.register_kernel("cuda")(_dequantize_kernel(ext))
        quant_matmul_op.register_kernel("cuda")(_quant_matmul_kernel(ext))
        return True
    except Exception as exc:  # registration must never break the torch reference path
        _log_unavailable(f"{type(exc).__name__}: {exc}")
        return False


def _log_unavailable(reason: str) -> None:
    global _logged
    if _logged:
        return
    _logged = True
    level = logging.WARNING if torch.cuda.is_available() else logging.INFO
    logger.log(level, "CUDA extension unavailable → torch reference (%s)", reason)


def _kernel_covers(
    planes: torch.Tensor, in_features: int, group_size: int, *others: torch.Tensor | None
) -> bool:
    """True when the packed weight is in the form the kernels take (else: the torch reference)."""
    packed_ok = (
        planes.dim() == 3 and planes.dtype == torch.int32 and planes.shape[0] in reference.SUPPORTED_BITS
    )
    group_ok = group_size > 0 and (group_size % 32 == 0 or group_size >= in_features)
    contiguous = all(t is None or t.is_contiguous() for t in (planes, *others))
    return packed_ok and group_ok and contiguous


def _dequantize_kernel(ext: ModuleType):
    def dequantize_cuda(
        planes: torch.Tensor,
        type_ids: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        tables: torch.Tensor,
        in_features: int,
        group_size: int,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        args = (planes, type_ids, scales, zeros, tables, in_features, group_size)
        covered = _kernel_covers(planes, in_features, group_size, type_ids, scales, zeros, tables)
        if covered and out_dtype in reference.OUT_DTYPES:
            return ext.dequantize(*args, out_dtype)
        return reference.dequantize(*args, out_dtype)

    return dequantize_cuda


def _quant_matmul_kernel(ext: ModuleType):
    def quant_matmul_cuda(
        x: torch.Tensor,
        planes: torch.Tensor,
        type_ids: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        tables: torch.Tensor,
        in_features: int,
        group_size: int,
    ) -> torch.Tensor:
        packed = (planes, type_ids, scales, zeros, tables, in_features, group_size)
        covered = x.dtype in _KERNEL_DTYPES and x.dim() >= 1 and x.shape[-1] == in_features
        if not (covered and _kernel_covers(planes, in_features, group_size, type_ids, scales, zeros, tables)):
            return reference.quant_matmul(x, *packed)
        y = ext.quant_matmul(x.reshape(-1, in_features), *packed)  # [B, out]; B <= 8 runs the fused GEMV
        return y.reshape(*x.shape[:-1], y.shape[-1])

    return quant_matmul_cuda
