"""GGUF export for llama.cpp: plain and pruned Llama-family checkpoints (``secateurs export DIR --to gguf``).

Uniform models are written as llama.cpp's ``llama`` architecture; per-layer shapes and skipped sub-blocks as
``deci`` (see :mod:`compress.export.layout` for the mapping and why it is exact). Packed (quantized) checkpoints
are dequantized first; the GGUF ``--type`` then applies to the 2-D weights (norms and biases stay f32). A
quantized type needs rows that are a multiple of its block (32); a pruned MLP width may not be, so such tensors
fall back to f16 (logged, as llama.cpp's own converter does).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import Tensor, nn

from compress.adapters import Arch, arch_for, decoder_layers, is_skipped, linear_at
from compress.export.layout import LayerPlan, LayerShape, is_uniform, plan_layers, rope_permute
from compress.export.vocab import add_tokenizer
from quant.errors import InputError

log = logging.getLogger("secateurs")

Q = gguf.GGMLQuantizationType
# The types the gguf package quantizes itself (checked against llama.cpp by scripts/gguf_check.py).
GGUF_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (Q.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (Q.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM")  # SiLU-gated MLP, RMSNorm, rotate-half RoPE


def check_config(config: Any) -> None:
    """Refuse what the llama/deci graphs cannot run (a clear error naming the config field)."""
    name = (getattr(config, "architectures", None) or [None])[0]
    if name not in SUPPORTED:
        raise InputError(f"config.architectures[0] = {name!r}: GGUF export supports {list(SUPPORTED)}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise InputError(f"config rope_type {rope.get('rope_type')!r}: GGUF export supports default RoPE only")
    if getattr(config, "sliding_window", None):
        raise InputError(f"config.sliding_window = {config.sliding_window}: GGUF export needs full attention")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise InputError(f"config.hidden_act = {config.hidden_act!r}: GGUF export supports silu")


def _weight(root: nn.Module, path: str) -> Tensor:
    weight = root.get_submodule(path).weight
    assert isinstance(weight, Tensor)
    return weight


def _bias(module: nn.Module) -> Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach()


def layer_shape(layer: nn.Module, arch: Arch, head_dim: int) -> LayerShape:
    """Counts and output biases of one decoder layer (skipped blocks: their constant)."""
    if is_skipped(layer, arch, "attn"):
        n_head = n_kv = 0
        attn_bias = _bias(layer.get_submodule(arch.attn))
    else:
        n_head = linear_at(layer, arch.q).out_features // head_dim
        n_kv = linear_at(layer, arch.k).out_features // head_dim
        attn_bias = _bias(linear_at(layer, arch.o))
    if is_skipped(layer, arch, "mlp"):
        n_ff, mlp_bias = 0, _bias(layer.get_submodule(arch.mlp))
    else:
        n_ff, mlp_bias = linear_at(layer, arch.gate).out_features, _bias(linear_at(layer, arch.down))
    return LayerShape(n_head, n_kv, n_ff, attn_bias, mlp_bias)


def layer_tensors(layer: nn.Module, arch: Arch, plan: LayerPlan, head_dim: int, hidden: int, i: int) -> Iterator[
    tuple[str, Tensor]
]:
    """(GGUF name, tensor in Hugging Face [out, in] layout) of decoder layer ``i``."""
    blk = f"blk.{i}"
    if plan.n_head > 0:
        yield f"{blk}.attn_norm.weight", _weight(layer, arch.attn_norm)
        for path, name, permute in ((arch.q, "attn_q", True), (arch.k, "attn_k", True), (arch.v, "attn_v", False)):
            linear = linear_at(layer, path)
            yield f"{blk}.{name}.weight", rope_permute(linear.weight, head_dim) if permute else linear.weight
            if linear.bias is not None:
                yield f"{blk}.{name}.bias", rope_permute(linear.bias, head_dim) if permute else linear.bias
        yield f"{blk}.attn_output.weight", linear_at(layer, arch.o).weight
        if plan.attn_out_bias is not None:
            yield f"{blk}.attn_output.bias", plan.attn_out_bias
    if plan.mlp_stub:
        yield f"{blk}.ffn_norm.weight", torch.ones(hidden)
        yield f"{blk}.ffn_gate.weight", torch.zeros(plan.n_ff, hidden)
        yield f"{blk}.ffn_up.weight", torch.zeros(plan.n_ff, hidden)
        yield f"{blk}.ffn_down.weight", torch.zeros(hidden, plan.n_ff)
    elif plan.n_ff > 0:
        yield f"{blk}.ffn_norm.weight", _weight(layer, arch.mlp_norm)
        for path, name in ((arch.gate, "ffn_gate"), (arch.up, "ffn_up"), (arch.down, "ffn_down")):
            linear = linear_at(layer, path)
            yield f"{blk}.{name}.weight", linear.weight
            if linear.bias is not None and name != "ffn_down":
                yield f"{blk}.{name}.bias", linear.bias
    if plan.ffn_down_bias is not None:
        yield f"{blk}.ffn_down.bias", plan.ffn_down_bias


def encode(tensor: Tensor, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A tensor as GGUF data: 1-D in f32; 2-D in ``qtype``, or f16 when its rows do not fill whole blocks."""
    data = tensor.detach().to(torch.float32).cpu().numpy()
    if data.ndim == 1 or qtype == Q.F32:
        return data, Q.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        qtype = Q.F16
    return gguf.quants.quantize(data, qtype), qtype


