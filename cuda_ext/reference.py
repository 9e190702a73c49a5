"""Pure-torch reference of the bit-plane weight format: THE ORACLE the CUDA kernels must match bit for bit.

Format (fixed; ``cuda_ext/csrc`` implements exactly this):

- ``codes``: uint8 [out, in], every code < 2**bits, bits ∈ {2, 3, 4, 8}.
- ``planes``: int32 [bits, out, ceil(in/32)]; bit i (i = 0 is the LSB) of ``planes[k, o, w]`` is bit k of
  ``codes[o, 32*w + i]``; codes beyond ``in`` are 0. The int32 holds the uint32 bit pattern.
- groups of G consecutive input weights of one output row; n_groups = ceil(in/G); the last may be ragged.
- ``type_ids``: uint8 [out, n_groups]; ``scales``: float16 [out, n_groups]; ``zeros``: float16
  [out, n_groups] or None (= 0); ``tables``: float32 [n_types, 2**bits].
- dequantisation, in float32, then one round-to-nearest-even cast to ``out_dtype``::

      w[o, i] = (tables[type_ids[o, i//G], codes[o, i]] − zeros[o, i//G]) × float(scales[o, i//G])

This module imports nothing from Secateurs (it is the spec, shared with the kernel author). Shape errors
raise ValueError: ``cuda_ext`` only sees tensors that our own code built (user input is checked in ``quant``).
"""

from __future__ import annotations

import torch

WORD_BITS = 32
SUPPORTED_BITS = (2, 3, 4, 8)
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def n_words(in_features: int) -> int:
    """Number of 32-code words per row and plane: ceil(in/32)."""
    return -(-in_features // WORD_BITS)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _lane_shifts(device: torch.device) -> torch.Tensor:
    """[32] int32: bit position i of code 32*w + i inside its word."""
    return torch.arange(WORD_BITS, dtype=torch.int32, device=device)


def pack_bitplanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Split b-bit codes into b bit planes, 32 codes per int32 word along ``in``.

    codes: uint8 [out, in] (values < 2**bits) → planes: int32 [bits, out, ceil(in/32)].
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"codes must be uint8 [out, in], got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"codes must be < 2**bits = {2**bits}, got max {int(codes.max())}")
    out_features, in_features = codes.shape
    padded = torch.zeros(
        out_features, n_words(in_features) * WORD_BITS, dtype=torch.int32, device=codes.device
    )
    padded[:, :in_features] = codes.to(torch.int32)
    lanes = padded.view(out_features, -1, WORD_BITS)  # [out, words, 32]
    shifts = _lane_shifts(codes.device)
    # Bits land in disjoint positions, so the int32 sum is an OR; lane 31 is the sign bit
    planes = [(((lanes >> k) & 1) << shifts).sum(-1, dtype=torch.int32) for k in range(bits)]
    return torch.stack(planes)


def unpack_bitplanes(planes: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Rebuild the codes bit-serially: visit plane k, add its bit × 2**k to every code.

    planes: int32 [bits, out, ceil(in/32)] → codes: uint8 [out, in_features].
    """
    _check_bits(bits)
    expected = (bits, planes.shape[1] if planes.dim() == 3 else -1, n_words(in_features))
    if planes.dtype != torch.int32 or planes.dim() != 3 or tuple(planes.shape) != expected:
        raise ValueError(f"planes must be int32 {expected}, got {planes.dtype} {tuple(planes.shape)}")
    shifts = _lane_shifts(planes.device)
    codes = torch.zeros(planes.shape[1], planes.shape[2], WORD_BITS, dtype=torch.int32, device=planes.device)
    for k in range(bits):
        # Arithmetic shift of a negative word repeats the sign bit above bit 31; the & 1 discards it.
        codes |= ((planes[k].unsqueeze(-1) >> shifts) & 1) << k
    return codes.view(planes.shape[1], -1)[:, :in_features].to(torch.uint8)


def _check_group_tensors(
    out_features: int,
    in_features: int,
    group_size: int,
    type_ids: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    tables: torch.Tensor,
) -> None:
    if group_size < 1:
        raise ValueError(f"group_size must be ≥ 1, got {group_size}")
    shape = (out_features, -(-in_features // group_size))
    for name, t, dtype in (("type_ids", type_ids, torch.uint8), ("scales", scales, torch.float16)):
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")
    if zeros is not None and (zeros.dtype != torch.float16 or tuple(zeros.shape) != shape):
        raise ValueError(f"zeros must be float16 {shape} or None, got {zeros.dtype} {tuple(zeros.shape)}")
    if tables.dtype != torch.float32 or tables.dim() != 2:
        raise ValueError(
            f"tables must be float32 [n_types, 2**bits], got {tables.dtype} {tuple(tables.shape)}"
        )


def dequantize_codes(
    codes: torch.Tensor,
    type_ids: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    tables: torch.Tensor,
    group_size: int,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """w = (tables[type_id, code] − zero) × scale in float32, cast once to ``out_dtype``.

    codes: uint8 [out, in]; type_ids, scales, zeros: [out, n_groups] → w: out_dtype [out, in].
    """
    out_features, in_features = codes.shape
    _check_group_tensors(out_features, in_features, group_size, type_ids, scales, zeros, tables)
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    group_of = torch.arange(in_features, device=codes.device) // group_size  # [in]
    type_of = type_ids.long()[:, group_of]  # [out, in]
    values = tables[type_of, codes.long()]  # float32 [out, in]
    if zeros is not None:
        values = values - zeros.float()[:, group_of]
    return (values * scales.float()[:, group_of]).to(out_dtype)


def dequantize(
    planes: torch.Tensor,
    type_ids: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    tables: torch.Tensor,
    in_features: int,
    group_size: int,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Dense weight from the packed format. planes: int32 [bits, out, ceil(in/32)] → out_dtype [out, in]."""
    codes = unpack_bitplanes(planes, planes.shape[0], in_features)
    return dequantize_codes(codes, type_ids, scales, zeros, tables, group_size, out_dtype)


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
    """y = x @ Ŵᵀ with Ŵ dequantised to x.dtype first. x: [..., in] → y: [..., out], dtype of x."""
    if x.shape[-1] != in_features:
        raise ValueError(f"x must be [..., {in_features}], got {tuple(x.shape)}")
    weight = dequantize(planes, type_ids, scales, zeros, tables, in_features, group_size, x.dtype)
    return x @ weight.T
