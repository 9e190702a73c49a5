"""QuantLinear: a Linear layer whose weight is held in the bit-plane format of :mod:`cuda_ext.reference`.

State dict keys (all plain tensors, safetensors-compatible): ``weight`` = the bit planes, int32
[bits, out, ceil(in/32)] (stored under ``weight``, as bitsandbytes stores its packed data, so that loading a
quantized checkpoint without our quantizer fails with a shape mismatch instead of silently loading garbage),
``type_ids`` uint8 [out, n_groups], ``scales`` fp16 [out, n_groups], ``zeros`` fp16 [out, n_groups] (only for
asymmetric sets), ``tables`` fp32 [n_types, 2**bits], ``bias`` [out] (only when present). The integer
attributes (in/out_features, bits, group_size) are not in the state dict: a checkpoint must record them
(e.g. in its quantization config) to build the module with :meth:`QuantLinear.empty` before loading.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import cuda_ext  # registers torch.ops.secateurs.*
from cuda_ext import cpu_impl
from quant.pack import PackedWeight, QuantizedWeight, pack_weight

# Buffers whose dtype is part of the format: Module.to(dtype) / .half() must not convert them.
FORMAT_BUFFERS = ("weight", "type_ids", "scales", "zeros", "tables")


def _fused_max_batch(device: torch.device) -> int:
    """Rows of x up to which ``quant_matmul`` fuses dequantisation into a GEMV on ``device`` (0: never)."""
    if device.type == "cpu":
        return cpu_impl.fused_max_batch()
    return 8 if device.type == "cuda" and cuda_ext.backend() == "cuda" else 0  # CUDA: SECATEURS_MAX_GEMV_BATCH


def cache_dequantized_weights(model: nn.Module, enabled: bool = True) -> int:
    """:meth:`QuantLinear.cache_dequantized` on every QuantLinear of ``model``; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.cache_dequantized(enabled)
    return len(layers)


class QuantLinear(nn.Module):
    """y = x Ŵᵀ + b with Ŵ dequantised from bit planes by ``torch.ops.secateurs.quant_matmul``."""

    weight: torch.Tensor  # the bit planes
    dtypes: str = "unknown"  # name of the datatype set the codes index (recorded in checkpoints' quantization config)
    type_ids: torch.Tensor
    scales: torch.Tensor
    tables: torch.Tensor
    zeros: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.bits = packed.bits
        self.group_size = packed.group_size
        self.register_buffer("weight", packed.planes)
        self.register_buffer("type_ids", packed.type_ids)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("tables", packed.tables)
        # None buffers stay out of state_dict(): symmetric sets have no "zeros", bias-free layers no "bias"
        self.register_buffer("zeros", packed.zeros)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.cache_dequantized(False)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> QuantLinear:
        """Pack ``qw`` (codes → bit planes) into a module; ``bias``: [out] or None."""
        return cls(pack_weight(qw), bias)

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        n_types: int,
        has_zeros: bool,
        bias_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> QuantLinear:
        """Uninitialised module with the right buffer shapes, for ``load_state_dict`` (``device="meta"`` ok).

        ``bias_dtype``: the bias dtype, or None for no bias.
        """
        n_groups = -(-in_features // group_size)
        group = (out_features, n_groups)

        def new(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        packed = PackedWeight(
            planes=new((bits, out_features, -(-in_features // 32)), torch.int32),
            type_ids=new(group, torch.uint8),
            scales=new(group, torch.float16),
            zeros=new(group, torch.float16) if has_zeros else None,
            tables=new((n_types, 2**bits), torch.float32),
            bits=bits,
            group_size=group_size,
            in_features=in_features,
        )
        bias = new((out_features,), bias_dtype) if bias_dtype is not None else None
        return cls(packed, bias)

    @property
    def planes(self) -> torch.Tensor:
        """int32 [bits, out, ceil(in/32)]: bit k of code (o, 32w + i) is bit i of planes[k, o, w]."""
        return self.weight

    @property
    def has_zeros(self) -> bool:
        return self.zeros is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] → [..., out] in x.dtype.

        ``quant_matmul`` runs the fused dequant-GEMV for at most ``fused_max_batch`` rows of x (CPU and CUDA
        kernels) and dequantise-then-matmul above; with :meth:`cache_dequantized` on, the latter reuses a cached Ŵ.
        """
        direct = self._direct_linear(x)
        if direct is not None:
            return direct
        cached = self._cached_weight(x)
        if cached is not None:
            y = x @ cached.T  # the op's own computation above the fused threshold, minus the dequantisation
        else:
            y = torch.ops.secateurs.quant_matmul(
                x, self.planes, self.type_ids, self.scales, self.zeros, self.tables,
                self.in_features, self.group_size,
            )  # fmt: skip
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _direct_linear(self, x: torch.Tensor) -> torch.Tensor | None:
        """y + bias by the op's CPU kernels in one C++ call, without the op dispatcher (its overhead is as long as a
        small layer's GEMV); None where the op is needed (autograd, torch.compile, the dequantised-weight cache above
        the fused batch) or the kernels do not apply."""
        if not x.is_cpu or (x.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            return None
        if getattr(self, "_weight_cache_on", False) and x.numel() > cpu_impl.GEMV_MAX_BATCH * self.in_features:
            return None
        return cpu_impl.direct_linear(
            x, self.weight, self.type_ids, self.scales, self.zeros, self.tables, self.in_features, self.group_size,
            self.bias,
        )  # fmt: skip

    def cache_dequantized(self, enabled: bool = True) -> None:
        """Keep Ŵ in x.dtype between calls for inputs above the fused-GEMV batch (prefill): trades the memory of a
        dense weight for the dequantisation time. Results are unchanged; the cache follows buffer updates."""
        self._weight_cache_on = enabled
        self._weight_cache: tuple[tuple, torch.Tensor] | None = None

    def _cached_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        if not getattr(self, "_weight_cache_on", False) or torch.compiler.is_compiling():
            return None
        if x.numel() // max(self.in_features, 1) <= _fused_max_batch(x.device):
            return None
        buffers = (self.weight, self.type_ids, self.scales, self.zeros, self.tables)
        key = (x.dtype, x.device, *((t.data_ptr(), t._version) for t in buffers if t is not None))
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = (key, self.dequantized_weight(x.dtype).to(x.device))
        return self._weight_cache[1]

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ: dtype [out, in] (float32 = the exact product before any rounding)."""
        return torch.ops.secateurs.dequantize(
            self.planes, self.type_ids, self.scales, self.zeros, self.tables,
            self.in_features, self.group_size, dtype,
        )  # fmt: skip

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantLinear:
        """Keep the format buffers' dtypes under ``.to(dtype)``/``.half()``: only their device may change."""
        originals = {n: t for n, t in self._buffers.items() if n in FORMAT_BUFFERS and t is not None}
        super()._apply(fn, recurse)
        for name, original in originals.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != original.dtype:
                self._buffers[name] = original.to(device=moved.device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, n_types={self.tables.shape[0]}, zeros={self.has_zeros}, "
            f"bias={self.bias is not None}"
        )
