"""Structured pruning step: calibration statistics → scores → allocation → surgery.

Glue only: the math lives in ``scores.py`` and ``allocate.py``, the module edits in ``surgery.py``, the
layer-by-layer statistics in ``compress.calibration``.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor, nn

from compress.adapters import (
    SUB_BLOCKS,
    Arch,
    AttentionLayout,
    attention_layout,
    decoder_layers,
    is_skipped,
    linear_at,
    model_config,
    present_linears,
)
from compress.calibration import ChannelStats, LayerStats, calibrate_layerwise
from compress.metrics import count_parameters, prunable_parameters  # re-exported: they lived here
from compress.prune.allocate import ModuleUnits, allocate, snap_width, top_units
from compress.prune.scores import (
    fluctuation_scores,
    magnitude_scores,
    standardize,
    unit_scores,
    wanda_scores,
)
from compress.prune.surgery import remove_kv_groups, remove_mlp_channels
from compress.recipe import PruneConfig
from compress.recover.least_squares import RIDGE_GRID
from compress.recover.reconstruct import reconstruct_model
from quant.errors import InputError

__all__ = ["collect_statistics", "count_parameters", "plan_masks", "prunable_parameters", "prune_model"]

log = logging.getLogger("secateurs")

O, DOWN = "o", "down"


def channel_scores(cfg: PruneConfig, weight: Tensor, stats: ChannelStats | None, attention: bool) -> Tensor:
    """Standardised channel scores [C] of o_proj (attention=True) or down_proj inputs for ``cfg.method``."""
    if cfg.method == "magnitude-sp":
        raw = magnitude_scores(weight)
    else:
        assert stats is not None, "activation statistics are required"
        if cfg.method == "wanda-sp":
            raw = wanda_scores(weight, stats.sq_norm)
        else:
            raw = fluctuation_scores(cfg.metric, weight, stats.variance, stats.mean_sq)
            if attention and cfg.square_attention_scores:
                raw = raw**2  # the FLAP reference squares the attention metric once more (lib/prune.py)
    return standardize(raw)


def _module_units(
    cfg: PruneConfig,
    layer: nn.Module,
    arch: Arch,
    layout: AttentionLayout,
    stats: LayerStats | None,
    hidden: int,
) -> tuple[ModuleUnits, ModuleUnits]:
    o_w = linear_at(layer, arch.o).weight
    down_w = linear_at(layer, arch.down).weight
    attn = channel_scores(cfg, o_w, stats[O] if stats else None, attention=True)
    mlp = channel_scores(cfg, down_w, stats[DOWN] if stats else None, attention=False)
    attn_cost = hidden * layout.head_dim * (2 * layout.group + 2)
    return ModuleUnits(unit_scores(attn, layout.n_kv), attn_cost), ModuleUnits(mlp, 3 * hidden)


def _watch(arch: Arch) -> Any:
    """The output linears (o_proj, down_proj) whose inputs give the scores; none of a skipped sub-block."""

    def watch(_index: int, layer: nn.Module) -> dict[str, nn.Linear]:
        present = present_linears(layer, arch)
        return {key: linear_at(layer, path) for key, path in ((O, arch.o), (DOWN, arch.down)) if path in present}

    return watch


def collect_statistics(
    model: nn.Module, arch: Arch, calibration_ids: Tensor, batch_size: int = 8, device: str | None = None
) -> list[LayerStats]:
    """Dense-model statistics of the o_proj and down_proj inputs of every layer (one layer at a time)."""
    return calibrate_layerwise(model, arch, calibration_ids, _watch(arch), None, batch_size, device, "statistics")


def needs_statistics(cfg: PruneConfig) -> bool:
    """Activation statistics are needed for the scores (FLAP, Wanda-sp) or for the compensation means."""
    return cfg.method != "magnitude-sp" or bool(cfg.bias_compensation)


def explicit_widths(
    cfg: PruneConfig, n_kv: list[int], widths: list[int]
) -> tuple[list[int], list[int]]:
    """Per-layer kept unit counts of a config with explicit widths.

    Counts (``attn_groups`` / ``mlp_channels``) are used as given (checked against the layer). Fractions: round(f·G)
    whole KV groups and :func:`snap_width` (f·F) channels (F itself when f = 1); a fraction > 0 keeps ≥ one unit."""
    if cfg.attn_groups is not None and cfg.mlp_channels is not None:
        groups, channels = list(cfg.attn_groups), list(cfg.mlp_channels)
        for field, counts, full in (("attn_groups", groups, n_kv), ("mlp_channels", channels, widths)):
            for layer, (k, n) in enumerate(zip(counts, full, strict=True)):
                if k > n:
                    raise InputError(f"prune.{field}.{layer}: {k} but the layer has {n}")
        return groups, channels
    assert cfg.attn_keep is not None and cfg.mlp_keep is not None
    groups = [0 if f == 0 else max(1, round(f * g)) for f, g in zip(cfg.attn_keep, n_kv, strict=True)]
    channels = [
        full if f >= 1.0 else 0 if f == 0 else snap_width(f * full, full, cfg.mlp_step)
        for f, full in zip(cfg.mlp_keep, widths, strict=True)
    ]
    return groups, channels


def module_units(
    model: nn.Module, arch: Arch, cfg: PruneConfig, stats: list[LayerStats] | list[None]
) -> list[tuple[ModuleUnits, ModuleUnits]]:
    """Per layer: (attention KV-group units, MLP channel units) with standardised scores of ``cfg.method``."""
    config = model_config(model)
    hidden = int(config.hidden_size)
    return [
        _module_units(cfg, layer, arch, attention_layout(config, layer, arch), st, hidden)
        for layer, st in zip(decoder_layers(model, arch), stats, strict=True)
    ]


def plan_masks(
    model: nn.Module,
    arch: Arch,
    cfg: PruneConfig,
    stats: list[LayerStats] | list[None],
) -> tuple[list[Tensor], list[Tensor]]:
    """Keep-masks (per layer: [n_kv] bool for attention, [F] bool for the MLP) from the method's scores and either
    the allocation of ``cfg.structure`` or the explicit per-layer widths (fractions or counts)."""
    return masks_from_units(module_units(model, arch, cfg, stats), cfg)


def masks_from_units(
    units: list[tuple[ModuleUnits, ModuleUnits]], cfg: PruneConfig
) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`plan_masks` from per-layer units already scored (a streamed model scores each layer when it is
    materialised)."""
    structure = cfg.structure or "AL-AM"
    if structure == "puzzle":
        raise InputError("prune.structure: puzzle widths come from compress.puzzle (the prune step), not plan_masks")
    if not cfg.explicit:
        return allocate(
            structure,
            [a for a, _ in units],
            [m for _, m in units],
            cfg.ratio,
            cfg.attn_ratio,
            cfg.min_units,
            cfg.uniform_rounding or "nearest",
        )
    given = len(cfg.attn_keep if cfg.attn_keep is not None else cfg.attn_groups or [])
    names = "attn_keep / mlp_keep" if cfg.attn_keep is not None else "attn_groups / mlp_channels"
    if given != len(units):
        raise InputError(f"prune.{names}: expected {len(units)} entries (one per decoder layer), got {given}")
    groups, channels = explicit_widths(
        cfg, [a.scores.numel() for a, _ in units], [m.scores.numel() for _, m in units]
    )
    if groups[0] == 0:
        field = "attn_keep" if cfg.attn_keep is not None else "attn_groups"
        raise InputError(
            f"prune.{field}.0: the first layer's attention cannot be removed (the KV cache's length "
            "is read from layer 0)"
        )
    attn = [top_units(a.scores, k) for (a, _), k in zip(units, groups, strict=True)]
    mlp = [top_units(m.scores, k) for (_, m), k in zip(units, channels, strict=True)]
    return attn, mlp


