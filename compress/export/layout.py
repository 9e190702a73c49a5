"""How a (pruned) decoder maps onto llama.cpp's graphs: architecture choice, per-layer counts, folded constants.

Pure functions on shapes and bias vectors; no model objects, no I/O.

llama.cpp has two graphs that fit a Llama-family decoder:

* ``llama``: one head count, KV-head count and FFN length for all layers; optional ``attn_output.bias`` and
  ``ffn_down.bias`` (and q/k/v, gate/up biases). Used when every layer has the same shapes and nothing is skipped.
* ``deci`` (the Nemotron-NAS family): per-layer arrays ``head_count``, ``head_count_kv``, ``feed_forward_length``,
  the same optional biases, and two kinds of no-op sub-blocks: ``head_count[i] = 0`` is an attention-free layer
  (the residual passes through, no attention norm, no KV cache), ``feed_forward_length[i] = 0`` an FFN-free layer.

Two details of the ``deci`` graph (llama.cpp ``src/models/deci.cpp``) shape the mapping:

1. A Secateurs skipped sub-block adds a constant ``c`` to the residual stream (FLAP's compensation with every unit
   removed). llama.cpp's no-op blocks add nothing, but a skipped block reads nothing either, so ``c`` can move
   back to the output bias of the nearest *earlier* block that is kept: h + b + c is the same residual stream
   whichever of the two adds ``c``. :func:`plan_layers` folds every constant that way (exact). A constant with no
   earlier block to fold into (the first sub-block of the model) is refused.
2. For ``feed_forward_length[i] = 0`` the graph ``continue``s before it adds the attention output to the
   residual, so the attention output of that layer would be dropped. An FFN-free layer whose attention is kept is
   therefore written as a *stub* MLP of width 1 with zero weights (exactly zero output; its bias carries the
   folded constant); FFN-free layers without attention use ``feed_forward_length = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from quant.errors import InputError

STUB_FFN = 1  # width of the zero MLP that stands for a skipped MLP next to a kept attention (see point 2 above)


@dataclass
class LayerShape:
    """One decoder layer as Secateurs holds it. ``n_head``/``n_kv``/``n_ff`` are 0 for a skipped sub-block.

    ``attn_bias`` / ``mlp_bias``: [hidden] output bias of o_proj / down_proj (kept block) or the constant a
    skipped block adds (None = zero).
    """

    n_head: int
    n_kv: int
    n_ff: int
    attn_bias: Tensor | None = None
    mlp_bias: Tensor | None = None


@dataclass
class LayerPlan:
    """One decoder layer as llama.cpp will read it."""

    n_head: int
    n_kv: int
    n_ff: int
    mlp_stub: bool = False  # a width-1 zero MLP written in place of a skipped MLP (n_ff == STUB_FFN)
    attn_out_bias: Tensor | None = None  # [hidden] float32, attn_output.bias
    ffn_down_bias: Tensor | None = None  # [hidden] float32, ffn_down.bias
    notes: list[str] = field(default_factory=list)


def is_uniform(shapes: list[LayerShape]) -> bool:
    """Every layer keeps the same head counts and MLP width and no sub-block is skipped."""
    first = shapes[0]
    return all(
        (s.n_head, s.n_kv, s.n_ff) == (first.n_head, first.n_kv, first.n_ff) and s.n_kv > 0 and s.n_ff > 0
        for s in shapes
    )


def _add(total: Tensor | None, extra: Tensor | None) -> Tensor | None:
    if extra is None:
        return total
    extra = extra.detach().to(torch.float32).cpu()
    return extra.clone() if total is None else total + extra


def plan_layers(shapes: list[LayerShape]) -> list[LayerPlan]:
    """Per-layer llama.cpp counts, with skipped blocks' constants folded into the previous kept block's bias.

    Sub-blocks run in the order attn₀, mlp₀, attn₁, …; the residual after them is h + Σ outputs. A skipped block
    (output ≡ c) reads nothing, so c joins the output bias of the nearest earlier kept (or stub) block.
    """
    plans = [LayerPlan(s.n_head, s.n_kv, s.n_ff) for s in shapes]
    target: tuple[int, str] | None = None  # (layer, "attn" | "mlp") whose output bias absorbs later constants
    for index, (shape, plan) in enumerate(zip(shapes, plans, strict=True)):
        if shape.n_kv > 0:
            plan.attn_out_bias = _add(None, shape.attn_bias)
            target = (index, "attn")
        else:
            plan.n_head = 0
            target = _fold(plans, target, shape.attn_bias, index, "attention")
        if shape.n_ff > 0:
            plan.ffn_down_bias = _add(None, shape.mlp_bias)
            target = (index, "mlp")
        elif shape.n_kv > 0:
            plan.n_ff, plan.mlp_stub = STUB_FFN, True
            plan.ffn_down_bias = _add(None, shape.mlp_bias)
            plan.notes.append("skipped MLP written as a zero MLP of width 1 (FFN-free layers lose their attention)")
            target = (index, "mlp")
        else:
            target = _fold(plans, target, shape.mlp_bias, index, "MLP")
    return plans


def _fold(
    plans: list[LayerPlan], target: tuple[int, str] | None, constant: Tensor | None, index: int, what: str
) -> tuple[int, str] | None:
    if constant is None or not bool(constant.any()):
        return target
    if target is None:
        raise InputError(
            f"layer {index}: the skipped {what} adds a constant and no earlier sub-block is kept to carry it; "
            "llama.cpp has no bias on the embedding (keep layer 0's attention)"
        )
    layer, kind = target
    plan = plans[layer]
    if kind == "attn":
        plan.attn_out_bias = _add(plan.attn_out_bias, constant)
    else:
        plan.ffn_down_bias = _add(plan.ffn_down_bias, constant)
    plan.notes.append(f"carries the constant of layer {index}'s skipped {what}")
    return target


def rope_permute(weight: Tensor, head_dim: int) -> Tensor:
    """Reorder q/k rows (or bias entries) from Hugging Face's rotate-half RoPE to llama.cpp's interleaved pairs.

    weight: [n_heads·head_dim, ...]. Within each head, rows (0..d/2−1, d/2..d−1) become (0, d/2, 1, d/2+1, …),
    the pairing ``ggml_rope`` (mode NORM) rotates together. Works for any head count, so per-layer shapes too.
    """
    rest = weight.shape[1:]
    heads = weight.shape[0] // head_dim
    return weight.reshape(heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(weight.shape)
