"""``torch.ops.secateurs.dequantize`` and ``torch.ops.secateurs.quant_matmul``.

Each op is declared once with ``torch.library.custom_op``; its default implementation is the pure-torch
reference (:mod:`cuda_ext.reference`, any device) and a ``register_fake`` shape function lets
``torch.compile`` trace it. When CUDA is present, ``cuda_ext.cuda_impl.register(dequantize, quant_matmul)``
adds CUDA kernels under the same names (``op.register_kernel("cuda")``), so call sites never branch on the
device. Without CUDA, or when that registration fails, the toolkit logs once and keeps the reference.
Likewise ``cuda_ext.cpu_impl.register`` adds the C++ CPU kernels (``op.register_kernel("cpu")``) when the CPU
extension is built (``python -m cuda_ext.build``).
"""

from __future__ import annotations

import importlib
import logging
import sys

import torch

from cuda_ext import reference

logger = logging.getLogger("secateurs")
_backend = "torch-reference"


@torch.library.custom_op("secateurs::dequantize", mutates_args=())
def dequantize(
    planes: torch.Tensor,
    type_ids: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    tables: torch.Tensor,
    in_features: int,
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Dense Ŵ: out_dtype [out, in] from planes int32 [bits, out, ceil(in/32)] (see :mod:`reference`)."""
    return reference.dequantize(planes, type_ids, scales, zeros, tables, in_features, group_size, out_dtype)


@dequantize.register_fake
def _dequantize_fake(
    planes: torch.Tensor,
    type_ids: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    tables: torch.Tensor,
    in_features: int,
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return planes.new_empty((planes.shape[1], in_features), dtype=out_dtype)


@torch.library.custom_op("secateurs::quant_matmul", mutates_args=())
def quant_matmul(
    x: torch.Tensor,
    planes: torch.Tensor,
    type_ids: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    tables: torch.Tensor,
    in_features: int,
    group_size: int,
) -> torch.Tensor:
    """y = x @ Ŵᵀ, Ŵ dequantised to x.dtype. x: [..., in] → y: [..., out] in x.dtype."""
    return reference.quant_matmul(x, planes, type_ids, scales, zeros, tables, in_features, group_size)


@quant_matmul.register_fake
def _quant_matmul_fake(
    x: torch.Tensor,
    planes: torch.Tensor,
    type_ids: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    tables: torch.Tensor,
    in_features: int,
    group_size: int,
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], planes.shape[1]))


def _setup_quant_matmul_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
    _, planes, type_ids, scales, zeros, tables, in_features, group_size = inputs
    ctx.save_for_backward(planes, type_ids, scales, zeros, tables)  # type: ignore[attr-defined]
    ctx.in_features, ctx.group_size = in_features, group_size  # type: ignore[attr-defined]


def _quant_matmul_backward(ctx: object, grad_y: torch.Tensor) -> tuple:
    """dL/dx = dL/dy @ Ŵ (the quantised weight is a constant: no gradient for the packed tensors)."""
    planes, type_ids, scales, zeros, tables = ctx.saved_tensors  # type: ignore[attr-defined]
    in_features, group_size = ctx.in_features, ctx.group_size  # type: ignore[attr-defined]
    weight = dequantize(planes, type_ids, scales, zeros, tables, in_features, group_size, grad_y.dtype)
    return grad_y @ weight, None, None, None, None, None, None, None


quant_matmul.register_autograd(_quant_matmul_backward, setup_context=_setup_quant_matmul_context)


def _register_cuda_kernels() -> str | None:
    """Try the CUDA extension; returns the reason it is not used, "" when it is, None when ``cuda_impl`` already
    logged its own (more precise) reason."""
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    try:
        cuda_impl = importlib.import_module("cuda_ext.cuda_impl")
        if cuda_impl.register(dequantize, quant_matmul):
            return ""
        return None
    except Exception as exc:  # an import or build error must not break CPU-only use: log it instead
        return f"{type(exc).__name__}: {exc}"


def backend() -> str:
    """Which implementation the ops dispatch to on CUDA tensors: "cuda" or "torch-reference"."""
    return _backend


def cpu_backend() -> str:
    """Which implementation the ops dispatch to on CPU tensors: "cpu-kernels" or "torch-reference"."""
    cpu_impl = sys.modules.get("cuda_ext.cpu_impl")
    return "cpu-kernels" if cpu_impl is not None and cpu_impl.available() else "torch-reference"


def _register_cpu_kernels() -> None:
    """The C++ CPU kernels (``cuda_ext.cpu_impl``); it logs once itself when they are unavailable."""
    try:
        importlib.import_module("cuda_ext.cpu_impl").register(dequantize, quant_matmul)
    except Exception as exc:  # an import error must not break the reference
        logger.info("CPU kernels unavailable → torch reference (%s: %s)", type(exc).__name__, exc)


def _init_backend() -> None:
    global _backend
    reason = _register_cuda_kernels()
    if reason is None:
        return
    if reason:
        level = logging.WARNING if torch.cuda.is_available() else logging.INFO
        logger.log(level, "CUDA extension unavailable → torch reference (%s)", reason)
    else:
        _backend = "cuda"


_init_backend()  # module import runs once per process, so the message is logged once
_register_cpu_kernels()
