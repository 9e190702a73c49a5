"""``secateurs info``: per-layer shapes, parameter counts and bytes of a (possibly pruned) model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from compress.adapters import arch_for, attention_layout, decoder_layers
from compress.prune.pruner import count_parameters, prunable_parameters


def describe(model: nn.Module, folder: Path | None = None) -> dict[str, Any]:
    arch = arch_for(model.config)
    layers = []
    for index, layer in enumerate(decoder_layers(model, arch)):
        layout = attention_layout(model.config, layer, arch)
        layers.append({
            "layer": index,
            "q_heads": layout.n_q,
            "kv_heads": layout.n_kv,
            "intermediate": int(layer.get_submodule(arch.down).in_features),
            "o_bias": layer.get_submodule(arch.o).bias is not None,
            "down_bias": layer.get_submodule(arch.down).bias is not None,
            "params": sum(p.numel() for p in layer.parameters()),
        })
    unique = {id(p): p for p in model.parameters()}.values()
    tensor_bytes = sum(p.numel() * p.element_size() for p in unique)
    out: dict[str, Any] = {
        "architecture": model.config.architectures[0],
        "params": count_parameters(model),
        "prunable_params": prunable_parameters(model, arch),
        "tensor_bytes": tensor_bytes,
        "layers": layers,
    }
    if folder is not None:
        out["bytes_on_disk"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return out


def format_description(d: dict[str, Any]) -> str:
    lines = [
        f"architecture: {d['architecture']}",
        f"parameters: {d['params']:,} (prunable decoder linears: {d['prunable_params']:,})",
        f"tensor bytes: {d['tensor_bytes']:,}" + (f"; on disk: {d['bytes_on_disk']:,}" if "bytes_on_disk" in d else ""),
        "",
        "layer  q_heads  kv_heads  intermediate  o_bias  down_bias      params",
    ]
    for row in d["layers"]:
        lines.append(
            f"{row['layer']:5d}  {row['q_heads']:7d}  {row['kv_heads']:8d}  {row['intermediate']:12d}  "
            f"{row['o_bias']!s:6}  {row['down_bias']!s:9}  {row['params']:10,d}"
        )
    return "\n".join(lines)