def prune_model(
    model: nn.Module,
    arch: Arch,
    cfg: PruneConfig,
    calibration_ids: Tensor | None,
    batch_size: int = 8,
    device: str | None = None,
    dense_stats: list[LayerStats] | None = None,
) -> dict[str, Any]:
    """Prune ``model`` in place; return a summary (per-layer kept KV groups and MLP widths) for provenance.

    ``dense_stats`` (from :func:`collect_statistics` on this same dense model) skips the statistics pass, e.g.
    when one calibration serves several ratios or many search candidates.
    """
    layers = decoder_layers(model, arch)
    layouts = [attention_layout(model_config(model), layer, arch) for layer in layers]
    if any(is_skipped(layer, arch, name) for layer in layers for name in SUB_BLOCKS):
        raise InputError("prune: the model already has removed sub-blocks; prune it in a single prune/nas step")
    needs_stats = needs_statistics(cfg)
    stats: list[LayerStats] | list[None] = [None] * len(layers)
    if needs_stats:
        if dense_stats is not None:
            stats = dense_stats
        elif calibration_ids is None:
            raise ValueError(f"{cfg.method} needs calibration data")
        else:
            stats = collect_statistics(model, arch, calibration_ids, batch_size, device)
    attn_keep, mlp_keep = plan_masks(model, arch, cfg, stats)
    if cfg.reconstruct == "least_squares":
        if cfg.statistics == "progressive":
            raise InputError("prune.reconstruct: least_squares needs statistics: dense (it corrects the prefix itself)")
        if calibration_ids is None:
            raise ValueError("least-squares reconstruction needs calibration data")
        residuals = reconstruct_model(
            model, arch, calibration_ids, attn_keep, mlp_keep, RIDGE_GRID if cfg.ridge is None else cfg.ridge, stats,
            batch_size, device, linear_rank=cfg.replacement_rank if cfg.replacement == "linear" else None,
        )
        return {"method": cfg.method, **mask_summary(attn_keep, mlp_keep), "refit_residual": residuals}
    if cfg.statistics == "progressive" and needs_stats:
        _apply_progressive(model, arch, cfg, calibration_ids, layouts, attn_keep, mlp_keep, batch_size, device)
    else:
        apply_masks(model, arch, cfg, stats, attn_keep, mlp_keep)
    return {"method": cfg.method, **mask_summary(attn_keep, mlp_keep)}


