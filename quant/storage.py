"""On-disk codec of a packed layer's metadata (format version 2); the in-memory layout is unchanged.

In memory (what the kernels and :mod:`cuda_ext.reference` read) a :class:`quant.qlinear.QuantLinear` holds uint8
type ids, fp16 scales, fp16 zero points and fp32 value tables per layer. On disk, version 2 stores:

- ``type_ids_packed``: uint8 [ceil(out·g·k/8)], k = ⌈log2 n_types⌉ bits per id (2 for the 4-member BitMoD sets);
  nothing at all for a single-type set (k = 0, the ids are all 0);
- ``scales`` fp16 [out, g] as before, or with ``scale_bits = 8`` (double quantization)
  ``scale_codes`` uint8 [out, g] and ``scale_hi`` [ceil(out/256), g] (fp32 bit patterns held in an int32
  tensor, so that no dtype cast at load time can touch them):

      s[o, j] = fp16( max(hi[o // 256, j] · 2^(−c[o, j]/32), 2^−24) )

  a log grid of 32 steps per octave (±1.1 % relative) spanning 8 octaves below the ceiling ``hi`` of each block of
  256 rows of one group column. The ceiling is fixed *before* the group choice (``quant.select`` snaps every
  candidate scale onto this grid), so the fp16 scales the model computes with are exactly the decoded ones;
- ``zeros_packed``: uint8 bytes of b-bit zero points (b = the code width; they are integers 0..2^b−1);
- ``tables`` only when they differ from the registered datatype set's tables (else rebuilt from its name).

Version 1 (no ``storage`` entry in the module spec) is the in-memory layout verbatim and keeps loading.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from quant.errors import InputError

FORMAT_VERSION = 2
SCALE_STEPS_PER_OCTAVE = 32
SCALE_CODES = 256
SCALE_BLOCK_ROWS = 256
FP16_MIN_SCALE = 2.0**-24


def _ratio_table() -> torch.Tensor:
    """fp32 [256]: 2^(−c/32), built from 32 float64 mantissas and exact power-of-two shifts (ldexp)."""
    mantissas = [2.0 ** (-i / SCALE_STEPS_PER_OCTAVE) for i in range(SCALE_STEPS_PER_OCTAVE)]
    values = [math.ldexp(mantissas[c % SCALE_STEPS_PER_OCTAVE], -(c // SCALE_STEPS_PER_OCTAVE)) for c in range(256)]
    return torch.tensor(values, dtype=torch.float32)


SCALE_RATIOS = _ratio_table()


# ---- double-quantized scales (pure) ---------------------------------------------------------------------------


def scale_block_ceiling(bound: torch.Tensor) -> torch.Tensor:
    """hi: fp32 [ceil(out/256), g] = max of ``bound`` [out, g] over each block of 256 rows (≥ 2^−24)."""
    out, groups = bound.shape
    n_blocks = -(-out // SCALE_BLOCK_ROWS)
    padded = torch.zeros(n_blocks * SCALE_BLOCK_ROWS, groups, dtype=torch.float32, device=bound.device)
    padded[:out] = bound.float()
    return padded.view(n_blocks, SCALE_BLOCK_ROWS, groups).amax(1).clamp_min(FP16_MIN_SCALE)


def expand_ceiling(hi: torch.Tensor, out_features: int) -> torch.Tensor:
    """hi [n_blocks, g] → the per-group ceiling fp32 [out, g]."""
    return hi.repeat_interleave(SCALE_BLOCK_ROWS, dim=0)[:out_features]


def decode_scales(codes: torch.Tensor, ceiling: torch.Tensor) -> torch.Tensor:
    """fp16 scales = fp16(max(ceiling · 2^(−code/32), 2^−24)). codes: uint8 [..]; ceiling: fp32, same shape."""
    ratios = SCALE_RATIOS.to(ceiling.device)[codes.long()]
    return (ceiling.float() * ratios).clamp_min(FP16_MIN_SCALE).half()


def snap_scales(scale: torch.Tensor, ceiling: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest grid scale (in log2) to the wanted ``scale`` (any float, same shape as ``ceiling``).

    Returns (codes uint8, fp16 scales = :func:`decode_scales` (codes, ceiling)). Wanted scales above the
    ceiling get code 0 (= the ceiling), below the grid the last code."""
    ratio = scale.float().clamp_min(FP16_MIN_SCALE) / ceiling.float()
    codes = torch.round(-SCALE_STEPS_PER_OCTAVE * torch.log2(ratio)).clamp(0, SCALE_CODES - 1).to(torch.uint8)
    return codes, decode_scales(codes, ceiling)


