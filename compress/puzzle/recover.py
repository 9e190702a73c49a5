"""Least-squares reconstruction of a Puzzle choice (``structure: puzzle`` with ``reconstruct: least_squares``).

The chosen architecture is realised layer by layer through the recovery issue's paired calibration pass
(:func:`compress.calibration.calibrate_paired`, the same walk as FLAP's ``reconstruct: least_squares``): layer i is
still dense when visited, its dense outputs on the dense stream are the targets, and the kept consumers
(o_proj / down_proj) of its narrowed sub-blocks are refitted by ridge least squares on the *compressed* stream
(:func:`compress.recover.reconstruct.reconstruct_layer`). Per sub-block variant:

- fewer KV groups / MLP channels: the FLAP units the library scored (top-k WIFV), the consumer refitted;
- the parent (all units): untouched (as in the library, no compensation bias);
- no-op: FLAP's constant (the mean dense output), nothing to refit;
- linear replacement: a ridge least-squares map of the sub-block's input on the compressed stream to its dense
  output (:func:`compress.recover.reconstruct.replace_linear`; the library fitted it on the parent's stream).

So parameter counts are the library's (a refitted consumer carries the bias that compensation would add).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from compress.adapters import Arch, AttentionLayout, attention_layout, linear_at, model_config
from compress.calibration import LayerInputs, LayerStats, calibrate_paired, run_layer
from compress.prune.allocate import ModuleUnits, top_units
from compress.prune.surgery import remove_kv_groups, remove_mlp_channels
from compress.puzzle.library import KINDS, Variant
from compress.recover.reconstruct import reconstruct_layer, replace_linear
from quant.errors import InputError

log = logging.getLogger("secateurs")


def keep_masks(units: tuple[ModuleUnits, ModuleUnits], attn: Variant, mlp: Variant) -> tuple[Tensor, Tensor]:
    """Keep-masks ([n_kv], [F] bool) of one layer's chosen variants: the top-k FLAP units the library realised
    (none for a no-op or a linear replacement)."""
    return top_units(units[0].scores, attn.units), top_units(units[1].scores, mlp.units)


@torch.no_grad()
def _replace_both(
    layer: nn.Module,
    arch: Arch,
    layout: AttentionLayout,
    pair: tuple[Variant, Variant],
    dense_in: LayerInputs,
    compressed_in: LayerInputs,
    alphas: list[float],
    means: tuple[Tensor, Tensor],
    where: tuple[Any, int],
    every: int,
) -> tuple[list[Tensor], list[Tensor], dict[str, dict[str, float]]]:
    """A layer whose two sub-blocks are both removed, one as a no-op and one as a linear replacement (which
    :func:`reconstruct_layer` cannot mix): no consumer to refit; the linear map is fitted on the compressed
    stream after the attention sub-block is replaced."""
    targets: dict[str, list[Tensor]] = {"attn": [], "mlp": []}
    handles = [
        linear_at(layer, path).register_forward_hook(lambda _m, _a, out, k=kind: targets[k].append(out.detach()))
        for kind, path in (("attn", arch.o), ("mlp", arch.down))
    ]
    try:
        dense_out = run_layer(layer, dense_in)
    finally:
        for h in handles:
            h.remove()
    errors: dict[str, dict[str, float]] = {}
    for kind, v, mean in zip(KINDS, pair, means, strict=True):
        if v.linear:
            errors[kind] = replace_linear(layer, arch, kind, compressed_in, targets[kind], alphas, 0, where, every)
        elif kind == "attn":
            remove_kv_groups(layer, arch, layout, torch.zeros(layout.n_kv, dtype=torch.bool), mean)
        else:
            width = linear_at(layer, arch.down).in_features
            remove_mlp_channels(layer, arch, torch.zeros(width, dtype=torch.bool), mean)
    return dense_out, run_layer(layer, compressed_in), errors


def reconstruct_choice(
    model: nn.Module,
    arch: Arch,
    stats: list[LayerStats],
    units: list[tuple[ModuleUnits, ModuleUnits]],
    chosen: list[Variant],
    calibration_ids: Tensor,
    alphas: list[float],
    batch_size: int = 8,
    device: str | None = None,
) -> list[dict[str, dict[str, float]]]:
    """Realise the chosen variants (groups [L0 attn, L0 mlp, L1 attn, ...]) in the dense ``model`` in place with
    least-squares reconstruction on ``calibration_ids`` ([n, T]); ``alphas``: the ridge, or a grid to choose it
    from per consumer on held-out mini-batches. Returns per layer {sub-block: {"alpha", "residual", ...}}."""
    config = model_config(model)
    n_batches = -(-calibration_ids.shape[0] // batch_size)
    every = min(4, n_batches) if len(alphas) > 1 else 0
    if every == 1:
        raise InputError(
            "prune.ridge: choosing the ridge needs at least 2 calibration mini-batches (calibration.samples > "
            "calibration.batch_size), or give prune.ridge"
        )
    records: list[dict[str, dict[str, float]]] = []

    def visit(
        index: int, _dense: nn.Module, layer: nn.Module, dense_in: LayerInputs, compressed_in: LayerInputs
    ) -> tuple[list[Tensor], list[Tensor]]:
        pair = (chosen[2 * index], chosen[2 * index + 1])
        means = (stats[index]["o"].mean, stats[index]["down"].mean)
        layout = attention_layout(config, layer, arch)
        linear = [v.linear for v in pair]
        noop = [v.units == 0 and not v.linear for v in pair]
        if any(linear) and any(noop):
            dense_out, out, errors = _replace_both(
                layer, arch, layout, pair, dense_in, compressed_in, alphas, means, (config, index), every
            )
        else:
            attn_keep, mlp_keep = keep_masks(units[index], *pair)
            where = (config, index, 0) if any(linear) else None
            dense_out, out, errors = reconstruct_layer(
                layer, arch, layout, attn_keep, mlp_keep, dense_in, compressed_in, alphas, means, 4, where
            )
        records.append(errors)
        log.debug("puzzle least squares: layer %d %s", index, errors)
        return dense_out, out

    calibrate_paired(model, model, arch, calibration_ids, visit, batch_size, device, "puzzle least squares")
    return records
