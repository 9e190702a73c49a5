"""Quantize step: decoder linears → packed :class:`quant.qlinear.QuantLinear` (glue; the math is in ``quant``).

With ``activation_aware`` the per-group datatype choice weights the error by the input-channel second moments
E[x_j²] collected by the shared calibration engine; layers are quantized as the engine passes them, so each layer's
statistics come from the already-quantized layers before it.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor, nn

from compress.adapters import Arch, decoder_layers, linear_at, present_linears, set_submodule
from compress.calibration import LayerStats, calibrate_layerwise
from compress.recipe import QuantizeConfig
from quant.qlinear import QuantLinear
from quant.quantize import quantize_linear


def module_settings(cfg: QuantizeConfig, full_name: str) -> tuple[str, int | None]:
    """(datatype set, group size) for one linear: the first matching override, else the step's defaults."""
    for override in cfg.overrides:
        if re.search(override.match, full_name):
            return override.dtypes or cfg.dtypes, override.group_size or cfg.group_size
    return cfg.dtypes, cfg.group_size


def target_paths(cfg: QuantizeConfig, arch: Arch, layer: nn.Module) -> list[str]:
    """Paths (inside ``layer``) of the linears to quantize (a skipped sub-block has none)."""
    return [path for path in present_linears(layer, arch) if re.search(cfg.modules, path)]


def _quantize_layer(
    layer: nn.Module, index: int, arch: Arch, cfg: QuantizeConfig, stats: LayerStats | None, record: dict[str, Any]
) -> None:
    for path in target_paths(cfg, arch, layer):
        full = f"{arch.layers}.{index}.{path}"
        dtypes, group_size = module_settings(cfg, full)
        weights = stats[path].mean_sq.float() if stats is not None else None
        qlinear = quantize_linear(linear_at(layer, path), dtypes, group_size, cfg.shrink_factors, weights)
        set_submodule(layer, path, qlinear)
        record[full] = dtypes


def quantize_model(
    model: nn.Module,
    arch: Arch,
    cfg: QuantizeConfig,
    calibration_ids: Tensor | None,
    batch_size: int = 8,
    device: str | None = None,
) -> dict[str, Any]:
    """Quantize the targeted linears of every decoder layer in place; returns {full name: datatype set}."""
    record: dict[str, str] = {}
    layers = decoder_layers(model, arch)
    if not cfg.activation_aware:
        for index, layer in enumerate(layers):
            _quantize_layer(layer, index, arch, cfg, None, record)
        return record
    if calibration_ids is None:
        raise ValueError("activation-aware quantization needs calibration data")

    def watch(_index: int, layer: nn.Module) -> dict[str, nn.Linear]:
        return {path: linear_at(layer, path) for path in target_paths(cfg, arch, layer)}

    def quantize_after(index: int, layer: nn.Module, stats: LayerStats) -> bool:
        _quantize_layer(layer, index, arch, cfg, stats, record)
        return True

    calibrate_layerwise(model, arch, calibration_ids, watch, quantize_after, batch_size, device, "quantizing")
    return record


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def dequantize_model(model: nn.Module) -> None:
    """Replace every QuantLinear by an nn.Linear holding its dequantized fp32 weight (``export: dequantized``)."""
    for name, module in quant_linears(model).items():
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight.data = module.dequantized_weight().to(module.scales.device)
        if module.bias is not None:
            linear.bias.data = module.bias.float().clone()
        set_submodule(model, name, linear)


def weight_storage(model: nn.Module) -> dict[str, Any]:
    """Bits per quantized weight, counting planes, scales, type ids, zero points and per-layer tables."""
    modules = quant_linears(model)
    weights = sum(m.in_features * m.out_features for m in modules.values())
    bits = sum(
        8 * sum(t.numel() * t.element_size() for n, t in m.named_buffers() if n != "bias") for m in modules.values()
    )
    return {"quantized_weights": weights, "bits_per_weight": bits / weights if weights else None}
