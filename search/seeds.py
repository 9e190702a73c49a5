"""Known good points enqueued before the sampler proposes anything: uniform and FLAP-adaptive widths.

- ``uniform``: every layer keeps the same fraction 1 − ratio of its KV groups and MLP channels (FLAP's UL-UM).
- ``flap-adaptive``: the widths FLAP's global allocation (AL-AM) gives at ``ratio``. In a ``keep`` space they
  come from the session's allocation on the dense statistics; in a ``ratio``/``structure`` space the seed is
  simply ``structure: AL-AM``.
- ``puzzle``: the widths of the Puzzle-MIP choice at ``ratio`` (``compress.puzzle``: the replace-one-block
  library of the session's dense model, scored once and cached, and the exact integer program) in a ``keep`` space;
  the base prune step's ``puzzle`` settings (library grid, scores) apply when it has them.
- ``params``: any explicit point, e.g. the best trial of an earlier study.

Every searched parameter gets a value, so a seed is one definite candidate (no part of it is sampled).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Literal

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from pydantic import Field, model_validator

from compress.puzzle.config import PuzzleConfig
from compress.recipe import PruneStep, QuantizeStep, Recipe, Strict
from quant.errors import InputError
from search.space import ModelShape, SpaceConfig, block_label, first_step, layer_blocks

log = logging.getLogger("secateurs")

# ratio → (kept KV groups, kept MLP channels) per layer under FLAP's global allocation; None if unavailable
Allocation = Callable[[float], tuple[list[int], list[int]] | None]
# (ratio, library settings or None for the base recipe's) → the Puzzle-MIP choice's widths
PuzzleAllocation = Callable[[float, PuzzleConfig | None], tuple[list[int], list[int]]]


class SeedConfig(Strict):
    """One enqueued point: ``{kind: uniform, ratio: 0.2}``, ``{kind: flap-adaptive, ratio: 0.3, bits: 4}`` or
    ``{kind: params, params: {...}}``. ``ratio`` defaults to the base recipe's prune ratio."""

    kind: Literal["uniform", "flap-adaptive", "puzzle", "params"]
    ratio: float | None = Field(None, ge=0.0, lt=1.0)
    bits: Literal[3, 4, 8] | None = None
    params: dict[str, Any] | None = None
    puzzle: PuzzleConfig | None = Field(None, description="kind puzzle: library settings (default: the base's)")

    @model_validator(mode="after")
    def _params_iff_kind(self) -> SeedConfig:
        if (self.kind == "params") != (self.params is not None):
            raise ValueError("params is given exactly when kind is 'params'")
        return self

    def label(self, ratio: float) -> str:
        return "params" if self.kind == "params" else f"{self.kind} ratio={ratio:g}"


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5 + 1e-9)


def _clip(value: float, dist: BaseDistribution) -> Any:
    """``value`` moved onto the grid of a numeric distribution."""
    if isinstance(dist, IntDistribution):
        snapped = dist.low + _round_half_up((value - dist.low) / dist.step) * dist.step
        return int(min(max(snapped, dist.low), dist.high))
    if isinstance(dist, FloatDistribution):
        if dist.step is not None:
            value = dist.low + _round_half_up((value - dist.low) / dist.step) * dist.step
        return float(min(max(value, dist.low), dist.high))
    raise TypeError(type(dist).__name__)


def check_point(params: dict[str, Any], dists: dict[str, BaseDistribution], where: str) -> None:
    """Every name is a searched parameter and every value lies in its distribution."""
    for name, value in params.items():
        dist = dists.get(name)
        if dist is None:
            raise InputError(f"{where}: unknown parameter {name!r}; the space has {sorted(dists)}")
        if isinstance(dist, CategoricalDistribution):
            ok = value in dist.choices
        else:
            ok = isinstance(value, int | float) and dist.low <= value <= dist.high  # type: ignore[attr-defined]
        if not ok:
            raise InputError(f"{where}: {name}={value!r} lies outside {dist}")


