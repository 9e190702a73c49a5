"""QuantizedWeight (codes per weight) ↔ PackedWeight (bit planes), via the reference in ``cuda_ext``.

The field layout is the one documented in :mod:`cuda_ext.reference`; this module only adds the dataclasses
and the conversion. ``QuantizedWeight`` is what :func:`quant.select.choose_group_datatypes` returns;
``PackedWeight`` is what :class:`quant.qlinear.QuantLinear` stores and checkpoints hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cuda_ext import reference


@dataclass
class QuantizedWeight:
    """One quantised matrix, one code per weight.

    codes: uint8 [out, in]; type_ids: uint8 [out, n_groups] (index into ``tables``); scales: fp16
    [out, n_groups]; zeros: fp16 [out, n_groups] or None; tables: float32 [n_types, 2**bits];
    ``group_size`` = in_features for per-channel quantisation; n_groups = ceil(in/group_size).
    """

    codes: torch.Tensor
    type_ids: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    tables: torch.Tensor
    bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def n_groups(self) -> int:
        return -(-self.in_features // self.group_size)

    def dequantize(self, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ: out_dtype [out, in], by the reference formula (bit-identical to the packed path)."""
        return reference.dequantize_codes(
            self.codes, self.type_ids, self.scales, self.zeros, self.tables, self.group_size, out_dtype
        )


@dataclass
class PackedWeight:
    """The storage form: ``planes`` int32 [bits, out, ceil(in/32)] instead of per-weight codes."""

    planes: torch.Tensor
    type_ids: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    tables: torch.Tensor
    bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return int(self.planes.shape[1])

    def storage_bits_per_weight(self) -> float:
        """Bits per weight of the tensors as stored (plane padding, uint8 type ids and tables included)."""
        tensors = [self.planes, self.type_ids, self.scales, self.tables]
        tensors += [self.zeros] if self.zeros is not None else []
        n_bytes = sum(t.numel() * t.element_size() for t in tensors)
        return 8.0 * n_bytes / (self.out_features * self.in_features)


def pack_weight(qw: QuantizedWeight) -> PackedWeight:
    """Codes → bit planes (:func:`cuda_ext.reference.pack_bitplanes`); the group tensors are shared."""
    planes = reference.pack_bitplanes(qw.codes, qw.bits)
    return PackedWeight(
        planes, qw.type_ids, qw.scales, qw.zeros, qw.tables, qw.bits, qw.group_size, qw.in_features
    )


def unpack_weight(pw: PackedWeight) -> QuantizedWeight:
    """Bit planes → codes (:func:`cuda_ext.reference.unpack_bitplanes`)."""
    codes = reference.unpack_bitplanes(pw.planes, pw.bits, pw.in_features)
    return QuantizedWeight(
        codes, pw.type_ids, pw.scales, pw.zeros, pw.tables, pw.bits, pw.group_size, pw.in_features
    )
