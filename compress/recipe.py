"""Recipes: YAML → pydantic models (``extra="forbid"``: a typo is an error naming the field).

A recipe is data: which model, which calibration data, which steps, where to write, how to evaluate. It is stored
verbatim (after validation, with defaults filled in) in every checkpoint it produces.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from compress.errors import one_line, shown
from compress.puzzle.config import PuzzleConfig
from quant.errors import InputError

MAX_COUNT = 2**20  # upper bound of sample/window/batch/length counts: larger ones only exhaust memory
MAX_SEED = 2**32 - 1  # numpy's seed range (lm-eval seeds numpy with it)
MAX_DEPTH = 32  # nesting levels a recipe file may have (the deepest valid recipe has under 10)
MAX_VALUES = 100_000  # values a recipe may expand to through YAML aliases


class Strict(BaseModel):
    # strict: YAML gives typed scalars, so no coercion (a bool is not an int, "4" is not a number, 4.0 not a count)
    model_config = ConfigDict(extra="forbid", strict=True)


def compiled_regex(value: str) -> str:
    """``value`` itself when it compiles as a Python regular expression; ValueError naming the problem otherwise."""
    try:
        re.compile(value)
    except re.error as err:
        raise ValueError(f"not a valid regular expression: {err.msg} at position {err.pos}") from None
    return value


def task_names(values: list[str]) -> list[str]:
    """lm-eval task names, never paths: a task folder runs code (``compress.lm_tasks``)."""
    from compress.lm_tasks import task_name

    for value in values:
        try:
            task_name(value)
        except ValueError as err:
            raise ValueError(f"{shown(value)}: {err}") from None
    return values


def available_device(value: str) -> str:
    """``value`` when torch can run on it here ("cpu", "cuda", "cuda:N", "mps"); ValueError otherwise."""
    if value == "cpu":
        return value  # no torch import for the common case: validation stays fast
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError("not a torch device; expected 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"not available here ({count} CUDA device(s) visible)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("MPS is not available here")
    elif device.type != "cpu":
        raise ValueError("unsupported device type; expected 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return value


class CalibrationConfig(Strict):
    """n windows × seq_len tokens drawn (seeded) from ``data``: "web:calibration" or a .txt/.jsonl path."""

    data: str = "web:calibration"
    samples: int = Field(128, ge=1, le=MAX_COUNT)
    seq_len: int = Field(128, ge=8, le=MAX_COUNT)
    batch_size: int = Field(8, ge=1, le=MAX_COUNT)


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


class PerplexityConfig(Strict):
    """Held-out perplexity over non-overlapping windows of ``data``."""

    data: str = "web:eval"
    seq_len: int = Field(256, ge=8, le=MAX_COUNT)
    max_windows: int | None = Field(64, ge=1, le=MAX_COUNT)
    batch_size: int = Field(8, ge=1, le=MAX_COUNT)


class LmEvalConfig(Strict):
    """lm-evaluation-harness tasks: the shipped offline tasks or any task name lm-eval knows."""

    tasks: list[str] = Field(default_factory=lambda: ["secateurs_web_ppl", "secateurs_web_mc"])
    _names = field_validator("tasks")(classmethod(lambda cls, v: task_names(v)))
    limit: int | None = Field(None, ge=1, le=MAX_COUNT)
    batch_size: int = Field(8, ge=1, le=MAX_COUNT)
    max_length: int = Field(512, ge=16, le=MAX_COUNT)


class EvaluationConfig(Strict):
    perplexity: PerplexityConfig | None = Field(default_factory=PerplexityConfig)
    lm_eval: LmEvalConfig | None = Field(default_factory=LmEvalConfig)
    dense_baseline: bool = True


class OutputConfig(Strict):
    dir: str = "out/model"
    overwrite: bool = False
    push_to_hub: str | None = None


class Recipe(Strict):
    model: str = "default"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    _device = field_validator("device")(classmethod(lambda cls, v: available_device(v)))
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    steps: list[Step] = Field(default_factory=list)
    output: OutputConfig = Field(default_factory=OutputConfig)
    evaluation: EvaluationConfig | None = Field(default_factory=EvaluationConfig)

    @model_validator(mode="after")
    def _prune_before_quantize(self) -> Recipe:
        quantized = False
        for index, step in enumerate(self.steps):
            if isinstance(step, QuantizeStep):
                quantized = True
            elif quantized:
                raise ValueError(f"steps.{index}: prune and nas steps must come before quantize steps")
        return self


def _format_error(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    loc = [p for i, p in enumerate(loc) if i == 0 or p != loc[i - 1]]  # drop the union tag ("prune.prune")
    where = one_line(".".join(loc), 120) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"{origin}: unknown key '{where}'"
    given = first.get("input")
    quoted = "" if isinstance(given, dict | list) else f" (got {shown(given)})"
    return f"{origin}: field '{where}': {one_line(first['msg']).removeprefix('Value error, ')}{quoted}"


format_error = _format_error  # public: search.config formats its search: block's errors the same way


def parse_recipe(data: Any, origin: str = "recipe") -> Recipe:
    """Validate a recipe dict; errors name the field (dotted path) and what was expected."""
    if not isinstance(data, dict):
        raise InputError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    check_shape(data, origin)
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise InputError(_format_error(err, origin)) from None


def load_recipe_dict(path: str | Path) -> dict[str, Any]:
    """Read a recipe file: UTF-8 YAML holding one mapping, no duplicate keys, bounded in size and depth."""
    path = Path(path)
    where = f"recipe file {shown(str(path))}"
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise InputError(f"{where} cannot be read: {err.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise InputError(f"{where} is larger than {MAX_FILE_BYTES:,} bytes: not a recipe")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{where} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    data = load_yaml(text, where)
    if data is None:
        raise InputError(f"{where} is empty: a recipe needs at least `model:` (e.g. `model: default`)")
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping (key: value lines) at the top level, got {type(data).__name__}")
    check_shape(data, where)
    return data


MAX_FILE_BYTES = 1 << 20


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a repeated key is an error (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:
                continue  # unhashable key: the base class reports it
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {shown(key)} (first given on line {first})", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, where: str) -> Any:
    """Parse YAML with :class:`RecipeLoader`; any problem is one InputError line with its line number."""
    try:
        return yaml.load(text, Loader=RecipeLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise InputError(f"{where} is not valid YAML: {one_line(err.problem or err.context)}{at}") from None
    except yaml.reader.ReaderError as err:
        raise InputError(
            f"{where} is not valid YAML: character #x{err.character:04x} at offset {err.position}"
        ) from None
    except yaml.YAMLError as err:
        raise InputError(f"{where} is not valid YAML: {one_line(err)}") from None
    except RecursionError:
        raise InputError(f"{where} is nested too deeply (more than {MAX_DEPTH} levels)") from None
    except ValueError as err:  # e.g. an integer past Python's 4300-digit limit
        raise InputError(f"{where} holds a value that cannot be read: {one_line(err, 80)}") from None


def check_shape(data: Any, where: str) -> None:
    """Reject recipes nested deeper than MAX_DEPTH, expanding (through aliases) past MAX_VALUES, or recursive.

    Shared sub-trees (YAML aliases) are measured once, so this takes time linear in the file, not in its expansion.
    """
    measured: dict[int, tuple[int, int]] = {}  # id → (values, height); (-1, -1) while being measured

    def measure(node: Any, depth: int) -> tuple[int, int]:
        if not isinstance(node, dict | list):
            return 1, 0
        if depth > MAX_DEPTH:
            raise InputError(f"{where} is nested too deeply (more than {MAX_DEPTH} levels)")
        known = measured.get(id(node))
        if known == (-1, -1):
            raise InputError(f"{where} contains a recursive alias (a value that contains itself)")
        if known is None:
            measured[id(node)] = (-1, -1)
            values, height = 1, 0
            for child in node.values() if isinstance(node, dict) else node:
                n, h = measure(child, depth + 1)
                values, height = values + n, max(height, h + 1)
                if values > MAX_VALUES:
                    raise InputError(f"{where} expands to more than {MAX_VALUES:,} values (through YAML aliases?)")
            known = measured[id(node)] = (values, height)
        if depth + known[1] > MAX_DEPTH:
            raise InputError(f"{where} is nested too deeply (more than {MAX_DEPTH} levels)")
        return known

    measure(data, 0)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key.path=value`` overrides (value parsed as YAML). List items by index: ``steps.0.prune.ratio=0.3``."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set {shown(item)}: expected key.path=value")
        value = load_yaml(raw, f"--set {shown(item)}: value")
        check_shape(value, f"--set {shown(item)}: value")
        node: Any = data
        parts = key.split(".")
        try:
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            if isinstance(node, list):
                node[int(parts[-1])] = value
            else:
                node[parts[-1]] = value
        except (ValueError, IndexError, AttributeError, TypeError):
            raise InputError(f"--set {shown(item)}: no such place in the recipe ({shown(key)})") from None
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    return parse_recipe(apply_overrides(load_recipe_dict(path), overrides or []), origin=str(path))