def base_ratio(base: Recipe) -> float:
    prune = first_step(base, PruneStep)
    return prune.prune.ratio if prune is not None else 0.2


def seed_params(
    seed: SeedConfig,
    space: SpaceConfig,
    shape: ModelShape,
    dists: dict[str, BaseDistribution],
    base: Recipe,
    allocation: Allocation | None = None,
    puzzle: PuzzleAllocation | None = None,
) -> dict[str, Any] | None:
    """The full parameter point of ``seed``; None (with a log line) when it cannot be built in this space.
    ``allocation`` gives FLAP's widths at a ratio, ``puzzle`` the Puzzle-MIP's."""
    if seed.params is not None:
        return dict(seed.params)
    ratio = seed.ratio if seed.ratio is not None else base_ratio(base)
    params: dict[str, Any] = {}
    if "ratio" in dists:
        params["ratio"] = _clip(ratio, dists["ratio"])
    if seed.kind == "puzzle" and space.keep is None:
        log.warning("seed puzzle: needs a keep (per-layer widths) space; seed skipped")
        return None
    if "structure" in dists:
        wanted = "UL-UM" if seed.kind == "uniform" else "AL-AM"
        if wanted not in dists["structure"].choices:  # type: ignore[attr-defined]
            log.warning("seed %s: structure %s is not in search.space.structure; seed skipped", seed.kind, wanted)
            return None
        params["structure"] = wanted
    if space.keep is not None:
        if seed.kind == "puzzle":
            widths = puzzle(ratio, seed.puzzle) if puzzle is not None else None
        else:
            widths = _seed_widths(seed.kind, ratio, shape, allocation)
        if widths is None:
            log.warning("seed %s: the session offers no %s allocation; seed skipped", seed.kind, seed.kind)
            return None
        params.update(_block_widths(widths, shape, space, dists))
    if space.bits is not None:
        choices = space.bits.choices
        width = seed.bits if seed.bits is not None else (4 if 4 in choices else choices[0])
        if width not in choices:
            raise InputError(f"search.seeds: bits {width} is not in search.space.bits.choices {choices}")
        for layers in layer_blocks(shape.num_layers, space.bits.block):
            params[f"bits.{block_label(layers)}"] = width
        for name, dist in dists.items():
            if name.startswith("dtypes."):
                params[name] = dist.choices[0]  # type: ignore[attr-defined]
    if "group_size" in dists:
        quantize = first_step(base, QuantizeStep)
        current = quantize.quantize.group_size if quantize is not None else None
        choices = dists["group_size"].choices  # type: ignore[attr-defined]
        params["group_size"] = current if current in choices else choices[0]
    return params


def _seed_widths(
    kind: str, ratio: float, shape: ModelShape, allocation: Allocation | None
) -> tuple[list[int], list[int]] | None:
    if kind == "uniform":
        groups = round((1 - ratio) * shape.n_kv)
        channels = (1 - ratio) * shape.intermediate_size
        return [groups] * shape.num_layers, [round(channels)] * shape.num_layers
    return allocation(ratio) if allocation is not None else None


def _block_widths(
    widths: tuple[list[int], list[int]], shape: ModelShape, space: SpaceConfig, dists: dict[str, BaseDistribution]
) -> dict[str, Any]:
    """Per-layer kept groups/channels → block parameters (block mean, snapped; zero → skip where allowed)."""
    assert space.keep is not None
    groups, channels = widths
    params: dict[str, Any] = {}
    for layers in layer_blocks(shape.num_layers, space.keep.block):
        label = block_label(layers)
        for sub, values, key in (("attn", groups, "attn_groups"), ("mlp", channels, "mlp_channels")):
            mean = sum(values[i] for i in layers) / len(layers)
            skip_name = f"{sub}_skip.{label}"
            if skip_name in dists:
                params[skip_name] = mean == 0
            params[f"{key}.{label}"] = _clip(mean, dists[f"{key}.{label}"])
    return params
