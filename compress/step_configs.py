"""Step configs of a recipe: ``prune``, ``nas``, ``quantize`` and ``distill``, and the ``Step`` union that
dispatches a one-key mapping on its key. Each config is documented field by field; unknown keys are errors."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from compress.puzzle.config import PuzzleConfig
from compress.schema import Strict, compiled_regex


class PruneConfig(Strict):
    """Structured pruning of attention KV groups and MLP channels (FLAP and its baselines)."""

    method: Literal["flap", "wanda-sp", "magnitude-sp"] = "flap"
    ratio: float = Field(0.2, ge=0.0, lt=1.0, description="fraction of prunable decoder parameters removed")
    metric: Literal["WIFV", "IFV", "WIFN"] = "WIFV"
    structure: Literal["AL-AM", "AL-MM", "UL-UM", "UL-MM", "puzzle"] | None = None
    puzzle: PuzzleConfig | None = Field(
        None, description="structure: puzzle — library, scoring and budgets (defaults when omitted)"
    )
    attn_ratio: float | None = Field(None, ge=0.0, lt=1.0)
    uniform_rounding: Literal["floor", "nearest"] | None = Field(
        None,
        description="uniform structures remove floor(ratio·n) units per module (the Wanda-sp reference) or keep "
        "round((1 − ratio)·n); default floor for the baselines, nearest for FLAP",
    )
    statistics: Literal["dense", "progressive"] = "dense"
    bias_compensation: bool | None = None
    reconstruct: Literal["none", "bias", "least_squares"] | None = Field(
        None,
        description="repair after the units are chosen: none, FLAP's bias compensation, or a ridge least-squares "
        "refit of o_proj/down_proj to the dense outputs (compressed-prefix inputs); default from bias_compensation",
    )
    ridge: float | None = Field(
        None,
        ge=0.0,
        description="least squares: ridge λ relative to the mean diagonal of XXᵀ; default: chosen per consumer from "
        "0.01..1e4 on held-out calibration mini-batches",
    )
    replacement: Literal["constant", "linear"] = Field(
        "constant",
        description="a removed sub-block (no unit kept): FLAP's constant (its mean output) or Puzzle's linear "
        "replacement, a ridge least-squares map of its input (needs reconstruct: least_squares)",
    )
    replacement_rank: int = Field(0, ge=0, description="rank of a linear replacement (0 = full hidden × hidden)")
    square_attention_scores: bool = True
    min_units: int = Field(
        1, ge=0, description="units every module keeps (0: the threshold may remove a whole sub-block)"
    )
    attn_keep: list[Annotated[float, Field(ge=0.0, le=1.0)]] | None = Field(
        None, description="explicit per-layer fraction of KV groups kept (0 = attention sub-block removed)"
    )
    mlp_keep: list[Annotated[float, Field(ge=0.0, le=1.0)]] | None = Field(
        None, description="explicit per-layer fraction of MLP channels kept (0 = MLP sub-block removed)"
    )
    attn_groups: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="explicit per-layer count of KV groups kept (0 = attention sub-block removed)"
    )
    mlp_channels: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="explicit per-layer count of MLP channels kept, used as given (0 = MLP removed)"
    )
    mlp_step: int = Field(32, ge=1, description="explicit MLP fractions are snapped to multiples of this")

    @model_validator(mode="after")
    def _explicit_widths(self) -> PruneConfig:
        """Explicit widths (fractions or counts, not both) replace the allocation (``ratio``/``structure``)."""
        for a, m, names in (
            (self.attn_keep, self.mlp_keep, "attn_keep and mlp_keep"),
            (self.attn_groups, self.mlp_channels, "attn_groups and mlp_channels"),
        ):
            if (a is None) != (m is None):
                raise ValueError(f"{names} must be given together (one entry per decoder layer)")
            if a is not None and m is not None and len(a) != len(m):
                raise ValueError(f"{names} have {len(a)} and {len(m)} entries")
        if self.attn_keep is not None and self.attn_groups is not None:
            raise ValueError("give per-layer widths as fractions (attn_keep/mlp_keep) or counts, not both")
        return self

    @model_validator(mode="after")
    def _method_defaults(self) -> PruneConfig:
        """FLAP defaults to the adaptive structure with compensation; the baselines to uniform layers with the
        MLP width matched to the same parameter budget, attention rounded down like the Wanda-sp reference, and
        no compensation (as in the FLAP paper)."""
        if self.structure is None:
            self.structure = "AL-AM" if self.method == "flap" else "UL-MM"
        if self.uniform_rounding is None:
            self.uniform_rounding = "nearest" if self.method == "flap" else "floor"
        if self.bias_compensation is None:
            self.bias_compensation = self.method == "flap"
        return self

    @model_validator(mode="after")
    def _reconstruct(self) -> PruneConfig:
        """``reconstruct`` none/bias is ``bias_compensation`` false/true; least squares keeps the compensation
        constants of removed sub-blocks. Given both, they must agree."""
        if self.reconstruct is None:
            self.reconstruct = "bias" if self.bias_compensation else "none"
            return self
        wanted = self.reconstruct != "none"
        if "bias_compensation" in self.model_fields_set and self.bias_compensation is not wanted:
            raise ValueError(f"reconstruct: {self.reconstruct} contradicts bias_compensation: {self.bias_compensation}")
        self.bias_compensation = wanted
        return self

    @model_validator(mode="after")
    def _replacement(self) -> PruneConfig:
        if self.replacement == "linear" and self.reconstruct != "least_squares":
            raise ValueError("replacement: linear is fitted by reconstruct: least_squares")
        return self

    @model_validator(mode="after")
    def _puzzle(self) -> PruneConfig:
        """Puzzle chooses the widths itself (FLAP units, dense statistics, compensation); its settings only with it."""
        if self.structure != "puzzle":
            if self.puzzle is not None:
                raise ValueError("puzzle settings are only used with structure: puzzle")
            return self
        if self.method != "flap" or self.statistics != "dense" or self.explicit or self.bias_compensation is False:
            raise ValueError(
                "structure: puzzle needs method flap, dense statistics, bias compensation and no explicit widths"
            )
        if self.puzzle is None:
            self.puzzle = PuzzleConfig()
        if self.puzzle.repair == "least_squares" and self.reconstruct != "least_squares":
            raise ValueError(
                "puzzle.repair: least_squares scores the variants as reconstruct: least_squares realises them; set "
                "reconstruct: least_squares"
            )
        return self

    @property
    def explicit(self) -> bool:
        """Per-layer widths are given (fractions or counts): no allocation."""
        return self.attn_keep is not None or self.attn_groups is not None


class PruneStep(Strict):
    prune: PruneConfig


class NasConfig(Strict):
    """TraceNAS-style search over per-layer widths and sub-block removal, maximising the gradient-trace proxy Φ
    inside a parameter window; the winner is applied like a prune step with explicit widths (FLAP scores, bias
    compensation). Training-free: nothing is fine-tuned afterwards."""

    params_ratio: float = Field(0.8, gt=0.0, le=1.0, description="kept fraction of prunable decoder parameters")
    tolerance: float = Field(0.01, gt=0.0, lt=0.5)
    proxy: Literal["phi", "phi_norm"] = "phi"
    proxy_samples: int = Field(4, ge=1)
    proxy_seq_len: int = Field(128, ge=8)
    population: int = Field(12, ge=2)
    generations: int = Field(6, ge=1)
    elites: int = Field(3, ge=1)
    p_crossover: float = Field(0.7, ge=0.0, le=1.0)
    p_mutation: float = Field(0.2, ge=0.0, le=1.0)
    mlp_step: int = Field(32, ge=1)
    allow_skip: bool = True
    skip_from: int | None = Field(None, ge=1, description="first layer whose sub-blocks may be removed (default: half)")
    bias_compensation: bool = True
    least_squares: bool = Field(
        False,
        description="refit every candidate's o_proj/down_proj by ridge least squares (prune reconstruct: "
        "least_squares) before its proxy score, so candidates are ranked repaired; the chosen model too. Costs one "
        "paired calibration pass per candidate",
    )
    seed_with_flap: bool = True


class NasStep(Strict):
    nas: NasConfig


def _known_dtypes(name: str | None) -> str | None:
    from quant.datatypes import DATATYPE_SETS

    if name is not None and name not in DATATYPE_SETS:
        raise ValueError(f"unknown datatype set {name!r}; expected one of {sorted(DATATYPE_SETS)}")
    return name


class QuantOverride(Strict):
    """Mixed precision: linears whose full name matches ``match`` (regex) use these settings instead."""

    match: str

    _regex = field_validator("match")(classmethod(lambda cls, v: compiled_regex(v)))
    dtypes: str | None = None
    group_size: int | None = Field(None, ge=1)

    _known = field_validator("dtypes")(classmethod(lambda cls, v: _known_dtypes(v)))


class QuantizeConfig(Strict):
    """Weight quantization of the decoder linears into packed bit planes with per-group datatypes.

    ``dtypes`` names a datatype set of ``quant.datatypes`` (bitmod4, bitmod3, int4_asym, nf4, ...); every group of
    ``group_size`` consecutive input weights of a row picks the member with the lowest error. ``modules`` is a
    regex on the linear's path inside a decoder layer (e.g. "self_attn\\..*"). lm_head and embeddings are never
    quantized (they are tied in SmolLM2).

    ``method``: rtn (round to nearest), gptq (error compensation with the Hessian 2XXᵀ of calibration inputs),
    awq (per-input-channel scales folded into the preceding norm/linear, plus clip search), awq+gptq (both).
    ``type_choice: ex2_weighted`` weights the per-group datatype choice by E[x_j²] (the old recipe key
    ``activation_aware: true``); GPTQ always weights it by its own loss 1/[H⁻¹]_jj. ``scale_bits: 8`` stores
    double-quantized group scales (the group choice already uses the 8-bit scales, so nothing changes on load).
    """

    dtypes: str = "bitmod4"
    group_size: int | None = Field(128, ge=1, description="None = one group per output channel")
    shrink_factors: list[float] = Field(default_factory=lambda: [1.0])
    method: Literal["rtn", "gptq", "awq", "awq+gptq"] = "rtn"
    type_choice: Literal["plain", "ex2_weighted"] = "plain"
    scale_bits: Literal[16, 8] = 16
    damp: float = Field(0.01, ge=0.0, description="GPTQ dampening, as a fraction of mean(diag H)")
    act_order: bool = False
    awq_grid: int = Field(20, ge=1, description="AWQ: number of α values tried (and clip ratios per unit)")
    awq_tokens: int = Field(2048, ge=16, description="AWQ: sampled calibration tokens for the scale search")
    awq_clip: bool = True
    modules: str = ".*"
    _regex = field_validator("modules")(classmethod(lambda cls, v: compiled_regex(v)))
    overrides: list[QuantOverride] = Field(default_factory=list)
    export: Literal["packed", "dequantized"] = "packed"

    _known = field_validator("dtypes")(classmethod(lambda cls, v: _known_dtypes(v)))

    @model_validator(mode="before")
    @classmethod
    def _renamed_activation_aware(cls, data: Any) -> Any:
        """The old key ``activation_aware`` (an E[x²]-weighted type choice) maps onto ``type_choice``."""
        if isinstance(data, dict) and "activation_aware" in data:
            data = dict(data)
            if data.pop("activation_aware"):
                if data.get("type_choice", "ex2_weighted") != "ex2_weighted":
                    raise ValueError("activation_aware (old name of type_choice: ex2_weighted) contradicts type_choice")
                data["type_choice"] = "ex2_weighted"
        return data

    @property
    def activation_aware(self) -> bool:
        """Whether this step reads calibration activations (E[x²]-weighted choice, AWQ or GPTQ)."""
        return self.method != "rtn" or self.type_choice == "ex2_weighted"


class QuantizeStep(Strict):
    quantize: QuantizeConfig


class DistillConfig(Strict):
    """Recovery training after prune/nas: blockwise local distillation (Puzzle's BLD) of every decoder layer
    against its dense parent (normalised MSE, AdamW, one layer at a time), then an optional global distillation
    (KL to the dense model's next-token distribution). Training windows come from ``data`` (any corpus source or
    mixture; sampled with seed + 1, so not the calibration windows); the dense parent is loaded again from
    ``model``."""

    data: str = "mix:calibration"
    samples: int = Field(32, ge=1, description="training windows")
    seq_len: int = Field(128, ge=8)
    batch_size: int = Field(4, ge=1, description="windows per step")
    inputs: Literal["dense", "compressed"] = Field(
        "dense", description="BLD student inputs: the dense parent's (Puzzle) or the compressed prefix's outputs"
    )
    steps: int = Field(16, ge=0, description="BLD AdamW steps per decoder layer (0 = no BLD)")
    lr: float = Field(1e-4, gt=0.0)
    train: Literal["all", "consumers", "lora"] = "all"
    lora_rank: int = Field(8, ge=1)
    weight_decay: float = Field(0.0, ge=0.0)
    global_steps: int = Field(0, ge=0, description="global KD steps after BLD (0 = none)")
    global_lr: float = Field(2e-5, gt=0.0)
    temperature: float = Field(1.0, gt=0.0)


class DistillStep(Strict):
    distill: DistillConfig


def _step_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return next(iter(value), None) if len(value) == 1 else None
    kinds: dict[type, str] = {PruneStep: "prune", QuantizeStep: "quantize", NasStep: "nas", DistillStep: "distill"}
    return kinds.get(type(value))


# each step is a one-key mapping, {"prune": {...}}, {"nas": {...}} or {"quantize": {...}}, dispatched on that key
Step = Annotated[
    Annotated[PruneStep, Tag("prune")]
    | Annotated[NasStep, Tag("nas")]
    | Annotated[QuantizeStep, Tag("quantize")]
    | Annotated[DistillStep, Tag("distill")],
    Discriminator(
        _step_kind, custom_error_type="step", custom_error_message="expected one key: prune, nas, distill or quantize"
    ),
]
