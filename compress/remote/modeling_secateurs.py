"""Loader for Secateurs-pruned checkpoints (copied next to the weights; used through ``trust_remote_code``).

A pruned model has per-layer shapes: each decoder layer keeps its own number of KV groups (with g query heads
each) and its own MLP width, and may carry new o_proj / down_proj biases (FLAP bias compensation). A stock
``config.json`` cannot say that, and transformers (checked with 5.24) does not build Llama-family layers from
``per_layer_config``. This file builds the base architecture, then resizes each listed linear to the shape recorded
in ``config.secateurs_layers``; the weights then load under the base model's tensor names. Head counts need no
config change: attention infers them from the projection shapes and the query-heads-per-KV-head ratio is kept.
Sub-blocks listed in ``config.secateurs_skipped`` (TraceNAS depth pruning) are replaced by :class:`SkippedSubBlock`
(a constant output: the block's mean calibration output, or zero) and their pre-norm by the identity, or, when
``config.secateurs_linear`` lists them, by :class:`LinearSubBlock` (Puzzle's linear replacement; pre-norm kept).

Self-contained on purpose (imports only torch and transformers): it must work without Secateurs installed.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import transformers
from torch import nn

try:  # packed (quantized) checkpoints need Secateurs' quantizer; importing the package registers it
    import quant  # noqa: F401

    HAVE_SECATEURS_QUANT = True
except ImportError:  # pruned-only checkpoints load with transformers alone
    HAVE_SECATEURS_QUANT = False

BASE_ARCHITECTURE = "LlamaForCausalLM"  # rewritten by the Secateurs checkpoint writer
# the architectures of Secateurs' adapter table (compress.adapters.ARCHS; a test keeps the two equal): a name read
# from config.json is looked up here, never as an arbitrary attribute of transformers
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM",
    "Gemma3ForCausalLM", "Phi3ForCausalLM",
)  # fmt: skip


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, name, module)


class SkippedSubBlock(nn.Module):
    """A removed attention or MLP sub-block: the residual branch adds a constant ``bias`` [hidden] (zero, or the
    block's mean output on calibration data, i.e. FLAP's bias compensation with every unit removed).

    ``attention=True`` returns ``(output, None)`` like the attention modules of transformers. Keyword arguments
    (masks, positions, cache) are accepted and ignored: a skipped attention reads and writes no KV cache.
    """

    def __init__(self, hidden_size: int, attention: bool) -> None:
        super().__init__()
        self.attention = attention
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, hidden_states: torch.Tensor | None = None, *args: object, **kwargs: object):
        assert hidden_states is not None
        out = self.bias.to(hidden_states.dtype).expand_as(hidden_states)
        return (out, None) if self.attention else out


class LinearSubBlock(SkippedSubBlock):
    """Puzzle's *linear replacement* of an attention or MLP sub-block: the residual branch adds a linear map of
    the sub-block's (pre-normed) input, ``W x + bias`` — one ``weight`` [hidden, hidden], or at ``rank`` r < hidden
    the factors ``up`` [hidden, r] · ``down`` [r, hidden]. The pre-norm is kept. A skipped sub-block for the
    library (it has no KV cache and none of the sub-block's linears); its map is listed per layer in
    ``config.secateurs_linear`` ({sub-block name: rank, 0 = full}), which :func:`linear_sub_block` maintains.
    """

    def __init__(self, hidden_size: int, attention: bool, rank: int = 0) -> None:
        super().__init__(hidden_size, attention)
        self.rank = rank
        if rank:
            self.up = nn.Parameter(torch.zeros(hidden_size, rank))
            self.down = nn.Parameter(torch.zeros(rank, hidden_size))
        else:
            self.weight = nn.Parameter(torch.zeros(hidden_size, hidden_size))

    def forward(self, hidden_states: torch.Tensor | None = None, *args: object, **kwargs: object):
        assert hidden_states is not None
        if self.rank:
            out = nn.functional.linear(nn.functional.linear(hidden_states, self.down), self.up, self.bias)
        else:
            out = nn.functional.linear(hidden_states, self.weight, self.bias)
        return (out, None) if self.attention else out


def linear_sub_block(
    model_config: Any, layer_index: int, layer: nn.Module, block_path: str, name: str, hidden_size: int, rank: int
) -> LinearSubBlock:
    """Replace ``layer.<block_path>`` (sub-block ``name``) by a zero :class:`LinearSubBlock` (the pre-norm stays)
    and record it in ``model_config.secateurs_linear`` (so a saved checkpoint rebuilds it); returns the module."""
    block = layer.get_submodule(block_path)
    param = next(block.parameters())
    new = LinearSubBlock(hidden_size, name == "attn", rank).to(device=param.device, dtype=param.dtype)
    _set_submodule(layer, block_path, new)
    n_layers = int(model_config.num_hidden_layers)
    table = getattr(model_config, "secateurs_linear", None) or [{} for _ in range(n_layers)]
    table[layer_index] = {**table[layer_index], name: rank}
    model_config.secateurs_linear = table
    return new


def skip_sub_block(layer: nn.Module, block_path: str, norm_path: str, hidden_size: int, attention: bool) -> None:
    """Replace ``layer.<block_path>`` by a :class:`SkippedSubBlock` and its pre-norm by the identity."""
    block = layer.get_submodule(block_path)
    if isinstance(block, SkippedSubBlock):
        return
    device = next(block.parameters()).device
    dtype = next(block.parameters()).dtype
    _set_submodule(layer, block_path, SkippedSubBlock(hidden_size, attention).to(device=device, dtype=dtype))
    _set_submodule(layer, norm_path, nn.Identity())


def set_head_counts(attention: Any, n_heads: int, n_kv: int) -> None:
    """Per-layer head counts for an attention module that splits a fused qkv output by its config's counts
    (Phi-3 reads ``config.num_attention_heads`` and ``num_key_value_heads``): a private config copy per layer."""
    config = copy.copy(attention.config)
    config.num_attention_heads, config.num_key_value_heads = n_heads, n_kv
    attention.config = config
    attention.num_key_value_heads = n_kv


def fused_head_counts(model: nn.Module, layers_path: str, fused: list[str]) -> None:
    """Give each attention with a fused qkv its head counts from the (resized) shapes: ``fused`` = [attention
    path, qkv path, o path]; n_q = o.in / head_dim, n_kv = (qkv.out − o.in) / (2 · head_dim)."""
    attn_path, qkv_path, o_path = fused
    for layer in model.get_submodule(layers_path):  # type: ignore[attr-defined]
        attention = layer.get_submodule(attn_path)
        if isinstance(attention, SkippedSubBlock):
            continue
        head_dim = attention.head_dim
        q_width = layer.get_submodule(o_path).in_features
        n_kv = (layer.get_submodule(qkv_path).out_features - q_width) // (2 * head_dim)
        set_head_counts(attention, q_width // head_dim, n_kv)


def resize_layers(model: nn.Module, layer_shapes: list[dict[str, list[int]]], layers_path: str) -> None:
    """Give each listed linear of layer i the shape ``[out_features, in_features, has_bias]`` recorded for it."""
    layers = model.get_submodule(layers_path)
    for layer, shapes in zip(layers, layer_shapes, strict=True):  # type: ignore[call-overload]
        for path, (out_features, in_features, has_bias) in shapes.items():
            old = layer.get_submodule(path)
            if (old.out_features, old.in_features, old.bias is not None) == (
                out_features,
                in_features,
                bool(has_bias),
            ):
                continue
            new = nn.Linear(
                in_features,
                out_features,
                bias=bool(has_bias),
                device=old.weight.device,
                dtype=old.weight.dtype,
            )
            _set_submodule(layer, path, new)


class SecateursMixin:
    """Resizes the base model's layers after it is built (before weights are loaded)."""

    def __init__(self, config, *args, **kwargs):
        quantization = getattr(config, "quantization_config", None)
        if quantization is not None and not HAVE_SECATEURS_QUANT:
            raise ImportError(
                "this checkpoint holds Secateurs packed (quantized) weights: `pip install secateurs` to load it, "
                "or export it with `export: dequantized`"
            )
        super().__init__(config, *args, **kwargs)
        skipped = getattr(config, "secateurs_skipped", None)
        linear = getattr(config, "secateurs_linear", None) or [{}] * len(skipped or [])
        if skipped:
            layers = self.get_submodule(config.secateurs_layers_path)
            sub_blocks = config.secateurs_sub_blocks  # {"attn": [block path, norm path], "mlp": [...]}
            for index, names in enumerate(skipped):
                for name in names:
                    block_path, norm_path = sub_blocks[name]
                    if name in linear[index]:  # linear replacement: the pre-norm stays
                        block = LinearSubBlock(config.hidden_size, name == "attn", int(linear[index][name]))
                        _set_submodule(layers[index], block_path, block)
                    else:
                        skip_sub_block(layers[index], block_path, norm_path, config.hidden_size, name == "attn")
        resize_layers(self, config.secateurs_layers, config.secateurs_layers_path)
        fused = getattr(config, "secateurs_fused_qkv", None)
        if fused:
            fused_head_counts(self, config.secateurs_layers_path, fused)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As transformers' ``from_pretrained``, except that a tensor missing from the checkpoint is an error:
        transformers would initialise it randomly and load a model that silently computes garbage."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ValueError(f"the checkpoint lacks tensor {missing[0]!r}{more}: refusing to initialise it randomly")
        return (model, info) if wants_info else model


def make_model_class(base_architecture: str) -> type:
    """``SecateursForCausalLM`` on top of ``transformers.<base_architecture>`` (one of SUPPORTED_ARCHITECTURES)."""
    if base_architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architecture {str(base_architecture)[:80]!r} is not supported; expected one of {SUPPORTED_ARCHITECTURES}"
        )
    base = getattr(transformers, base_architecture)
    return type("SecateursForCausalLM", (SecateursMixin, base), {"__module__": __name__})


SecateursForCausalLM = make_model_class(BASE_ARCHITECTURE)