def encode_scales(scales: torch.Tensor, ceiling: torch.Tensor) -> torch.Tensor:
    """Codes of fp16 ``scales`` that lie on the grid of ``ceiling``; InputError if one does not (not encodable)."""
    codes, decoded = snap_scales(scales, ceiling)
    if not torch.equal(decoded, scales.half()):
        raise InputError("scales: not on the 8-bit scale grid of this layer (quantize with scale_bits: 8)")
    return codes


# ---- bit packing of small integers (pure) ---------------------------------------------------------------------


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers 0..2^bits−1 (any shape, read flat) → uint8 [ceil(n·bits/8)], LSB first."""
    flat = values.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise InputError(f"values: expected integers in 0..{2**bits - 1} to pack in {bits} bits")
    stream = ((flat.unsqueeze(-1) >> torch.arange(bits, dtype=torch.int32)) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)])
    return (stream.view(-1, 8) << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 [count] (flat)."""
    stream = ((packed.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1).reshape(-1)
    stream = stream[: count * bits].view(count, bits)
    return (stream << torch.arange(bits, dtype=torch.int32)).sum(-1).to(torch.uint8)


def packed_len(count: int, bits: int) -> int:
    return -(-count * bits // 8)


# ---- the layout of one module on disk -------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskLayout:
    """How one packed layer's metadata is stored (the ``storage`` entry of its module spec)."""

    type_id_bits: int  # 0 = one type, no ids stored
    scale_bits: int  # 16 = fp16 scales, 8 = double-quantized
    zero_bits: int | None  # None = symmetric (no zero points)
    tables: str  # "registry" (rebuilt from the datatype-set name) or "stored"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiskLayout:
        return cls(int(data["type_id_bits"]), int(data["scale_bits"]), data.get("zero_bits"), str(data["tables"]))


def registry_tables(dtypes: str) -> torch.Tensor | None:
    from quant.datatypes import DATATYPE_SETS

    return DATATYPE_SETS[dtypes].tables() if dtypes in DATATYPE_SETS else None


def choose_layout(
    type_ids: torch.Tensor, tables: torch.Tensor, zeros: torch.Tensor | None, bits: int, dtypes: str,
    scale_hi: torch.Tensor | None,
) -> DiskLayout:  # fmt: skip
    """The most compact lossless layout for these in-memory tensors."""
    n_types = int(tables.shape[0])
    zero_bits = None
    if zeros is not None:
        z = zeros.float()
        exact = bool((z == z.round()).all()) and bool(((z >= 0) & (z < 2**bits)).all())
        zero_bits = bits if exact else 16
    known = registry_tables(dtypes)
    same = known is not None and known.shape == tables.shape and torch.equal(known, tables.cpu())
    return DiskLayout(
        math.ceil(math.log2(n_types)) if n_types > 1 else 0, 8 if scale_hi is not None else 16, zero_bits,
        "registry" if same else "stored",
    )  # fmt: skip


def encode_metadata(
    tensors: dict[str, torch.Tensor | None], layout: DiskLayout, scale_hi: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """In-memory {type_ids, scales, zeros, tables} → the disk tensors of ``layout`` (all on CPU)."""
    type_ids, scales, zeros, tables = (tensors[k] for k in ("type_ids", "scales", "zeros", "tables"))
    assert type_ids is not None and scales is not None and tables is not None
    out: dict[str, torch.Tensor] = {}
    if layout.type_id_bits:
        out["type_ids_packed"] = pack_bits(type_ids.cpu(), layout.type_id_bits)
    elif bool(type_ids.any()):
        raise InputError("type_ids: a single-type layer must have all type ids 0")
    if layout.scale_bits == 8:
        assert scale_hi is not None
        hi = scale_hi.float().cpu()
        out["scale_codes"] = encode_scales(scales.cpu(), expand_ceiling(hi, scales.shape[0]))
        out["scale_hi"] = hi.view(torch.int32)
    else:
        out["scales"] = scales.cpu()
    if zeros is not None:
        z = zeros.cpu()
        if layout.zero_bits == 16:
            out["zeros"] = z
        else:
            out["zeros_packed"] = pack_bits(z.float().round(), layout.zero_bits or 0)
    if layout.tables == "stored":
        out["tables"] = tables.cpu()
    return out


Shapes = dict[str, tuple[tuple[int, ...], torch.dtype]]


def disk_shapes(layout: DiskLayout, out_features: int, n_groups: int, n_types: int, bits: int) -> Shapes:
    """{name: (shape, dtype)} of the disk tensors, to build an empty module before loading."""
    count = out_features * n_groups
    shapes: Shapes = {}
    if layout.type_id_bits:
        shapes["type_ids_packed"] = ((packed_len(count, layout.type_id_bits),), torch.uint8)
    if layout.scale_bits == 8:
        shapes["scale_codes"] = ((out_features, n_groups), torch.uint8)
        shapes["scale_hi"] = ((-(-out_features // SCALE_BLOCK_ROWS), n_groups), torch.int32)
    else:
        shapes["scales"] = ((out_features, n_groups), torch.float16)
    if layout.zero_bits == 16:
        shapes["zeros"] = ((out_features, n_groups), torch.float16)
    elif layout.zero_bits is not None:
        shapes["zeros_packed"] = ((packed_len(count, layout.zero_bits),), torch.uint8)
    if layout.tables == "stored":
        shapes["tables"] = ((n_types, 2**bits), torch.float32)
    return shapes


def decode_metadata(
    disk: dict[str, torch.Tensor], layout: DiskLayout, out_features: int, n_groups: int, dtypes: str
) -> dict[str, torch.Tensor | None]:
    """Disk tensors → in-memory {type_ids, scales, zeros, tables} (+ ``scale_hi`` for re-encoding)."""
    shape = (out_features, n_groups)
    count = out_features * n_groups
    device = next(iter(disk.values())).device if disk else torch.device("cpu")
    if layout.type_id_bits:
        type_ids = unpack_bits(disk["type_ids_packed"].cpu(), layout.type_id_bits, count).view(shape)
    else:
        type_ids = torch.zeros(shape, dtype=torch.uint8)
    hi = disk["scale_hi"].cpu().contiguous().view(torch.float32) if layout.scale_bits == 8 else None
    if hi is not None:
        scales = decode_scales(disk["scale_codes"].cpu(), expand_ceiling(hi, out_features))
    else:
        scales = disk["scales"]
    zeros: torch.Tensor | None = None
    if layout.zero_bits == 16:
        zeros = disk["zeros"]
    elif layout.zero_bits is not None:
        zeros = unpack_bits(disk["zeros_packed"].cpu(), layout.zero_bits, count).view(shape).half()
    tables = disk["tables"] if layout.tables == "stored" else registry_tables(dtypes)
    if tables is None:
        raise InputError(f"quantization_config: datatype set {dtypes!r} unknown and its tables are not stored")
    result = {"type_ids": type_ids, "scales": scales, "zeros": zeros, "tables": tables, "scale_hi": hi}
    return {k: (v.to(device) if v is not None else None) for k, v in result.items()}
