"""Weight datatypes as value tables ("grids"): real value = grid value × group scale.

A :class:`Datatype` is one 2**bits-entry value table; code ``c`` of a group means ``values[c]``. Codes index
the table in ascending value order; tables with fewer distinct values than codes are padded with ``0.0`` at
the end (padding codes are never emitted by the quantiser, see :mod:`quant.select`). A
:class:`DatatypeSet` is what one group chooses among (≤ 4 members: the type id is 2 bits); a single type is a
set of one.

Sources
- BitMoD (Chen et al., HPCA 2025, arXiv 2411.11745), "fine-grained data type adaptation": FP3/FP4 whose
  redundant code (−0) is reused for one special value — ER± (extra resolution: ±10 for FP4, ±3 for FP3) or
  EA± (extra asymmetry: ±16 for FP4, ±6 for FP3). Same constants as the authors' simulation code
  (abdelfattah-lab/BitMoD-HPCA-25, ``bitmod_quant/quant_utils/quant_weight.py``: ``FP4_ER_POS``, …).
- FP4 = E2M1 and FP3 = E2M0-like (subnormal) grids, both ×2 so that every value is an integer.
- NF4: the 16 NormalFloat constants of QLoRA (Dettmers et al., 2023) exactly as bitsandbytes ships them
  (``bitsandbytes.functional.get_4bit_type('nf4')``), already normalised to [-1, 1].
- ANT (Guo et al., MICRO 2022) chooses per tensor/group between INT and "flint" (float-int: a leading-one
  coded exponent). Signed 4-bit flint from ANT's ``flint_value()`` (clevercool/ANT-Quantization) has the
  magnitudes {0, .25, .5, .75, 1, 1.5, 2, 4}, i.e. ×4 → {0, ±1, ±2, ±3, ±4, ±6, ±8, ±16}, which is also the
  BitMoD authors' ``FLINT4``. Signed 3-bit flint reduces to {0, ±1, ±2, ±4} = FP3, so ``ant3`` = {INT3, FP3}
  as in the BitMoD baseline (``mixed_ant``). INT grids are the symmetric ones ({−7..7}, {−3..3}).
- MXFP4 (OCP Microscaling v1.0): E2M1 element values {0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6} with one shared
  power-of-two scale per block of 32. We use X = 2^ceil(log2(absmax/6)) (never clips). The OCP spec's
  rule is X = 2^(floor(log2 absmax) − 2) with elements saturating at ±6; the two agree when
  absmax/2^floor(log2 absmax) ≤ 1.5 and otherwise ours is 2× larger (coarser, but no clipping). The scale
  is stored as an exact fp16 power of two (the spec's E8M0 would need 8 bits: see ``bits_per_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.errors import InputError

SUPPORTED_BITS = (2, 3, 4, 8)
MAX_TYPES_PER_SET = 4  # the per-group type id is stored in 2 bits


@dataclass(frozen=True)
class Datatype:
    """One value table. ``values``: 2**bits floats in ascending order (padding ``0.0`` at the end).

    ``asymmetric``: the grid is 0..2**bits−1 and each group stores a zero point z, so that the real value is
    (values[c] − z) × scale. ``pow2_scale``: the group scale is rounded up to a power of two (MX formats).
    """

    name: str
    bits: int
    values: tuple[float, ...]
    asymmetric: bool = False
    pow2_scale: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise InputError(f"datatype {self.name!r}: bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if len(self.values) != 2**self.bits:
            raise InputError(
                f"datatype {self.name!r}: values must have 2**bits = {2**self.bits} entries, "
                f"got {len(self.values)}"
            )
        distinct = self.distinct_values
        if list(distinct) != sorted(set(distinct)):
            raise InputError(
                f"datatype {self.name!r}: values must be ascending (padding 0.0 only at the end)"
            )
        if 0.0 not in distinct:
            raise InputError(f"datatype {self.name!r}: the grid must contain 0")

    @property
    def distinct_values(self) -> tuple[float, ...]:
        """The values without the trailing padding: codes 0..len−1 are the ones the quantiser emits."""
        n = len(self.values)
        while n > 1 and self.values[n - 1] == 0.0 and 0.0 in self.values[: n - 1]:
            n -= 1
        return self.values[:n]

    @property
    def max_abs(self) -> float:
        """max |grid|: the symmetric scale is s = absmax(w) / max_abs."""
        return max(abs(v) for v in self.values)


@dataclass(frozen=True)
class DatatypeSet:
    """The datatypes one group chooses among; the chosen index is the group's type id (≤ 2 bits).

    ``group_size``: a block size the format mandates (MX: 32), else None (the caller chooses).
    """

    name: str
    bits: int
    members: tuple[Datatype, ...]
    group_size: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.members) <= MAX_TYPES_PER_SET:
            raise InputError(f"datatype set {self.name!r}: needs 1..{MAX_TYPES_PER_SET} members")
        if any(m.bits != self.bits for m in self.members):
            raise InputError(f"datatype set {self.name!r}: all members must have bits={self.bits}")

    @property
    def asymmetric(self) -> bool:
        """True when any member stores a per-group zero point."""
        return any(m.asymmetric for m in self.members)

    def tables(self) -> torch.Tensor:
        """Value tables, float32 [n_types, 2**bits] (row t = member t)."""
        return torch.tensor([m.values for m in self.members], dtype=torch.float32)


def _padded(values: list[float], bits: int) -> tuple[float, ...]:
    """Ascending ``values`` padded with 0.0 up to 2**bits codes."""
    ordered = sorted(values)
    return tuple(float(v) for v in ordered + [0.0] * (2**bits - len(ordered)))


def _symmetric(magnitudes: list[float]) -> list[float]:
    """{0} ∪ {±m}: the grid of a sign-magnitude format."""
    return sorted({0.0, *magnitudes, *(-m for m in magnitudes)})


def _plain(name: str, bits: int, values: list[float], **flags: bool) -> Datatype:
    return Datatype(name, bits, _padded(values, bits), **flags)


def _int_sym(bits: int) -> Datatype:
    """Symmetric INT: {−(2^(b−1)−1) .. 2^(b−1)−1}; the most negative code is unused (padding)."""
    qmax = 2 ** (bits - 1) - 1
    return _plain(f"int{bits}_sym", bits, [float(v) for v in range(-qmax, qmax + 1)])


def _int_asym(bits: int) -> Datatype:
    """Asymmetric INT: codes 0..2^b−1 with a per-group zero point z: w ≈ (c − z) × s."""
    return Datatype(f"int{bits}_asym", bits, tuple(float(v) for v in range(2**bits)), asymmetric=True)


FP4_VALUES = _symmetric([1, 2, 3, 4, 6, 8, 12])  # E2M1 × 2: 15 values, the −0 code is free
FP3_VALUES = _symmetric([1, 2, 4])  # ×2: 7 values, one code free
FLINT4_VALUES = _symmetric([1, 2, 3, 4, 6, 8, 16])  # ANT flint4 × 4
E2M1_VALUES = _symmetric([0.5, 1, 1.5, 2, 3, 4, 6])  # MX element values (unscaled E2M1)
NF4_VALUES = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip

# BitMoD special values: (suffix, value) for ER+, ER−, EA+, EA− (the order is the type id).
BITMOD4_EXTRAS = (("er_pos", 10.0), ("er_neg", -10.0), ("ea_pos", 16.0), ("ea_neg", -16.0))
BITMOD3_EXTRAS = (("er_pos", 3.0), ("er_neg", -3.0), ("ea_pos", 6.0), ("ea_neg", -6.0))


def _bitmod(bits: int, base: list[float], extras: tuple[tuple[str, float], ...]) -> DatatypeSet:
    """BitMoD-b: FP-b ∪ {one special value} per member (the special value takes the free −0 code)."""
    members = tuple(_plain(f"fp{bits}_{suffix}", bits, [*base, extra]) for suffix, extra in extras)
    return DatatypeSet(f"bitmod{bits}", bits, members)


def _single(dtype: Datatype, name: str | None = None, group_size: int | None = None) -> DatatypeSet:
    return DatatypeSet(name or dtype.name, dtype.bits, (dtype,), group_size)


def _build_registry() -> dict[str, DatatypeSet]:
    sets = [
        _bitmod(4, FP4_VALUES, BITMOD4_EXTRAS),
        _bitmod(3, FP3_VALUES, BITMOD3_EXTRAS),
        _single(_plain("fp4", 4, FP4_VALUES)),
        _single(_plain("fp3", 3, FP3_VALUES)),
        _single(_plain("nf4", 4, NF4_VALUES)),
        DatatypeSet("ant4", 4, (_int_sym(4), _plain("flint4", 4, FLINT4_VALUES))),
        DatatypeSet("ant3", 3, (_int_sym(3), _plain("flint3", 3, FP3_VALUES))),
        _single(_plain("mxfp4", 4, E2M1_VALUES, pow2_scale=True), group_size=32),
    ]
    sets += [_single(make(bits)) for bits in (3, 4, 8) for make in (_int_sym, _int_asym)]
    return {s.name: s for s in sets}


DATATYPE_SETS: dict[str, DatatypeSet] = _build_registry()


def get_datatype_set(name: str) -> DatatypeSet:
    """The registered set called ``name``; InputError naming the known sets otherwise."""
    if name not in DATATYPE_SETS:
        raise InputError(
            f"dtset_name: unknown datatype set {name!r}; expected one of {sorted(DATATYPE_SETS)}"
        )
    return DATATYPE_SETS[name]
