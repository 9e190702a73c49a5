"""Puzzle's block library: the variants of every sub-block and their exact costs.

Sub-blocks are grouped as [layer 0 attention, layer 0 MLP, layer 1 attention, ...]. Variants of one sub-block:
- attention: k of the G KV groups kept (k = G is the parent), the KV groups chosen by the FLAP metric (WIFV,
  standardised, mean per group), with FLAP's bias compensation of o_proj; k = 0 is the no-op (the sub-block's
  residual branch becomes its constant mean output on calibration data). Never a no-op in layer 0 (the KV cache's
  length is read there).
- MLP: widths on a grid of F/steps channels (top channels by WIFV, compensated down_proj bias); 0 = no-op.
- linear replacement (option, both kinds, never layer 0's attention): a ridge least-squares map hidden → hidden
  of the sub-block's pre-normed input, fitted on the parent's inputs to that layer (the scoring tokens).

Costs are exact for the realised module: parameters (linears, biases, the pre-norm, the no-op's constant),
KV-cache bytes per token (2·k·d_h values) and, when measured, latency of the sub-block's forward.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from compress.adapters import (
    Arch,
    AttentionLayout,
    attention_layout,
    decoder_layers,
    is_skipped,
    linear_at,
    linear_shape,
    model_config,
)
from compress.calibration import LayerInputs, LayerStats, run_layer
from compress.prune.allocate import ModuleUnits, top_units
from compress.prune.surgery import remove_kv_groups, remove_mlp_channels
from compress.recover.least_squares import RIDGE_GRID
from compress.recover.reconstruct import replace_linear
from compress.remote.modeling_secateurs import linear_sub_block

KINDS = ("attn", "mlp")


@dataclass(frozen=True)
class Variant:
    """One variant of a sub-block: ``kind`` "attn" (``units`` = kept KV groups) or "mlp" (kept channels);
    ``units`` = 0 is the no-op, or with ``linear`` the linear replacement."""

    kind: str
    units: int
    linear: bool = False

    @property
    def label(self) -> str:
        return f"{self.kind}:{'linear' if self.linear else 'noop' if self.units == 0 else self.units}"

    @classmethod
    def parse(cls, label: str) -> Variant:
        kind, units = label.split(":")
        return cls(kind, 0 if units in ("noop", "linear") else int(units), units == "linear")


@dataclass(frozen=True)
class BlockShape:
    """What the costs of a parent decoder layer depend on (all layers of the parent must be alike)."""

    hidden: int
    n_kv: int
    group: int
    head_dim: int
    intermediate: int
    qkv_bias: bool
    o_bias: bool
    mlp_in_bias: bool  # gate/up biases
    down_bias: bool
    attn_extra: int  # parameters of the attention module outside its linears (Qwen3's q/k norms)
    norm: int  # parameters of one pre-norm
    compensation: bool = True


def block_shape(model: nn.Module, arch: Arch, compensation: bool = True) -> BlockShape:
    """The shape of a dense parent; raises ValueError for an already pruned model (unequal layers)."""
    layers = decoder_layers(model, arch)
    config = model_config(model)
    layouts = {attention_layout(config, layer, arch) for layer in layers}
    widths = {linear_shape(layer, arch.down)[1] for layer in layers}
    if len(layouts) != 1 or len(widths) != 1 or any(is_skipped(lyr, arch, k) for lyr in layers for k in KINDS):
        raise ValueError("puzzle needs a dense parent with identical layers (got an already pruned model)")
    layout = layouts.pop()
    first = layers[0]
    attn_linear_params = sum(p.numel() for path in arch.attn_linears for p in linear_at(first, path).parameters())
    attn_params = sum(p.numel() for p in first.get_submodule(arch.attn).parameters())
    return BlockShape(
        hidden=int(config.hidden_size),
        n_kv=layout.n_kv,
        group=layout.group,
        head_dim=layout.head_dim,
        intermediate=widths.pop(),
        qkv_bias=linear_shape(first, arch.q)[2],
        o_bias=linear_shape(first, arch.o)[2],
        mlp_in_bias=linear_shape(first, arch.gate)[2],
        down_bias=linear_shape(first, arch.down)[2],
        attn_extra=attn_params - attn_linear_params,
        norm=sum(p.numel() for p in first.get_submodule(arch.attn_norm).parameters()),
        compensation=compensation,
    )


def sub_block_variants(
    shape: BlockShape, layer: int, kind: str, mlp_steps: int, allow_noop: bool, allow_linear: bool = False
) -> list[Variant]:
    """Variants of one sub-block, the parent first: attention k = G..1 (and 0), MLP F·j/steps for j = steps..1
    (and 0), then the linear replacement. Layer 0's attention is never a no-op or linear."""
    if kind == "attn":
        units = list(range(shape.n_kv, 0, -1)) + ([0] if allow_noop and layer > 0 else [])
    else:
        grid = sorted({round(shape.intermediate * j / mlp_steps) for j in range(1, mlp_steps + 1)}, reverse=True)
        units = [u for u in grid if u > 0] + ([0] if allow_noop else [])
    linear = [Variant(kind, 0, True)] if allow_linear and (kind == "mlp" or layer > 0) else []
    return [Variant(kind, u) for u in units] + linear


def library(
    shape: BlockShape, n_layers: int, mlp_steps: int = 16, allow_noop: bool = True, allow_linear: bool = False
) -> list[list[Variant]]:
    """Variants per sub-block, groups ordered [L0 attn, L0 mlp, L1 attn, ...]."""
    return [
        sub_block_variants(shape, i, kind, mlp_steps, allow_noop, allow_linear)
        for i in range(n_layers)
        for kind in KINDS
    ]


