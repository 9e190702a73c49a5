"""Quantize step: decoder linears → packed :class:`quant.qlinear.QuantLinear` (glue; the math is in ``quant``).

``method``: rtn needs no data. gptq, awq and awq+gptq (and ``type_choice: ex2_weighted``) run the shared
calibration engine: each decoder layer sees inputs from the already-quantized layers before it; its inputs give
E[x_j²], GPTQ's H = 2XXᵀ/N (float64) and a token sample for AWQ. AWQ folds its per-channel scales into the
producer of each input (the pre-norm, v_proj for o_proj when the shapes match, up_proj for down_proj; see
:func:`awq_pairs`), so nothing extra is stored, and transforms the statistics accordingly (x → x/s).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from compress.adapters import Arch, decoder_layers, linear_at, present_linears, set_submodule
from compress.calibration import ChannelStats, HessianStats, LayerStats, calibrate_layerwise
from compress.recipe import QuantizeConfig
from quant.awq import apply_clip, search_clip, search_scales
from quant.qlinear import QuantLinear
from quant.quantize import quantize_linear
from quant.select import quantize_dequantize


def module_settings(cfg: QuantizeConfig, full_name: str) -> tuple[str, int | None]:
    """(datatype set, group size) for one linear: the first matching override, else the step's defaults."""
    for override in cfg.overrides:
        if re.search(override.match, full_name):
            return override.dtypes or cfg.dtypes, override.group_size or cfg.group_size
    return cfg.dtypes, cfg.group_size


def target_paths(cfg: QuantizeConfig, arch: Arch, layer: nn.Module) -> list[str]:
    """Paths (inside ``layer``) of the linears to quantize (a skipped sub-block has none)."""
    return [path for path in present_linears(layer, arch) if re.search(cfg.modules, path)]


def shared_inputs(arch: Arch) -> list[tuple[str, ...]]:
    """Linears that read the same input tensor (the first one is watched for all of them)."""
    return arch.input_groups


def awq_pairs(arch: Arch) -> list[tuple[str, tuple[str, ...]]]:
    """(producer, consumers): where AWQ's input-channel scales fold (producer output channel j ÷ s_j)."""
    return arch.scale_producers


def _representative(arch: Arch, path: str) -> str:
    return next(group[0] for group in shared_inputs(arch) if path in group)


def fold_scales(producer: nn.Module, consumers: list[nn.Linear], s: Tensor, norm_offset: float = 0.0) -> None:
    """producer output channel j ÷ s_j, consumer input column j × s_j: the float function is unchanged. A norm
    whose scale is (offset + w) (Gemma: 1 + w) gets w' = (offset + w) / s − offset."""
    with torch.no_grad():
        weight = producer.weight
        assert isinstance(weight, Tensor)
        if weight.dim() == 1 and norm_offset:
            weight.copy_((weight.double() + norm_offset) / s.double() - norm_offset)
        else:
            view = s if weight.dim() == 1 else s.unsqueeze(1)
            weight.div_(view.to(weight.dtype))
        bias = getattr(producer, "bias", None)
        if isinstance(bias, Tensor):
            bias.div_(s.to(bias.dtype))
        for linear in consumers:
            linear.weight.mul_(s.to(linear.weight.dtype))


def _fake_quant(dtypes: str, group_size: int | None, cfg: QuantizeConfig) -> Any:
    return lambda w: quantize_dequantize(w, dtypes, group_size, cfg.shrink_factors)


def _apply_awq(layer: nn.Module, index: int, arch: Arch, cfg: QuantizeConfig, stats: LayerStats) -> dict[str, Tensor]:
    """Scale search + fold for every pair, then clip search; returns {watched path: input scale s}."""
    targets, present = set(target_paths(cfg, arch, layer)), set(present_linears(layer, arch))
    scales: dict[str, Tensor] = {}
    for producer_path, consumers in awq_pairs(arch):
        used = [p for p in consumers if p in present]
        chosen = [p for p in used if p in targets]
        producer = layer.get_submodule(producer_path) if producer_path in present or "." not in producer_path else None
        rep = _representative(arch, consumers[0])
        if not chosen or producer is None or rep not in stats:
            continue
        width = int(producer.get_parameter("weight").shape[0])
        if any(linear_at(layer, p).in_features != width for p in used):
            continue  # grouped-query attention: v_proj has fewer output channels than o_proj has inputs
        stat = stats[rep]
        assert isinstance(stat, HessianStats)
        settings = [module_settings(cfg, f"{arch.layers}.{index}.{p}") for p in chosen]
        weights = [linear_at(layer, p).weight.detach() for p in chosen]
        s, _alpha = search_scales(stat.sample, weights, [_fake_quant(d, g, cfg) for d, g in settings], cfg.awq_grid)
        fold_scales(producer, [linear_at(layer, p) for p in used], s, arch.norm_offset)
        scales[rep] = s
    if cfg.awq_clip:
        for path in sorted(targets - set(arch.score_linears)):  # AWQ does not clip q/k (attention scores)
            rep = _representative(arch, path)
            stat = stats[rep]
            assert isinstance(stat, HessianStats)
            x = stat.sample[:512] / scales.get(rep, torch.ones(stat.channels))
            dtypes, group = module_settings(cfg, f"{arch.layers}.{index}.{path}")
            linear = linear_at(layer, path)
            g = group or linear.in_features
            max_val = search_clip(linear.weight.detach(), x, _fake_quant(dtypes, group, cfg), g, cfg.awq_grid)
            with torch.no_grad():
                linear.weight.copy_(apply_clip(linear.weight, max_val, g))
    return scales


