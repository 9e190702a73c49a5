"""Loader for Secateurs-pruned checkpoints (copied next to the weights; used through ``trust_remote_code``).

A pruned model has per-layer shapes: each decoder layer keeps its own number of KV groups (with g query heads
each) and its own MLP width, and may carry new o_proj / down_proj biases (FLAP bias compensation). A stock
``config.json`` cannot say that, and transformers (checked with 5.24) does not build Llama-family layers from
``per_layer_config``. This file builds the base architecture, then resizes each listed linear to the shape recorded
in ``config.secateurs_layers``; the weights then load under the base model's tensor names. Head counts need no
config change: attention infers them from the projection shapes and the query-heads-per-KV-head ratio is kept.

Self-contained on purpose (imports only torch and transformers): it must work without Secateurs installed.
"""

from __future__ import annotations

import transformers
from torch import nn

try:  # packed (quantized) checkpoints need Secateurs' quantizer; importing the package registers it
    import quant  # noqa: F401

    HAVE_SECATEURS_QUANT = True
except ImportError:  # pruned-only checkpoints load with transformers alone
    HAVE_SECATEURS_QUANT = False

BASE_ARCHITECTURE = "LlamaForCausalLM"  # rewritten by the Secateurs checkpoint writer


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, name, module)


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
        resize_layers(self, config.secateurs_layers, config.secateurs_layers_path)


def make_model_class(base_architecture: str) -> type:
    """``SecateursForCausalLM`` on top of ``transformers.<base_architecture>``."""
    base = getattr(transformers, base_architecture)
    return type("SecateursForCausalLM", (SecateursMixin, base), {"__module__": __name__})


SecateursForCausalLM = make_model_class(BASE_ARCHITECTURE)
