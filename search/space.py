"""The search space: the recipe's ``search.space`` block → optuna distributions → an overlay on the base recipe.

Parameter names say what they set, so that a trial reads on its own (and in optuna-dashboard):

| name                      | distribution                   | sets in the recipe                                    |
|---------------------------|--------------------------------|-------------------------------------------------------|
| ``ratio``                 | float [low, high] (step)       | ``prune.ratio`` (global allocation)                   |
| ``structure``             | categorical AL-AM, UL-UM, ...  | ``prune.structure`` (FLAP mode)                       |
| ``kv_cache_ratio``        | float [low, high] (step)       | ``prune.puzzle.kv_cache_ratio`` (Puzzle budget)       |
| ``latency_ratio``         | float [low, high] (step)       | ``prune.puzzle.latency_ratio`` (Puzzle budget)        |
| ``attn_groups.L4-7``      | int, KV groups kept per layer  | ``prune.attn_groups[4..7]``                           |
| ``mlp_channels.L4-7``     | int, multiple of ``mlp_step``  | ``prune.mlp_channels[4..7]``                          |
| ``attn_skip.L20``         | categorical False/True         | ``prune.attn_groups[20] = 0`` (sub-block removed)     |
| ``bits.L4-7``             | categorical 3/4/8              | ``quantize.overrides`` for layers 4..7                |
| ``dtypes.4bit``           | categorical datatype sets      | which set the 4-bit layers use                        |
| ``group_size``            | categorical                    | ``quantize.group_size``                               |

``L4-7`` is a block of ``block`` consecutive decoder layers sharing one value (``L3`` when ``block`` is 1).
KV groups and MLP channels are integers so that two trials never differ only below the snapping of the surgery.
Skips are offered only from layer ``skip_from`` on, never for layer 0.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import Trial

from compress.recipe import PruneStep, QuantizeStep, Recipe, parse_recipe
from quant.errors import InputError
from search.space_config import BitsSpace, FloatRange, KeepSpace, SpaceConfig

__all__ = ["BitsSpace", "FloatRange", "KeepSpace", "ModelShape", "SpaceConfig", "distributions", "overlay", "suggest"]

StepT = TypeVar("StepT", PruneStep, QuantizeStep)
PUZZLE_BUDGETS = ("kv_cache_ratio", "latency_ratio")  # space fields that set prune.puzzle.<name>



@dataclass(frozen=True)
class ModelShape:
    """What the space needs to know of the dense model (stored with the study, so reports need no model)."""

    num_layers: int
    n_kv: int
    intermediate_size: int
    mlp_step: int = 32
    layers_prefix: str = "model.layers"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_blocks(num_layers: int, block: int) -> list[range]:
    """Consecutive blocks of ``block`` layers (the last one may be shorter)."""
    return [range(start, min(start + block, num_layers)) for start in range(0, num_layers, block)]


def block_label(layers: range) -> str:
    return f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-{layers[-1]}"


def kv_group_range(keep: KeepSpace, shape: ModelShape) -> tuple[int, int]:
    """Whole KV groups kept per layer: [ceil(low·n_kv) (≥ 1), floor(high·n_kv)]."""
    low = max(1, math.ceil(keep.attn.low * shape.n_kv - 1e-9))
    high = math.floor(keep.attn.high * shape.n_kv + 1e-9)
    if low > high:
        raise InputError(
            f"search.space.keep.attn: [{keep.attn.low}, {keep.attn.high}] holds no whole KV group of {shape.n_kv}"
        )
    return low, high


def mlp_channel_range(keep: KeepSpace, shape: ModelShape) -> tuple[int, int]:
    """MLP channels kept per layer: multiples of ``mlp_step`` in [low·F, high·F] (at least one step)."""
    step, width = shape.mlp_step, shape.intermediate_size
    low = max(step, math.ceil(keep.mlp.low * width / step - 1e-9) * step)
    high = math.floor(keep.mlp.high * width / step + 1e-9) * step
    if low > high:
        raise InputError(
            f"search.space.keep.mlp: [{keep.mlp.low}, {keep.mlp.high}] of {width} channels holds no multiple "
            f"of mlp_step={step}"
        )
    return low, high


def distributions(space: SpaceConfig, shape: ModelShape) -> dict[str, BaseDistribution]:
    """Parameter name → optuna distribution, in a stable order (the order trials suggest them)."""
    dists: dict[str, BaseDistribution] = {}
    if space.ratio is not None:
        dists["ratio"] = FloatDistribution(space.ratio.low, space.ratio.high, step=space.ratio.step)
    if space.structure is not None:
        dists["structure"] = CategoricalDistribution(space.structure)
    for name in PUZZLE_BUDGETS:
        budget = getattr(space, name)
        if budget is not None:
            dists[name] = FloatDistribution(max(budget.low, 1e-3), budget.high, step=budget.step)
    if space.keep is not None:
        dists.update(_keep_distributions(space.keep, shape))
    if space.bits is not None:
        bits = space.bits
        for layers in layer_blocks(shape.num_layers, bits.block):
            dists[f"bits.{block_label(layers)}"] = CategoricalDistribution(bits.choices)
        for width in bits.choices:
            if len(bits.datatypes[width]) > 1:
                dists[f"dtypes.{width}bit"] = CategoricalDistribution(bits.datatypes[width])
    if space.group_size is not None:
        dists["group_size"] = CategoricalDistribution(space.group_size)
    return dists


def _keep_distributions(keep: KeepSpace, shape: ModelShape) -> dict[str, BaseDistribution]:
    if keep.skip_from is not None and keep.skip_from >= shape.num_layers:
        raise InputError(f"search.space.keep.skip_from: {keep.skip_from} but the model has {shape.num_layers} layers")
    g_low, g_high = kv_group_range(keep, shape)
    c_low, c_high = mlp_channel_range(keep, shape)
    dists: dict[str, BaseDistribution] = {}
    for layers in layer_blocks(shape.num_layers, keep.block):
        label = block_label(layers)
        dists[f"attn_groups.{label}"] = IntDistribution(g_low, g_high)
        dists[f"mlp_channels.{label}"] = IntDistribution(c_low, c_high, step=shape.mlp_step)
        if keep.skip_from is not None and layers[0] >= keep.skip_from:
            for sub in keep.skip:
                dists[f"{sub}_skip.{label}"] = CategoricalDistribution([False, True])
    return dists


def suggest(trial: Trial, dists: dict[str, BaseDistribution]) -> dict[str, Any]:
    """Ask ``trial`` for every parameter (enqueued trials get their fixed values back)."""
    params: dict[str, Any] = {}
    for name, dist in dists.items():
        if isinstance(dist, FloatDistribution):
            params[name] = trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
        elif isinstance(dist, IntDistribution):
            params[name] = trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
        elif isinstance(dist, CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, dist.choices)  # type: ignore[call-overload]
        else:
            raise TypeError(f"unsupported distribution {type(dist).__name__} for {name}")
    return params


def first_step(recipe: Recipe, kind: type[StepT]) -> StepT | None:
    """The first step of type ``kind`` (PruneStep, QuantizeStep) of a recipe."""
    return next((step for step in recipe.steps if isinstance(step, kind)), None)


def check_base(space: SpaceConfig, base: Recipe) -> None:
    """The base recipe must have the steps the space overlays."""
    if space.prunes and first_step(base, PruneStep) is None:
        raise InputError("search.space: prunes (ratio/structure/keep) but the recipe has no prune step to overlay")
    prune = first_step(base, PruneStep)
    if any(getattr(space, n) is not None for n in PUZZLE_BUDGETS) and (
        prune is None or prune.prune.structure != "puzzle"
    ):
        raise InputError("search.space: kv_cache_ratio / latency_ratio are Puzzle budgets: the base prune step needs "
                         "structure: puzzle")  # fmt: skip
    if space.quantizes and first_step(base, QuantizeStep) is None:
        raise InputError("search.space: quantizes (bits/group_size) but the recipe has no quantize step to overlay")


def _per_layer(params: dict[str, Any], key: str, num_layers: int) -> dict[int, Any]:
    """{layer: value} from the block parameters ``key.L<a>[-<b>]`` present in ``params``."""
    out: dict[int, Any] = {}
    pattern = re.compile(rf"^{re.escape(key)}\.L(\d+)(?:-(\d+))?$")
    for name, value in params.items():
        match = pattern.match(name)
        if match:
            first = int(match.group(1))
            last = int(match.group(2) or first)
            for layer in range(first, min(last, num_layers - 1) + 1):
                out[layer] = value
    return out


def keep_counts(params: dict[str, Any], shape: ModelShape) -> tuple[list[int], list[int]] | None:
    """(prune.attn_groups, prune.mlp_channels): kept units per layer from the width parameters (0 where a
    sub-block is skipped); None when the trial has none."""
    groups = _per_layer(params, "attn_groups", shape.num_layers)
    channels = _per_layer(params, "mlp_channels", shape.num_layers)
    if not groups and not channels:
        return None
    attn_skip = _per_layer(params, "attn_skip", shape.num_layers)
    mlp_skip = _per_layer(params, "mlp_skip", shape.num_layers)
    attn = [0 if attn_skip.get(i) else int(groups.get(i, shape.n_kv)) for i in range(shape.num_layers)]
    mlp = [
        0 if mlp_skip.get(i) else int(channels.get(i, shape.intermediate_size)) for i in range(shape.num_layers)
    ]
    return attn, mlp


def bit_overrides(params: dict[str, Any], shape: ModelShape, bits_space: BitsSpace) -> list[dict[str, Any]]:
    """Quantize overrides realising the per-layer bits: one override per datatype set, listing its layers."""
    per_layer = _per_layer(params, "bits", shape.num_layers)
    by_set: dict[str, list[int]] = {}
    for layer in range(shape.num_layers):
        if layer in per_layer:
            width = int(per_layer[layer])
            name = params.get(f"dtypes.{width}bit", bits_space.datatypes[width][0])
            by_set.setdefault(name, []).append(layer)
    prefix = re.escape(shape.layers_prefix)
    return [
        {"match": rf"^{prefix}\.({'|'.join(str(i) for i in layers)})\.", "dtypes": name}
        for name, layers in by_set.items()
    ]


def overlay(
    base: Recipe, params: dict[str, Any], space: SpaceConfig, shape: ModelShape, where: str = "trial"
) -> Recipe:
    """The recipe of one trial: ``base`` with ``params`` written into its first prune / quantize step (validated;
    an InputError names ``where``).

    Pure: ``base`` is not modified. Per-layer bit overrides come *before* the base recipe's own overrides, so the
    searched width wins (the first matching override applies).
    """
    data = base.model_dump(mode="json")
    kinds = [next(iter(step)) for step in data["steps"]]
    prune_at = kinds.index("prune") if "prune" in kinds else None
    quant_at = kinds.index("quantize") if "quantize" in kinds else None
    if prune_at is not None:
        prune = data["steps"][prune_at]["prune"]
        if "ratio" in params:
            prune["ratio"] = float(params["ratio"])
        if "structure" in params:
            prune["structure"] = params["structure"]
        for name in PUZZLE_BUDGETS:
            if name in params:
                prune["puzzle"] = {**(prune.get("puzzle") or {}), name: float(params[name])}
        counts = keep_counts(params, shape)
        if counts is not None:
            prune["attn_keep"], prune["mlp_keep"] = None, None
            prune["attn_groups"], prune["mlp_channels"] = counts
    if quant_at is not None:
        quantize = data["steps"][quant_at]["quantize"]
        if "group_size" in params:
            quantize["group_size"] = int(params["group_size"])
        if space.bits is not None:
            quantize["overrides"] = bit_overrides(params, shape, space.bits) + list(quantize.get("overrides") or [])
    return parse_recipe(data, where)


def summarize(params: dict[str, Any], shape: ModelShape) -> str:
    """A one-line description of a trial's parameters for tables, e.g. ``attn 0.78 mlp 0.64 skip 2 | 4b×20 8b×10``."""
    parts = []
    if "ratio" in params:
        parts.append(f"ratio {params['ratio']:.3g}")
    if "structure" in params:
        parts.append(str(params["structure"]))
    parts += [f"{name.split('_')[0]}≤{params[name]:.3g}" for name in PUZZLE_BUDGETS if name in params]
    counts = keep_counts(params, shape)
    if counts is not None:
        attn, mlp = counts
        skipped = sum(a == 0 for a in attn) + sum(m == 0 for m in mlp)
        kept_attn = sum(attn) / (shape.n_kv * len(attn))
        parts.append(f"attn {kept_attn:.2f} mlp {sum(mlp) / (shape.intermediate_size * len(mlp)):.2f}")
        if skipped:
            parts.append(f"skip {skipped}")
    widths = _per_layer(params, "bits", shape.num_layers)
    if widths:
        layers = {w: list(widths.values()).count(w) for w in sorted(set(widths.values()))}
        parts.append(" ".join(f"{w}b×{n}" for w, n in layers.items()))
    parts += [f"{k.split('.')[1]}={v}" for k, v in params.items() if k.startswith("dtypes.")]
    if "group_size" in params:
        parts.append(f"g{params['group_size']}")
    return " ".join(parts)
