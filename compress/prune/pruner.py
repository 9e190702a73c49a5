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
    linear_shape,
    model_config,
    present_linears,
)
from compress.calibration import ChannelStats, LayerStats, calibrate_layerwise
from compress.prune.allocate import ModuleUnits, allocate, top_units
from compress.prune.scores import (
    fluctuation_scores,
    magnitude_scores,
    standardize,
    unit_scores,
    wanda_scores,
)
from compress.prune.surgery import remove_kv_groups, remove_mlp_channels
from compress.recipe import PruneConfig
from quant.errors import InputError
from quant.qlinear import QuantLinear

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


def explicit_widths(
    attn_keep: list[float], mlp_keep: list[float], n_kv: list[int], widths: list[int], mlp_step: int
) -> tuple[list[int], list[int]]:
    """Per-layer kept unit counts from keep fractions: round(f·G) whole KV groups; f·F channels rounded to a
    multiple of ``mlp_step`` (F itself when f = 1). A fraction > 0 keeps at least one unit (one step)."""
    groups = [0 if f == 0 else max(1, round(f * g)) for f, g in zip(attn_keep, n_kv, strict=True)]
    channels = []
    for f, width in zip(mlp_keep, widths, strict=True):
        if f >= 1.0:
            channels.append(width)
        elif f == 0:
            channels.append(0)
        else:
            channels.append(min(width, max(mlp_step, mlp_step * round(f * width / mlp_step))))
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
    the allocation of ``cfg.structure`` or the explicit per-layer fractions ``cfg.attn_keep`` / ``cfg.mlp_keep``."""
    layers = decoder_layers(model, arch)
    units = module_units(model, arch, cfg, stats)
    if cfg.attn_keep is None or cfg.mlp_keep is None:
        return allocate(
            cfg.structure or "AL-AM",
            [a for a, _ in units],
            [m for _, m in units],
            cfg.ratio,
            cfg.attn_ratio,
            cfg.min_units,
        )
    if len(cfg.attn_keep) != len(layers):
        raise InputError(
            f"prune.attn_keep / mlp_keep: expected {len(layers)} entries (one per decoder layer), "
            f"got {len(cfg.attn_keep)}"
        )
    if cfg.attn_keep[0] == 0:
        raise InputError(
            "prune.attn_keep.0: the first layer's attention cannot be removed (the KV cache's length "
            "is read from layer 0)"
        )
    groups, channels = explicit_widths(
        cfg.attn_keep,
        cfg.mlp_keep,
        [a.scores.numel() for a, _ in units],
        [m.scores.numel() for _, m in units],
        cfg.mlp_step,
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
    needs_stats = cfg.method != "magnitude-sp"
    stats: list[LayerStats] | list[None] = [None] * len(layers)
    if needs_stats:
        if dense_stats is not None:
            stats = dense_stats
        elif calibration_ids is None:
            raise ValueError(f"{cfg.method} needs calibration data")
        else:
            stats = collect_statistics(model, arch, calibration_ids, batch_size, device)
    attn_keep, mlp_keep = plan_masks(model, arch, cfg, stats)
    if cfg.statistics == "progressive" and needs_stats:
        _apply_progressive(model, arch, cfg, calibration_ids, layouts, attn_keep, mlp_keep, batch_size, device)
    else:
        apply_masks(model, arch, cfg, stats, attn_keep, mlp_keep)
    return {
        "method": cfg.method,
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


def _apply(
    layer: nn.Module,
    arch: Arch,
    cfg: PruneConfig,
    layout: AttentionLayout,
    stats: LayerStats | None,
    attn_keep: Tensor,
    mlp_keep: Tensor,
) -> None:
    compensate = bool(cfg.bias_compensation) and stats is not None
    remove_kv_groups(layer, arch, layout, attn_keep, stats[O].mean if compensate and stats else None)
    remove_mlp_channels(layer, arch, mlp_keep, stats[DOWN].mean if compensate and stats else None)


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


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once); a packed QuantLinear counts its logical weights."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.in_features * module.out_features + (module.bias.numel() if module.bias is not None else 0)
    return total


def prunable_parameters(model: nn.Module, arch: Arch) -> int:
    """Weights (and biases) of the attention and MLP linears of all decoder layers (+ constants of skipped
    sub-blocks are not counted: they are [hidden] vectors outside any linear)."""
    total = 0
    for layer in decoder_layers(model, arch):
        for path in present_linears(layer, arch):
            out_features, in_features, has_bias = linear_shape(layer, path)
            total += out_features * in_features + (out_features if has_bias else 0)
    return total
