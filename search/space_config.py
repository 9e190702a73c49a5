"""The ``search.space`` block: which dimensions a search explores (pydantic, ``extra="forbid"``).

:mod:`search.space` turns it into optuna distributions and overlays a trial's point on the base recipe.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from compress.recipe import Strict

Structure = Literal["AL-AM", "AL-MM", "UL-UM", "UL-MM"]
SubBlock = Literal["attn", "mlp"]
Width = Literal[3, 4, 8]


class FloatRange(Strict):
    low: float = Field(ge=0.0, le=1.0)
    high: float = Field(ge=0.0, le=1.0)
    step: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if self.low > self.high:
            raise ValueError(f"low {self.low} > high {self.high}")
        return self


class KeepSpace(Strict):
    """Per-layer (``block: 1``) or per-block keep fractions of attention KV groups and MLP channels.

    ``skip_from``: blocks whose first layer is ≥ this may remove a whole sub-block (listed in ``skip``);
    None = no skips. Layer 0 is never skipped.
    """

    block: int = Field(1, ge=1)
    attn: FloatRange = Field(default_factory=lambda: FloatRange(low=0.3, high=1.0))
    mlp: FloatRange = Field(default_factory=lambda: FloatRange(low=0.25, high=1.0))
    skip_from: int | None = Field(None, ge=1)
    skip: list[SubBlock] = Field(default_factory=lambda: list[SubBlock](["attn", "mlp"]))


class BitsSpace(Strict):
    """Per-layer or per-block weight bits; ``datatypes`` lists the sets each width may use (searched if > 1)."""

    block: int = Field(1, ge=1)
    choices: list[Width] = Field(default_factory=lambda: list[Width]([3, 4, 8]), min_length=1)
    datatypes: dict[int, list[str]] = Field(default_factory=lambda: {3: ["bitmod3"], 4: ["bitmod4"], 8: ["int8_asym"]})

    @field_validator("datatypes")
    @classmethod
    def _sets_match_bits(cls, value: dict[int, list[str]]) -> dict[int, list[str]]:
        from quant.datatypes import DATATYPE_SETS

        for bits, names in value.items():
            if not names:
                raise ValueError(f"{bits}: list at least one datatype set")
            for name in names:
                if name not in DATATYPE_SETS:
                    raise ValueError(f"{bits}: unknown datatype set {name!r}; expected one of {sorted(DATATYPE_SETS)}")
                if DATATYPE_SETS[name].bits != bits:
                    raise ValueError(f"{bits}: {name!r} has {DATATYPE_SETS[name].bits} bits, not {bits}")
        return value

    @model_validator(mode="after")
    def _every_choice_has_sets(self) -> BitsSpace:
        if len(set(self.choices)) != len(self.choices):
            raise ValueError(f"choices: repeated bit widths in {self.choices}")
        missing = [b for b in self.choices if b not in self.datatypes]
        if missing:
            raise ValueError(f"datatypes: no datatype set for {missing} bits")
        return self


class SpaceConfig(Strict):
    """Either a global allocation (``ratio``, ``structure``) or explicit per-layer widths (``keep``), plus
    optional quantization dimensions (``bits``, ``group_size``). With a ``structure: puzzle`` base prune step the
    trials pick budgets (``ratio`` and the Puzzle KV-cache / latency ratios) and the integer program picks the
    architecture."""

    ratio: FloatRange | None = None
    structure: list[Structure] | None = Field(None, min_length=1)
    kv_cache_ratio: FloatRange | None = Field(None, description="Puzzle: max fraction of the dense KV cache")
    latency_ratio: FloatRange | None = Field(None, description="Puzzle: max fraction of the dense sub-block latency")
    keep: KeepSpace | None = None
    bits: BitsSpace | None = None
    group_size: list[int] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _coherent(self) -> SpaceConfig:
        budgets = (self.kv_cache_ratio, self.latency_ratio)
        if not any((self.ratio, self.structure, self.keep, self.bits, self.group_size, *budgets)):
            raise ValueError("the space is empty: give ratio, structure, keep, bits or group_size")
        if self.keep is not None and (self.ratio is not None or self.structure is not None or any(budgets)):
            raise ValueError("keep (per-layer widths) replaces the global allocation: drop ratio/structure/budgets")
        return self

    @property
    def prunes(self) -> bool:
        return any(
            x is not None for x in (self.ratio, self.structure, self.keep, self.kv_cache_ratio, self.latency_ratio)
        )

    @property
    def quantizes(self) -> bool:
        return self.bits is not None or self.group_size is not None
