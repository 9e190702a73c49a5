"""A streamed run's checkpoint files and its reload check, one layer in memory at a time.

``save_weights`` writes what ``save_pretrained`` writes (config.json, generation_config.json, one
model.safetensors byte-identical to the in-memory path's) from the source's untouched tensors (embeddings, final
norm, head) and the staged compressed layers. ``reload_logits`` rebuilds the written checkpoint on the meta device
with its own loader class and packed-layer specs and runs the probe through it layer by layer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from compress.adapters import Arch, decoder_layers, model_config
from compress.calibration import capture_layer0_inputs, run_layer
from compress.stream.engine import Streamer, _Anchor
from compress.stream.source import (
    SAFETENSORS_DTYPES,
    TensorSource,
    load_state,
    materialize,
    persistent_tensors,
    release,
)
from compress.stream.writer import TensorEntry, write_streaming


def tied_head(model: nn.Module) -> bool:
    config = model_config(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


def outer_names(model: nn.Module, arch: Arch) -> list[str]:
    """Stored tensors outside the decoder layers (a tied head is stored once, as the embeddings)."""
    names = [n for n in persistent_tensors(model) if not n.startswith(f"{arch.layers}.")]
    if tied_head(model):
        names = [n for n in names if n != f"{arch.lm_head}.weight"]
    return names


def _entries(streamer: Streamer) -> list[TensorEntry]:
    model, source = streamer.model, streamer.source
    entries = []
    stored = persistent_tensors(model)
    shapes = {name: tuple(getattr(owner, attr).shape) for name, (owner, attr, _) in stored.items()}
    for name in outer_names(model, streamer.arch):
        kept = source.dtype(name)
        dtype = streamer.dtype if kept.is_floating_point else kept
        entries.append(TensorEntry(name, dtype, shapes[name], _converted(source, name, dtype)))
    for path in streamer.staged_files():
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                part = f.get_slice(name)
                shape, dtype = tuple(part.get_shape()), SAFETENSORS_DTYPES[part.get_dtype()]
                entries.append(TensorEntry(name, dtype, shape, _reader(path, name)))
    return entries


def _converted(source: TensorSource, name: str, dtype: torch.dtype) -> Callable[[], Tensor]:
    return lambda: source.get(name).to(dtype)


def _reader(path: Path, name: str) -> Callable[[], Tensor]:
    def read() -> Tensor:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)

    return read


def save_weights(streamer: Streamer) -> Callable[[Path], None]:
    """``folder`` → config.json, generation_config.json and model.safetensors, as ``save_pretrained`` writes them."""

    def save(folder: Path) -> None:
        model: Any = streamer.model
        model.config.dtype = str(streamer.dtype).removeprefix("torch.")
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(folder)
        if model.can_generate():
            model.generation_config.save_pretrained(folder)
        write_streaming(folder / "model.safetensors", _entries(streamer), {"format": "pt"})

    return save


@torch.no_grad()
def final_logits(model: nn.Module, arch: Arch, hidden: Tensor, source: TensorSource, dtype: torch.dtype) -> Tensor:
    """Logits [n, L, vocab] of the last decoder layer's outputs ``hidden``: final norm, head (tied: the
    embeddings), Gemma-2's final soft-capping when configured."""
    norm = model.get_submodule(arch.final_norm)
    materialize(norm, f"{arch.final_norm}.", source, dtype)
    head_name = f"{arch.lm_head}.weight"
    stored = head_name if head_name in source else f"{arch.embed}.weight"
    weight = source.get(stored).to(dtype)
    try:
        logits = nn.functional.linear(norm(hidden), weight)
    finally:
        release(norm)
    cap = getattr(model_config(model), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.no_grad()
def reload_logits(folder: Path, arch: Arch, probe: Tensor, batch_size: int) -> Tensor:
    """Logits of ``probe`` from the checkpoint written in ``folder``, loaded one decoder layer at a time."""
    from accelerate import init_empty_weights

    from compress.checkpoint import checkpoint_model_class
    from compress.verify import read_json
    from quant.hf import decode_loaded, replace_with_quant_linears

    config_dict = read_json(folder / "config.json", f"checkpoint {folder}")
    cls = checkpoint_model_class(config_dict)
    config = cls.config_class.from_pretrained(str(folder))
    with init_empty_weights():
        model = cls(config).eval()
    specs: dict[str, Any] = (config_dict.get("quantization_config") or {}).get("modules", {})
    replace_with_quant_linears(model, specs)
    source = TensorSource.folder(folder)
    embed = model.get_submodule(arch.embed)
    load_state(embed, f"{arch.embed}.", source)
    layers = decoder_layers(model, arch)
    first = layers[0]
    layers[0] = _Anchor(embed.get_parameter("weight").device)
    try:
        inputs = capture_layer0_inputs(model, arch, probe, batch_size)
    finally:
        layers[0] = first
        release(embed)
    for index, layer in enumerate(layers):
        prefix = f"{arch.layers}.{index}."
        load_state(layer, prefix, source)
        for name, spec in specs.items():
            if name.startswith(prefix):
                decode_loaded(layer.get_submodule(name.removeprefix(prefix)), spec)  # type: ignore[arg-type]
        inputs = inputs.for_layer(index)
        inputs = inputs.passed_on(run_layer(layer, inputs))
        release(layer)
    hidden = torch.cat(inputs.hidden)
    return final_logits(model, arch, hidden, source, hidden.dtype)