def model_tensors(model: nn.Module, arch: Arch, plans: list[LayerPlan], head_dim: int) -> Iterator[
    tuple[str, Tensor]
]:
    config: Any = model.config
    embed = _weight(model, arch.embed)
    yield "token_embd.weight", embed
    for i, (layer, plan) in enumerate(zip(decoder_layers(model, arch), plans, strict=True)):
        yield from layer_tensors(layer, arch, plan, head_dim, config.hidden_size, i)
    yield "output_norm.weight", _weight(model, arch.final_norm)
    head = _weight(model, arch.lm_head)
    if not (getattr(config, "tie_word_embeddings", False) or head.data_ptr() == embed.data_ptr()):
        yield "output.weight", head


def _add_hparams(writer: gguf.GGUFWriter, config: Any, plans: list[LayerPlan], uniform: bool, head_dim: int) -> None:
    def per_layer(values: list[int]) -> int | list[int]:
        return values[0] if uniform else values

    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_block_count(len(plans))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(per_layer([p.n_ff for p in plans]))
    writer.add_head_count(per_layer([p.n_head for p in plans]))
    writer.add_head_count_kv(per_layer([p.n_kv for p in plans]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))


def write_gguf(model: nn.Module, folder: Path, out: Path, type_name: str = "f16") -> dict[str, Any]:
    """Write ``model`` (loaded from checkpoint ``folder``, whose tokenizer is carried over) to ``out``.

    Returns a summary: architecture, per-layer counts, tensor types, notes on folded constants and stubs.
    """
    if type_name not in GGUF_TYPES:
        raise InputError(f"--type {type_name!r}: expected one of {sorted(GGUF_TYPES)}")
    qtype, file_type = GGUF_TYPES[type_name]
    config: Any = model.config
    check_config(config)
    arch = arch_for(config)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    shapes = [layer_shape(layer, arch, head_dim) for layer in decoder_layers(model, arch)]
    if shapes[0].n_kv == 0:
        raise InputError("layer 0's attention is skipped: llama.cpp reads the head dimensions from layer 0")
    uniform = is_uniform(shapes)
    plans = plan_layers(shapes)
    arch_name = "llama" if uniform else "deci"
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch_name)
    types: dict[str, str] = {}
    fallbacks = []
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(str(getattr(config, "_name_or_path", "") or folder.name))
        _add_hparams(writer, config, plans, uniform, head_dim)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab = add_tokenizer(writer, folder, int(config.vocab_size))
        with torch.no_grad():
            for name, tensor in model_tensors(model, arch, plans, head_dim):
                data, written = encode(tensor, qtype)
                if data.ndim > 1 and written != qtype:
                    fallbacks.append(name)
                writer.add_tensor(name, data, raw_dtype=written)
                types[name] = written.name
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    if fallbacks:
        log.info("%d tensors written as f16 (rows not a multiple of the %s block): %s", len(fallbacks), type_name,
                 ", ".join(fallbacks[:4]) + (" …" if len(fallbacks) > 4 else ""))
    notes = [f"layer {i}: {note}" for i, p in enumerate(plans) for note in p.notes]
    for note in notes:
        log.info("%s", note)
    return {
        "file": str(out),
        "architecture": arch_name,
        "type": type_name,
        "layers": [{"n_head": p.n_head, "n_kv": p.n_kv, "n_ff": p.n_ff} for p in plans],
        "tensor_types": types,
        "f16_fallbacks": fallbacks,
        "notes": notes,
        "tokenizer": vocab,
    }


def export_gguf(
    folder: Path, out: Path | None = None, type_name: str = "f16", overwrite: bool = False
) -> dict[str, Any]:
    """``secateurs export DIR --to gguf``: load the checkpoint (fp32; packed layers dequantized) and write GGUF."""
    from compress.loading import load_model
    from compress.quantize import dequantize_model, quant_linears

    if type_name not in GGUF_TYPES:
        raise InputError(f"--type {type_name!r}: expected one of {sorted(GGUF_TYPES)}")
    out = out or Path(f"{str(folder).rstrip('/')}.{type_name}.gguf")
    if out.exists() and not overwrite:
        raise InputError(f"output {str(out)!r} already exists (add --overwrite)")
    loaded = load_model(str(folder), dtype=torch.float32)
    if loaded.path is None:
        raise InputError(f"export needs a local model directory or GGUF file, got {str(folder)!r}")
    model = loaded.model
    if quant_linears(model):
        log.info("dequantizing packed layers before the GGUF export")
        dequantize_model(model, torch.float32)
    return write_gguf(model, loaded.path, out, type_name)
