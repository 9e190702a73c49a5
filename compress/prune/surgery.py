"""Module surgery: physically remove KV groups and MLP channels, with FLAP bias compensation.

The result is a smaller dense model: q/k/v lose whole heads (rows), o_proj the matching columns; gate/up lose
rows and down_proj the matching columns. Fused projections (Phi-3's qkv_proj, gate_up_proj) lose the same rows
from each of their row blocks. Removed inputs of o_proj / down_proj can be replaced by their mean
contribution (FLAP eq. 9): b ← b + W[:, P] · x̄[P].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from compress.adapters import Arch, AttentionLayout, linear_at, linear_shape, present_linears, set_submodule
from compress.remote.modeling_secateurs import SkippedSubBlock, set_head_counts, skip_sub_block


def compensation_bias(weight: Tensor, mean: Tensor, keep: Tensor, bias: Tensor | None) -> Tensor:
    """FLAP bias compensation. weight: [out, C]; mean: [C] mean input; keep: [C] bool → new bias [out] (float64).

    b' = b + W[:, P] x̄[P] with P the removed channels: for inputs constant on P the pruned layer is exact.
    """
    removed = ~keep
    w = weight.detach().to(torch.float64).cpu()
    extra = w[:, removed] @ mean.to(torch.float64)[removed]
    return extra if bias is None else bias.detach().to(torch.float64).cpu() + extra


def _sliced_linear(
    linear: nn.Linear, rows: Tensor | None, cols: Tensor | None, bias: Tensor | None
) -> nn.Linear:
    """A new Linear holding ``linear.weight[rows][:, cols]`` and ``bias`` (or the sliced old bias)."""
    weight = linear.weight.detach()
    old_bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        old_bias = old_bias[rows] if old_bias is not None else None
    if cols is not None:
        weight = weight[:, cols]
    new_bias = bias if bias is not None else old_bias
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=new_bias is not None)
    out = out.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if new_bias is not None:
            out.bias.copy_(new_bias.to(weight.dtype))
    return out


def head_channels(keep_groups: Tensor, heads_per_group: int, head_dim: int) -> Tensor:
    """Channel mask [n_groups · heads_per_group · head_dim] of the heads in the kept groups ([n_groups] bool)."""
    return keep_groups.repeat_interleave(heads_per_group * head_dim)


def remove_kv_groups(
    layer: nn.Module, arch: Arch, layout: AttentionLayout, keep: Tensor, mean: Tensor | None = None
) -> None:
    """Keep the KV groups where ``keep`` ([n_kv] bool) is True; compensate o_proj's bias with ``mean`` ([H·d_h])
    when given. GQA stays valid: each kept KV head keeps its g query heads, so num_key_value_groups is unchanged.
    Keeping no group removes the attention sub-block (:func:`skip_block`)."""
    if bool(keep.all()):
        return
    if not bool(keep.any()):
        skip_block(layer, arch, "attn", mean)
        return
    q_rows = head_channels(keep, layout.group, layout.head_dim)
    kv_rows = head_channels(keep, 1, layout.head_dim)
    o = linear_at(layer, arch.o)
    bias = compensation_bias(o.weight, mean, q_rows, o.bias) if mean is not None else None
    if arch.qkv:  # fused rows [q | k | v]: the same heads from each block
        rows = torch.cat([q_rows, kv_rows, kv_rows])
        set_submodule(layer, arch.qkv, _sliced_linear(linear_at(layer, arch.qkv), rows, None, None))
        kept = int(keep.sum())
        set_head_counts(layer.get_submodule(arch.attn), kept * layout.group, kept)
    else:
        set_submodule(layer, arch.q, _sliced_linear(linear_at(layer, arch.q), q_rows, None, None))
        set_submodule(layer, arch.k, _sliced_linear(linear_at(layer, arch.k), kv_rows, None, None))
        set_submodule(layer, arch.v, _sliced_linear(linear_at(layer, arch.v), kv_rows, None, None))
    set_submodule(layer, arch.o, _sliced_linear(o, None, q_rows, bias))


def remove_mlp_channels(layer: nn.Module, arch: Arch, keep: Tensor, mean: Tensor | None = None) -> None:
    """Keep the MLP channels where ``keep`` ([F] bool) is True; compensate down_proj's bias with ``mean`` ([F]).
    Keeping no channel removes the MLP sub-block (:func:`skip_block`)."""
    if bool(keep.all()):
        return
    if not bool(keep.any()):
        skip_block(layer, arch, "mlp", mean)
        return
    down = linear_at(layer, arch.down)
    bias = compensation_bias(down.weight, mean, keep, down.bias) if mean is not None else None
    if arch.gate_up:  # fused rows [gate | up]: the same channels from both halves
        rows = torch.cat([keep, keep])
        set_submodule(layer, arch.gate_up, _sliced_linear(linear_at(layer, arch.gate_up), rows, None, None))
    else:
        set_submodule(layer, arch.gate, _sliced_linear(linear_at(layer, arch.gate), keep, None, None))
        set_submodule(layer, arch.up, _sliced_linear(linear_at(layer, arch.up), keep, None, None))
    set_submodule(layer, arch.down, _sliced_linear(down, None, keep, bias))


def skip_block(layer: nn.Module, arch: Arch, name: str, mean: Tensor | None = None) -> None:
    """Remove sub-block ``name`` ("attn" / "mlp") of ``layer``: its residual branch becomes a constant.

    With ``mean`` (the mean input [C] of its output linear, o_proj or down_proj) the constant is the block's mean
    output W·x̄ + b, FLAP's compensation with every unit removed (eq. 9 with P = all channels); else zero.
    """
    out_path = arch.o if name == "attn" else arch.down
    out_linear = linear_at(layer, out_path)
    hidden = out_linear.out_features
    constant = None
    if mean is not None:
        constant = compensation_bias(out_linear.weight, mean, torch.zeros_like(mean, dtype=torch.bool), out_linear.bias)
    block_path, norm_path = arch.sub_block(name)
    skip_sub_block(layer, block_path, norm_path, hidden, attention=name == "attn")
    block = layer.get_submodule(block_path)
    assert isinstance(block, SkippedSubBlock)
    if constant is not None:
        with torch.no_grad():
            block.bias.copy_(constant.to(block.bias.dtype))


def layer_shapes(layer: nn.Module, arch: Arch) -> dict[str, list[int]]:
    """{linear path: [out_features, in_features, has_bias]} for every linear a decoder layer still has."""
    shapes = {}
    for path in present_linears(layer, arch):
        out_features, in_features, has_bias = linear_shape(layer, path)
        shapes[path] = [out_features, in_features, int(has_bias)]
    return shapes