def _quantize_layer(
    layer: nn.Module, index: int, arch: Arch, cfg: QuantizeConfig, stats: LayerStats | None, record: dict[str, Any]
) -> None:
    scales = _apply_awq(layer, index, arch, cfg, stats) if stats is not None and "awq" in cfg.method else {}
    for path in target_paths(cfg, arch, layer):
        full = f"{arch.layers}.{index}.{path}"
        dtypes, group_size = module_settings(cfg, full)
        stat = stats[_representative(arch, path)] if stats is not None else None
        s = scales.get(_representative(arch, path))
        weights = hessian = None
        if stat is not None and cfg.type_choice == "ex2_weighted":
            weights = (stat.mean_sq if s is None else stat.mean_sq / s.double().square()).float()
        if isinstance(stat, HessianStats) and "gptq" in cfg.method:
            hessian = stat.hessian if s is None else stat.hessian / torch.outer(s, s).double()
        qlinear = quantize_linear(
            linear_at(layer, path), dtypes, group_size, cfg.shrink_factors, weights,
            hessian=hessian, damp=cfg.damp, act_order=cfg.act_order, scale_bits=cfg.scale_bits, compact_storage=True,
        )  # fmt: skip
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
        raise ValueError(f"quantize method {cfg.method!r} / type_choice {cfg.type_choice!r} needs calibration data")

    def watch(_index: int, layer: nn.Module) -> dict[str, nn.Linear]:
        reps = {_representative(arch, path) for path in target_paths(cfg, arch, layer)}
        return {path: linear_at(layer, path) for path in sorted(reps)}

    cached: list[QuantLinear] = []  # the layer just quantized: its Ŵ is dequantized once for the engine's pass

    def quantize_after(index: int, layer: nn.Module, stats: LayerStats) -> bool:
        _quantize_layer(layer, index, arch, cfg, stats, record)
        stats.clear()  # free the Hessians and samples (the engine keeps every layer's stats)
        _cache_weights(cached, [m for m in layer.modules() if isinstance(m, QuantLinear)])
        return True

    def factory(channels: int) -> ChannelStats:
        if cfg.method == "rtn":
            return ChannelStats(channels)
        return HessianStats(channels, cfg.awq_tokens if "awq" in cfg.method else 0)

    calibrate_layerwise(
        model, arch, calibration_ids, watch, quantize_after, batch_size, device, "quantizing", stats_factory=factory
    )
    _cache_weights(cached, [])
    return record


def _cache_weights(cached: list[QuantLinear], layers: list[QuantLinear]) -> None:
    """Drop the previous layer's cached Ŵ, cache ``layers``' (:meth:`QuantLinear.cache_dequantized`: the same
    x @ Ŵᵀ the op computes for a calibration batch, without dequantizing Ŵ again for every mini-batch)."""
    for module in cached:
        module.cache_dequantized(False)
    for module in layers:
        module.cache_dequantized(True)
    cached[:] = layers


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def float_dtype(model: nn.Module) -> torch.dtype:
    """The model's own dtype: that of its float parameters (embeddings, norms; packed layers hold buffers only)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Replace every QuantLinear by an nn.Linear holding its dequantized weight (``export: dequantized``).

    The product is formed in fp32 and rounded once to ``dtype`` (default: the model's own dtype, so a bf16 or fp16
    model stays bf16/fp16 rather than doubling its size in fp32).
    """
    dtype = dtype or float_dtype(model)
    for name, module in quant_linears(model).items():
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
        linear.weight.data = module.dequantized_weight(torch.float32).to(module.scales.device, dtype)
        if module.bias is not None:
            linear.bias.data = module.bias.to(dtype).clone()
        set_submodule(model, name, linear)


def weight_storage(model: nn.Module) -> dict[str, Any]:
    """Bits per quantized weight as written: every tensor a checkpoint stores for the packed linears except their
    biases (bit planes and encoded metadata, :mod:`quant.storage`). ``file_bits_per_weight`` measures a real
    safetensors file of exactly those tensors (its JSON header included)."""
    modules = quant_linears(model)
    weights = sum(m.in_features * m.out_features for m in modules.values())
    if not weights:
        return {"quantized_weights": 0, "bits_per_weight": None, "file_bits_per_weight": None}
    tensors = {
        f"{name}.{key}": t.contiguous()
        for name, m in modules.items()
        for key, t in m.state_dict().items()
        if key != "bias"
    }
    data_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "quantized.safetensors"
        save_file(tensors, str(path))
        file_bytes = path.stat().st_size
    return {
        "quantized_weights": weights,
        "bits_per_weight": 8 * data_bytes / weights,
        "file_bits_per_weight": 8 * file_bytes / weights,
    }