def variant_params(shape: BlockShape, v: Variant) -> int:
    """Exact parameters of the realised sub-block: its linears and biases, its pre-norm and (attention) per-head
    norms; a no-op has only its constant [hidden] (its pre-norm is removed). FLAP's compensation adds an output
    bias whenever units are removed. A linear replacement: its [hidden, hidden] map, bias and the kept pre-norm."""
    h = shape.hidden
    if v.linear:
        return h * h + h + shape.norm
    if v.units == 0:
        return h
    if v.kind == "attn":
        q_out, kv_out = v.units * shape.group * shape.head_dim, v.units * shape.head_dim
        out_bias = shape.o_bias or (shape.compensation and v.units < shape.n_kv)
        linears = h * q_out + 2 * h * kv_out + q_out * h + (q_out + 2 * kv_out if shape.qkv_bias else 0)
        return linears + (h if out_bias else 0) + shape.attn_extra + shape.norm
    c = v.units
    out_bias = shape.down_bias or (shape.compensation and c < shape.intermediate)
    return 3 * h * c + (2 * c if shape.mlp_in_bias else 0) + (h if out_bias else 0) + shape.norm


def variant_kv_bytes(shape: BlockShape, v: Variant, bytes_per_value: int = 2) -> int:
    """KV-cache bytes per token of the sub-block: K and V of each kept KV head (0 for the MLP and no-ops)."""
    return 2 * v.units * shape.head_dim * bytes_per_value if v.kind == "attn" else 0


def realize_sub_block(
    layer: nn.Module,
    arch: Arch,
    layout: AttentionLayout,
    stats: LayerStats | None,
    units: tuple[ModuleUnits, ModuleUnits],
    v: Variant,
    inputs: LayerInputs | None = None,
    where: tuple[Any, int] | None = None,
) -> None:
    """Turn one sub-block of a dense ``layer`` into variant ``v`` in place: top-k FLAP units, compensation with the
    dense means of ``stats`` (the pruner's own surgery, so a realised choice equals what was scored). A linear
    replacement is fitted on the layer's ``inputs`` (without them: zero, for timing) and recorded in the config of
    ``where`` = (model config, layer index) when given."""
    if v.linear:
        fit_linear(layer, arch, v.kind, inputs, where)
    elif v.kind == "attn":
        keep = top_units(units[0].scores, v.units)
        remove_kv_groups(layer, arch, layout, keep, stats["o"].mean if stats is not None else None)
    else:
        keep = top_units(units[1].scores, v.units)
        remove_mlp_channels(layer, arch, keep, stats["down"].mean if stats is not None else None)


@torch.no_grad()
def fit_linear(
    layer: nn.Module, arch: Arch, kind: str, inputs: LayerInputs | None, where: tuple[Any, int] | None
) -> None:
    """Replace sub-block ``kind`` of the parent ``layer`` by its ridge least-squares linear map (the recovery
    issue's :func:`compress.recover.reconstruct.replace_linear`, α chosen on held-out mini-batches): inputs and
    targets are the layer's own on ``inputs`` (replace-one-block: the parent's stream)."""
    block_path = arch.sub_block(kind)[0]
    hidden = linear_at(layer, arch.o if kind == "attn" else arch.down).out_features
    config = where[0] if where is not None else SimpleNamespace(num_hidden_layers=1)
    index = where[1] if where is not None else 0
    if inputs is None:
        linear_sub_block(config, index, layer, block_path, kind, hidden, 0)
        return
    targets: list[Tensor] = []
    block = layer.get_submodule(block_path)
    handle = block.register_forward_hook(lambda _m, _a, out: targets.append(out[0] if isinstance(out, tuple) else out))
    try:
        run_layer(layer, inputs)
    finally:
        handle.remove()
    every = 4 if len(targets) >= 2 else 0
    alphas = RIDGE_GRID if every else [RIDGE_GRID[2]]
    replace_linear(layer, arch, kind, inputs, targets, alphas, 0, (config, index), min(every, len(targets)))


@torch.no_grad()
def time_sub_block(layer: nn.Module, arch: Arch, kind: str, hidden: Tensor, kwargs: dict, repeats: int = 5) -> float:
    """Median seconds of pre-norm + sub-block forward on ``hidden`` ([b, T, hidden]) with the layer kwargs."""
    block_path, norm_path = arch.sub_block(kind)
    block, norm = layer.get_submodule(block_path), layer.get_submodule(norm_path)

    def run() -> None:
        x = norm(hidden)
        if kind == "attn":
            block(hidden_states=x, **kwargs)
        else:
            block(x)

    run()  # warm-up
    times = []
    for _ in range(repeats):
        clock = time.perf_counter()
        run()
        times.append(time.perf_counter() - clock)
    return statistics.median(times)


def measure_latency(
    model: nn.Module,
    arch: Arch,
    stats: list[LayerStats],
    units: list[tuple[ModuleUnits, ModuleUnits]],
    groups: list[list[Variant]],
    inputs: Any,
) -> dict[Variant, float]:
    """Seconds of each distinct variant's forward (pre-norm + sub-block) on one cached batch of layer 1; variants
    of equal shape cost the same in every layer, so each shape is timed once (realised from layer 1)."""
    index = min(1, len(decoder_layers(model, arch)) - 1)
    parent = decoder_layers(model, arch)[index]
    config = model_config(model)
    times: dict[Variant, float] = {}
    for v in sorted({v for vs in groups for v in vs}, key=lambda v: (v.kind, v.units)):
        layer = copy.deepcopy(parent)
        realize_sub_block(layer, arch, attention_layout(config, layer, arch), stats[index], units[index], v)
        times[v] = time_sub_block(layer, arch, v.kind, inputs.hidden[0], inputs.kwargs[0])
    return times
