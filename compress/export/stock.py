"""Stock configs: a pruned checkpoint whose layers all keep the same shapes loads without remote code.

When every decoder layer keeps the same head counts and MLP width and no sub-block is skipped (FLAP's uniform
structures UL-UM, Wanda-sp, plain or quantized-only models), the pruned model *is* a smaller instance of its base
architecture: ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size`` and ``head_dim`` say it all,
and plain ``AutoModelForCausalLM.from_pretrained(dir)`` (also TGI, vLLM) builds it.

Biases (FLAP's compensation biases on o_proj / down_proj) need a config field that switches them on. The fields
switch on a *group* of linears, so the others of the group get zero biases (exact: adding zero changes nothing):

| architecture | field → linears with a bias | FLAP's o_proj / down_proj biases |
|---|---|---|
| Llama | ``attention_bias`` → q, k, v, o; ``mlp_bias`` → gate, up, down | both fit |
| Qwen3 | ``attention_bias`` → q, k, v, o | o_proj fits; down_proj does not |
| Qwen2 | none (q, k, v always biased) | neither fits |
| Mistral | none | neither fits |

A bias that no field covers keeps the remote-code config (``auto_map`` + ``modeling_secateurs.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from compress.adapters import Arch

# architecture → {config field: the linears (Arch attribute names) it gives a bias}
BIAS_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    "LlamaForCausalLM": {"attention_bias": ("q", "k", "v", "o"), "mlp_bias": ("gate", "up", "down")},
    "Qwen3ForCausalLM": {"attention_bias": ("q", "k", "v", "o")},
    "Qwen2ForCausalLM": {},
    "MistralForCausalLM": {},
}
BUILT_IN_BIASES: dict[str, tuple[str, ...]] = {"Qwen2ForCausalLM": ("q", "k", "v")}


@dataclass
class StockConfig:
    """The outcome: ``config`` (None = keep remote code, ``reason`` says why) and the zero biases to add."""

    config: dict[str, Any] | None
    reason: str = ""
    zero_biases: dict[str, int] = field(default_factory=dict)  # full tensor name → length


def stock_config(
    config: dict[str, Any], arch: Arch, shapes: list[dict[str, list[int]]], skipped: list[list[str]]
) -> StockConfig:
    """A standard config for a model with per-layer ``shapes`` ({linear path: [out, in, has_bias]}) if one fits."""
    base = config["architectures"][0]
    if any(skipped):
        return StockConfig(None, "sub-blocks are skipped")
    if any(s != shapes[0] for s in shapes):
        return StockConfig(None, "layers have different shapes")
    if base not in BIAS_FIELDS:
        return StockConfig(None, f"no bias table for {base}")
    names = {getattr(arch, kind): kind for kind in ("q", "k", "v", "o", "gate", "up", "down")}
    biased = {names[path] for path, (_, _, has_bias) in shapes[0].items() if has_bias}
    fields = {name: kinds for name, kinds in BIAS_FIELDS[base].items() if biased & set(kinds)}
    covered = set(BUILT_IN_BIASES.get(base, ())).union(*fields.values())
    if biased - covered:
        missing = ", ".join(sorted(getattr(arch, kind) for kind in biased - covered))
        return StockConfig(None, f"{base} has no config field for a bias on {missing}")
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    layer = shapes[0]
    new = dict(config)
    new.update(
        num_attention_heads=layer[arch.q][0] // head_dim,
        num_key_value_heads=layer[arch.k][0] // head_dim,
        intermediate_size=layer[arch.gate][0],
        head_dim=head_dim,
    )
    for name in BIAS_FIELDS[base]:
        new[name] = name in fields
    zero_biases: dict[str, int] = {}
    new_shapes = []
    for index, layer_shape in enumerate(shapes):
        row = {}
        for path, (out_features, in_features, has_bias) in layer_shape.items():
            needs = names[path] in covered
            if needs and not has_bias:
                zero_biases[f"{arch.layers}.{index}.{path}.bias"] = out_features
            row[path] = [out_features, in_features, int(has_bias or needs)]
        new_shapes.append(row)
    if zero_biases and config.get("quantization_config"):
        return StockConfig(None, "packed layers would need added zero biases")
    new["secateurs_layers"] = new_shapes
    new.pop("auto_map", None)
    return StockConfig(new, zero_biases=zero_biases)


def add_zero_biases(folder: Path, zero_biases: dict[str, int]) -> None:
    """Add zero bias tensors (in the dtype of their weight) to the safetensors files of ``folder``."""
    if not zero_biases:
        return
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    files = sorted(folder.glob("*.safetensors"))
    for path in files:
        tensors = load_file(str(path))
        added = {
            name: torch.zeros(length, dtype=tensors[name[: -len("bias")] + "weight"].dtype)
            for name, length in zero_biases.items()
            if name[: -len("bias")] + "weight" in tensors
        }
        if not added:
            continue
        save_file({**tensors, **added}, str(path), metadata={"format": "pt"})
        if index is not None:
            index["weight_map"].update({name: path.name for name in added})
    if index is not None:
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
