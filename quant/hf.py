"""transformers integration: a quantization config and an ``HfQuantizer`` for Secateurs' packed checkpoints.

``config.json["quantization_config"]`` = {"quant_method": "secateurs_bitmod", "modules": {name: spec}} where spec
gives in/out features, bits, group size, number of datatypes, zero points, bias and the datatype-set name. Before
weights load, the quantizer swaps each listed ``nn.Linear`` for an empty :class:`QuantLinear` of that spec; the
packed tensors then load by name. Importing this module (``import quant`` does) registers both with transformers.

Without the registration transformers would only warn about an unknown ``quant_method`` and skip it; our packed
planes are stored under ``weight`` with a different shape, so such a load stops with a size-mismatch error
instead of producing garbage.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from quant.qlinear import QuantLinear

QUANT_METHOD = "secateurs_bitmod"


def module_spec(module: QuantLinear, dtypes: str) -> dict[str, Any]:
    """What the loader needs to rebuild ``module`` before its tensors load."""
    return {
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bits": module.bits,
        "group_size": module.group_size,
        "n_types": int(module.tables.shape[0]),
        "zeros": module.has_zeros,
        "bias": module.bias is not None,
        "dtypes": dtypes,
    }


def empty_quant_linear(spec: dict[str, Any], device: torch.device | str | None = None) -> QuantLinear:
    return QuantLinear.empty(
        spec["in_features"],
        spec["out_features"],
        spec["bits"],
        spec["group_size"],
        spec["n_types"],
        spec["zeros"],
        bias_dtype=torch.float32 if spec["bias"] else None,
        device=device,
    )


def replace_with_quant_linears(model: nn.Module, modules: dict[str, dict[str, Any]]) -> None:
    """Swap every module named in ``modules`` for an empty QuantLinear of its spec (on the module's device)."""
    for name, spec in modules.items():
        old = model.get_submodule(name)
        weight = getattr(old, "weight", None)
        device = weight.device if isinstance(weight, torch.Tensor) else None
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, empty_quant_linear(spec, device))


class SecateursQuantConfig(QuantizationConfigMixin):
    """Per-module packed-format specs of a Secateurs-quantized checkpoint."""

    def __init__(self, modules: dict[str, dict[str, Any]] | None = None, format_version: int = 1, **kwargs: Any):
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]  # ours is not in transformers' enum
        self.modules = dict(modules or {})
        self.format_version = format_version

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version, "modules": self.modules}


class SecateursHfQuantizer(HfQuantizer):
    """Loads pre-quantized Secateurs checkpoints (quantizing on load is not supported: use a recipe)."""

    requires_calibration = True
    quantization_config: SecateursQuantConfig

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        replace_with_quant_linears(model, self.quantization_config.modules)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the config and quantizer with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(SecateursQuantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(SecateursHfQuantizer)


register()
