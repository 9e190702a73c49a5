"""Least-squares reconstruction inside the prune step (model plumbing around ``least_squares.ridge_refit``).

Given the keep-masks chosen by the pruner, walk the dense and the compressed stream through the decoder layers
together (``compress.calibration.calibrate_paired``). For layer i, still dense when visited:

1. run it on the dense stream, recording the dense outputs y of o_proj and down_proj (the targets);
2. remove its KV groups, run it on the compressed stream up to the MLP, refit o_proj on (kept inputs z, y);
3. remove its MLP channels, run it on the compressed stream, refit down_proj on (z, y);
4. run the repaired layer on the compressed stream: the next layer's compressed inputs.

So each layer also corrects the error of the already-compressed layers before it. A sub-block that keeps all
its units is left untouched (ratio 0 leaves the model bit-identical); a removed sub-block keeps FLAP's constant
(its mean dense output) or, as an option, gets Puzzle's linear replacement (a least-squares map of its input).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from compress.adapters import Arch, AttentionLayout, attention_layout, linear_at, model_config, set_submodule
from compress.calibration import LayerInputs, LayerStats, calibrate_paired, run_layer
from compress.prune.surgery import remove_kv_groups, remove_mlp_channels
from compress.recover.least_squares import PairStats, reduced_rank, relative_residual, ridge_refit, select_ridge
from compress.remote.modeling_secateurs import linear_sub_block
from quant.errors import InputError


class _Stop(Exception):
    pass


def _capture_outputs(module: nn.Module, store: list[Tensor]) -> Any:
    return module.register_forward_hook(lambda _m, _args, out: store.append(out.detach()))


def _accumulate(
    layer: nn.Module,
    consumer: nn.Linear,
    inputs: LayerInputs,
    targets: list[Tensor],
    stop_at: nn.Module | None,
    holdout_every: int,
) -> tuple[PairStats, PairStats]:
    """Run ``layer`` on ``inputs`` (stopping before ``stop_at``), pairing the consumer's inputs with ``targets``:
    (statistics of the fit mini-batches, of the held-out ones: every ``holdout_every``-th, 0 = none)."""
    fit = PairStats(consumer.in_features, consumer.out_features)
    holdout = PairStats(consumer.in_features, consumer.out_features)
    batch = [0]

    def grab(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
        held = holdout_every > 0 and batch[0] % holdout_every == holdout_every - 1
        (holdout if held else fit).add_batch(args[0], targets[batch[0]])

    def stop(_m: nn.Module, _args: tuple[Any, ...]) -> None:
        raise _Stop

    handles = [consumer.register_forward_pre_hook(grab)]
    if stop_at is not None:
        handles.append(stop_at.register_forward_pre_hook(stop))
    try:
        _run_batches(layer, inputs, batch)
    finally:
        for h in handles:
            h.remove()
    return fit, holdout


def _run_batches(layer: nn.Module, inputs: LayerInputs, batch: list[int]) -> None:
    """Run ``layer`` on every mini-batch of ``inputs`` (``batch[0]`` = its index, for the hooks); a hook ends a
    forward early by raising :class:`_Stop`."""
    for index, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs, strict=True)):
        batch[0] = index
        try:
            layer(hidden, **kwargs)
        except _Stop:
            pass


def _refit(layer: nn.Module, path: str, fit: PairStats, holdout: PairStats, alphas: list[float]) -> dict[str, float]:
    """Refit the consumer at ``path``: α chosen on the held-out mini-batches when several are given, then the
    refit on all tokens. Returns {"alpha", "residual" (on all tokens), "holdout_residual" (when selected)}."""
    prior = linear_at(layer, path).weight
    record: dict[str, float] = {}
    if len(alphas) > 1:
        if holdout.count == 0:
            raise ValueError("choosing the ridge needs held-out calibration mini-batches")
        alpha, record["holdout_residual"] = select_ridge(fit, holdout, prior, alphas)
    else:
        alpha = alphas[0]
    both = fit.merged(holdout) if holdout.count else fit
    weight, bias = ridge_refit(both, prior, alpha)
    _install(layer, path, weight, bias)
    record.update(alpha=alpha, residual=relative_residual(both, weight, bias))
    return record


def _accumulate_block(
    layer: nn.Module, arch: Arch, name: str, inputs: LayerInputs, targets: list[Tensor], holdout_every: int
) -> tuple[PairStats, PairStats]:
    """Pair the (pre-normed) input of sub-block ``name`` on ``inputs`` with ``targets`` (its dense outputs),
    stopping each forward right after the pre-norm; (fit, held-out) statistics as :func:`_accumulate`."""
    norm = layer.get_submodule(arch.sub_block(name)[1])
    hidden = targets[0].shape[-1]
    fit, holdout = PairStats(hidden, hidden), PairStats(hidden, hidden)
    batch = [0]

    def grab(_m: nn.Module, _args: tuple[Any, ...], out: Tensor) -> None:
        held = holdout_every > 0 and batch[0] % holdout_every == holdout_every - 1
        (holdout if held else fit).add_batch(out, targets[batch[0]])
        raise _Stop

    handle = norm.register_forward_hook(grab)
    try:
        _run_batches(layer, inputs, batch)
    finally:
        handle.remove()
    return fit, holdout


def replace_linear(
    layer: nn.Module,
    arch: Arch,
    name: str,
    inputs: LayerInputs,
    targets: list[Tensor],
    alphas: list[float],
    rank: int,
    where: tuple[Any, int],
    holdout_every: int = 4,
) -> dict[str, float]:
    """Puzzle's linear replacement of sub-block ``name``: a ridge least-squares map (zero-centred ridge, α chosen
    as for the consumers) from its pre-normed input on ``inputs`` to ``targets``, its dense outputs; ``rank`` > 0
    keeps the best rank-r map. α → ∞ is the constant (the mean dense output). ``where`` = (model config, layer
    index) records the replacement for the checkpoint. Returns {"alpha", "residual", ...}."""
    fit, held = _accumulate_block(layer, arch, name, inputs, targets, holdout_every if len(alphas) > 1 else 0)
    hidden = fit.inputs
    prior = torch.zeros(hidden, hidden, dtype=torch.float64)
    record: dict[str, float] = {}
    if len(alphas) > 1:
        alpha, record["holdout_residual"] = select_ridge(fit, held, prior, alphas)
    else:
        alpha = alphas[0]
    both = fit.merged(held) if held.count else fit
    weight, bias = ridge_refit(both, prior, alpha)
    block = linear_sub_block(where[0], where[1], layer, arch.sub_block(name)[0], name, hidden, rank)
    with torch.no_grad():
        if rank:
            up, down, bias = reduced_rank(both, weight, rank)
            block.up.copy_(up)
            block.down.copy_(down)
            weight = up @ down
        else:
            block.weight.copy_(weight)
        block.bias.copy_(bias)
    record.update(alpha=alpha, residual=relative_residual(both, weight, bias), rank=rank)
    return record


def _install(layer: nn.Module, path: str, weight: Tensor, bias: Tensor) -> None:
    old = linear_at(layer, path)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=True).to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        new.bias.copy_(bias)
    set_submodule(layer, path, new)


@torch.no_grad()
def reconstruct_layer(
    layer: nn.Module,
    arch: Arch,
    layout: AttentionLayout,
    attn_keep: Tensor,
    mlp_keep: Tensor,
    dense_in: LayerInputs,
    compressed_in: LayerInputs,
    alphas: list[float],
    means: tuple[Tensor | None, Tensor | None] = (None, None),
    holdout_every: int = 4,
    linear: tuple[Any, int, int] | None = None,
) -> tuple[list[Tensor], list[Tensor], dict[str, dict[str, float]]]:
    """Prune one dense layer with the given keep-masks and refit its consumers (module docstring).

    ``means`` (mean o_proj / down_proj inputs on the dense stream) give the constant of a removed sub-block;
    with ``linear`` = (model config, layer index, rank) a removed sub-block gets a least-squares linear map
    instead (:func:`replace_linear`).
    With several ``alphas`` the ridge of each consumer is chosen on every ``holdout_every``-th calibration
    mini-batch (held out from the fit), then refitted on all of them.
    Returns (dense outputs, compressed outputs, {sub-block: {"alpha", "residual", ...}} of the refit consumers).
    """
    o, down = linear_at(layer, arch.o), linear_at(layer, arch.down)
    y_o: list[Tensor] = []
    y_down: list[Tensor] = []
    handles = [_capture_outputs(o, y_o), _capture_outputs(down, y_down)]
    try:
        dense_out = run_layer(layer, dense_in)
    finally:
        for h in handles:
            h.remove()
    errors: dict[str, dict[str, float]] = {}
    every = min(holdout_every, len(compressed_in.hidden)) if len(alphas) > 1 else 0
    if every == 1:
        raise InputError(
            "prune.ridge: choosing the ridge needs at least 2 calibration mini-batches (calibration.samples > "
            "calibration.batch_size), or give prune.ridge"
        )
    mlp_module = layer.get_submodule(arch.sub_block("mlp")[0])
    if not bool(attn_keep.all()):
        if linear is not None and not bool(attn_keep.any()):
            rank, where = linear[2], linear[:2]
            errors["attn"] = replace_linear(layer, arch, "attn", compressed_in, y_o, alphas, rank, where, every)
        else:
            remove_kv_groups(layer, arch, layout, attn_keep, means[0])
        if bool(attn_keep.any()):
            fit, held = _accumulate(layer, linear_at(layer, arch.o), compressed_in, y_o, mlp_module, every)
            errors["attn"] = _refit(layer, arch.o, fit, held, alphas)
    if not bool(mlp_keep.all()):
        if linear is not None and not bool(mlp_keep.any()):
            rank, where = linear[2], linear[:2]
            errors["mlp"] = replace_linear(layer, arch, "mlp", compressed_in, y_down, alphas, rank, where, every)
        else:
            remove_mlp_channels(layer, arch, mlp_keep, means[1])
        if bool(mlp_keep.any()):
            fit, held = _accumulate(layer, linear_at(layer, arch.down), compressed_in, y_down, None, every)
            errors["mlp"] = _refit(layer, arch.down, fit, held, alphas)
    changed = not (bool(attn_keep.all()) and bool(mlp_keep.all()))
    same_stream = compressed_in.hidden is dense_in.hidden  # nothing before this layer was changed
    compressed_out = dense_out if same_stream and not changed else run_layer(layer, compressed_in)
    return dense_out, compressed_out, errors


def ridge_alphas(alpha: float | list[float]) -> list[float]:
    """The ridge grid of a ``reconstruct_model`` ``alpha``: one value, or the grid to choose from."""
    return [alpha] if isinstance(alpha, int | float) else list(alpha)


def reconstruct_at(
    index: int,
    layer: nn.Module,
    config: Any,
    arch: Arch,
    attn_keep: Tensor,
    mlp_keep: Tensor,
    alphas: list[float],
    stats: LayerStats | None,
    dense_in: LayerInputs,
    compressed_in: LayerInputs,
    linear_rank: int | None = None,
) -> tuple[list[Tensor], list[Tensor], dict[str, dict[str, float]]]:
    """Decoder layer ``index`` of :func:`reconstruct_model` (in memory, or streamed by ``compress.stream``):
    ``layer`` is still dense; ``stats`` its dense statistics (the means of a removed sub-block's constant).
    Returns (dense-stream outputs, compressed-stream outputs, {sub-block: refit record})."""
    means = (stats["o"].mean, stats["down"].mean) if stats is not None else (None, None)
    layout = attention_layout(config, layer, arch)
    linear = None if linear_rank is None else (config, index, linear_rank)
    return reconstruct_layer(
        layer, arch, layout, attn_keep, mlp_keep, dense_in, compressed_in, alphas, means, linear=linear
    )


def reconstruct_model(
    model: nn.Module,
    arch: Arch,
    calibration_ids: Tensor,
    attn_keep: list[Tensor],
    mlp_keep: list[Tensor],
    alpha: float | list[float],
    stats: list[LayerStats] | list[None],
    batch_size: int = 8,
    device: str | None = None,
    progress: Callable[[int, dict[str, dict[str, float]]], None] | None = None,
    linear_rank: int | None = None,
) -> list[dict[str, dict[str, float]]]:
    """Prune the dense ``model`` in place with least-squares reconstruction; one record per layer.

    ``alpha``: the ridge, or a grid to choose it from per consumer on held-out calibration mini-batches.
    ``linear_rank``: None = removed sub-blocks become constants; 0 = full-rank linear replacements; r = rank r."""
    config = model_config(model)
    alphas = ridge_alphas(alpha)
    records: list[dict[str, dict[str, float]]] = []

    def visit(
        index: int, _dense: nn.Module, layer: nn.Module, dense_in: LayerInputs, compressed_in: LayerInputs
    ) -> tuple[list[Tensor], list[Tensor]]:
        dense_out, compressed_out, errors = reconstruct_at(
            index, layer, config, arch, attn_keep[index], mlp_keep[index], alphas, stats[index], dense_in,
            compressed_in, linear_rank,
        )  # fmt: skip
        records.append(errors)
        if progress is not None:
            progress(index, errors)
        return dense_out, compressed_out

    calibrate_paired(model, model, arch, calibration_ids, visit, batch_size, device, "least squares")
    return records