def mask_summary(attn_keep: list[Tensor], mlp_keep: list[Tensor]) -> dict[str, Any]:
    """Provenance of keep-masks: kept KV groups and MLP widths per layer, and the removed sub-blocks."""
    return {
        "kv_groups": [int(k.sum()) for k in attn_keep],
        "intermediate_sizes": [int(k.sum()) for k in mlp_keep],
        "skipped": [
            [n for n, k in (("attn", a), ("mlp", m)) if not bool(k.any())]
            for a, m in zip(attn_keep, mlp_keep, strict=True)
        ],
    }


def apply_masks(
    model: nn.Module,
    arch: Arch,
    cfg: PruneConfig,
    stats: list[LayerStats] | list[None],
    attn_keep: list[Tensor],
    mlp_keep: list[Tensor],
) -> None:
    """Surgery on every layer with the given keep-masks (and dense-statistics compensation when configured)."""
    layers = decoder_layers(model, arch)
    config = model_config(model)
    for layer, st, a_keep, m_keep in zip(layers, stats, attn_keep, mlp_keep, strict=True):
        _apply(layer, arch, cfg, attention_layout(config, layer, arch), st, a_keep, m_keep)


def consumer_refit(cfg: PruneConfig, stats: LayerStats | None) -> tuple[Tensor | None, Tensor | None]:
    """The consumer-refit point: what replaces the removed inputs of o_proj and down_proj.

    Today FLAP's bias compensation (eq. 9): the mean inputs x̄ ([H·d_h] and [F]) that surgery folds into the
    consumers' biases, b ← b + W[:, P]·x̄[P]; (None, None) when compensation is off."""
    if not cfg.bias_compensation:
        return None, None
    if stats is None:
        raise ValueError("bias compensation needs activation statistics")
    return stats[O].mean, stats[DOWN].mean


def _apply(
    layer: nn.Module,
    arch: Arch,
    cfg: PruneConfig,
    layout: AttentionLayout,
    stats: LayerStats | None,
    attn_keep: Tensor,
    mlp_keep: Tensor,
) -> None:
    o_mean, down_mean = consumer_refit(cfg, stats)
    remove_kv_groups(layer, arch, layout, attn_keep, o_mean)
    remove_mlp_channels(layer, arch, mlp_keep, down_mean)


def _apply_progressive(
    model: nn.Module,
    arch: Arch,
    cfg: PruneConfig,
    calibration_ids: Tensor | None,
    layouts: list[AttentionLayout],
    attn_keep: list[Tensor],
    mlp_keep: list[Tensor],
    batch_size: int,
    device: str | None,
) -> None:
    """Widths from the dense allocation; which units, and the compensation means, from statistics of the inputs
    that the already-pruned earlier layers produce (re-calibration layer by layer)."""
    hidden = int(model_config(model).hidden_size)

    def prune_layer(index: int, layer: nn.Module, stats: LayerStats) -> bool:
        attn_units, mlp_units = _module_units(cfg, layer, arch, layouts[index], stats, hidden)
        a_keep = top_units(attn_units.scores, int(attn_keep[index].sum()))
        m_keep = top_units(mlp_units.scores, int(mlp_keep[index].sum()))
        _apply(layer, arch, cfg, layouts[index], stats, a_keep, m_keep)
        return True

    assert calibration_ids is not None
    calibrate_layerwise(model, arch, calibration_ids, _watch(arch), prune_layer, batch_size, device, "progressive")

