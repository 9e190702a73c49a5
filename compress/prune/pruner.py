"""Structured pruning step: calibration statistics → scores → allocation → surgery.

Glue only: the math lives in ``scores.py`` and ``allocate.py``, the module edits in ``surgery.py``, the
layer-by-layer statistics in ``compress.calibration``.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor, nn

from compress.adapters import (
    Arch,
    AttentionLayout,
    attention_layout,
    decoder_layers,
    linear_at,
    linear_shape,
    model_config,
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
    return lambda _i, layer: {O: linear_at(layer, arch.o), DOWN: linear_at(layer, arch.down)}


def collect_statistics(
    model: nn.Module, arch: Arch, calibration_ids: Tensor, batch_size: int = 8, device: str | None = None
) -> list[LayerStats]:
    """Dense-model statistics of the o_proj and down_proj inputs of every layer (one layer at a time)."""
    return calibrate_layerwise(model, arch, calibration_ids, _watch(arch), None, batch_size, device, "statistics")


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
    when one calibration serves several ratios.
    """
    layers = decoder_layers(model, arch)
    config = model_config(model)
    hidden = int(config.hidden_size)
    layouts = [attention_layout(config, layer, arch) for layer in layers]
    needs_stats = cfg.method != "magnitude-sp"
    stats: list[LayerStats] | list[None] = [None] * len(layers)
    if needs_stats:
        if dense_stats is not None:
            stats = dense_stats
        elif calibration_ids is None:
            raise ValueError(f"{cfg.method} needs calibration data")
        else:
            stats = collect_statistics(model, arch, calibration_ids, batch_size, device)
    units = [
        _module_units(cfg, layer, arch, lay, st, hidden) for layer, lay, st in zip(layers, layouts, stats, strict=True)
    ]
    attn_keep, mlp_keep = allocate(
        cfg.structure or "AL-AM",
        [a for a, _ in units],
        [m for _, m in units],
        cfg.ratio,
        cfg.attn_ratio,
        cfg.min_units,
    )
    if cfg.statistics == "progressive" and needs_stats:
        _apply_progressive(model, arch, cfg, calibration_ids, layouts, attn_keep, mlp_keep, batch_size, device)
    else:
        for layer, layout, st, a_keep, m_keep in zip(layers, layouts, stats, attn_keep, mlp_keep, strict=True):
            _apply(layer, arch, cfg, layout, st, a_keep, m_keep)
    return {
        "method": cfg.method,
        "kv_groups": [int(k.sum()) for k in attn_keep],
        "intermediate_sizes": [int(k.sum()) for k in mlp_keep],
    }


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
    """Weights (and biases) of the attention and MLP linears of all decoder layers."""
    total = 0
    for layer in decoder_layers(model, arch):
        for path in arch.linears:
            out_features, in_features, has_bias = linear_shape(layer, path)
            total += out_features * in_features + (out_features if has_bias else 0)
    return total
