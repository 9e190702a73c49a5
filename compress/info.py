"""``secateurs info``: per-layer shapes, parameter counts, bits per weight and bytes of a (possibly compressed)
model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from compress.adapters import arch_for, attention_layout, decoder_layers, is_skipped, linear_shape, model_config
from compress.metrics import count_parameters, prunable_parameters, tensor_bytes
from compress.quantize import quant_linears, weight_storage


def describe(model: nn.Module, folder: Path | None = None) -> dict[str, Any]:
    arch = arch_for(model_config(model))
    layers = []
    for index, layer in enumerate(decoder_layers(model, arch)):
        layout = attention_layout(model_config(model), layer, arch)
        attn, mlp = is_skipped(layer, arch, "attn"), is_skipped(layer, arch, "mlp")
        layers.append(
            {
                "layer": index,
                "q_heads": layout.n_q,
                "kv_heads": layout.n_kv,
                "intermediate": 0 if mlp else linear_shape(layer, arch.down)[1],
                "o_bias": None if attn else linear_shape(layer, arch.o)[2],
                "down_bias": None if mlp else linear_shape(layer, arch.down)[2],
                "params": count_parameters(layer),
            }
        )
    out: dict[str, Any] = {
        "architecture": model_config(model).architectures[0],
        "params": count_parameters(model),
        "prunable_params": prunable_parameters(model, arch),
        "tensor_bytes": tensor_bytes(model),
        "quantized_linears": len(quant_linears(model)),
        **weight_storage(model),
        "layers": layers,
    }
    if folder is not None:
        out["bytes_on_disk"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return out


def format_description(d: dict[str, Any]) -> str:
    lines = [
        f"architecture: {d['architecture']}",
        f"parameters: {d['params']:,} (prunable decoder linears: {d['prunable_params']:,})",
        f"tensor bytes in memory: {d['tensor_bytes']:,}"
        + (f"; safetensors on disk: {d['bytes_on_disk']:,}" if "bytes_on_disk" in d else ""),
    ]
    if d["quantized_linears"]:
        lines.append(
            f"quantized linears: {d['quantized_linears']} holding {d['quantized_weights']:,} weights at "
            f"{d['bits_per_weight']:.4f} bits/weight (codes + scales + type ids + zero points + tables)"
        )
    lines += ["", "layer  q_heads  kv_heads  intermediate  o_bias  down_bias      params"]
    for row in d["layers"]:
        lines.append(
            f"{row['layer']:5d}  {row['q_heads']:7d}  {row['kv_heads']:8d}  {row['intermediate']:12d}  "
            f"{_flag(row['o_bias']):6}  {_flag(row['down_bias']):9}  {row['params']:10,d}"
        )
    return "\n".join(lines)


def _flag(value: bool | None) -> str:
    """A bias flag, or "skipped" for a removed sub-block."""
    return "skipped" if value is None else str(value)
