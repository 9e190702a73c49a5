"""Checkpoint writer and reader: safetensors in Hugging Face layout, per-layer shapes, provenance, model card.

Layout of a checkpoint directory:
    config.json              base config + ``secateurs_layers`` (per-layer linear shapes) + ``auto_map``
    model.safetensors        tensors under the base architecture's names (pruned shapes, new biases)
    modeling_secateurs.py    builds the base architecture and resizes its layers (remote code for transformers)
    tokenizer files, generation_config.json
    secateurs.json           provenance: recipe, seed, versions, data hashes, tensor hashes, sizes, evaluation
    README.md                Hub model card generated from secateurs.json (``compress.card``)

Everything is written to a temporary sibling directory and renamed into place: a failure leaves nothing behind.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import shutil
from collections.abc import Callable
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from compress.adapters import Arch, decoder_layers, model_config, skipped_sub_blocks
from compress.card import model_card, push_to_hub  # noqa: F401  # push_to_hub: re-exported (pipeline, tests)
from compress.errors import one_line, shown
from compress.export.stock import StockConfig, add_zero_biases, stock_config
from compress.output_dir import check_output, clean_leftovers, follow_umask, temp_sibling
from compress.prune.surgery import layer_shapes
from compress.quantize import dequantize_model, quant_linears
from quant.errors import InputError
from quant.hf import SecateursQuantConfig, module_spec

REMOTE_FILE = "modeling_secateurs.py"
PROVENANCE_FILE = "secateurs.json"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for dist in ("secateurs", "torch", "transformers", "safetensors", "lm_eval"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def remote_code_source(base_architecture: str) -> str:
    """The modeling file with its base architecture filled in."""
    text = resources.files("compress.remote").joinpath(REMOTE_FILE).read_text()
    marker = 'BASE_ARCHITECTURE = "LlamaForCausalLM"'
    assert marker in text
    return text.replace(marker, f"BASE_ARCHITECTURE = {base_architecture!r}", 1)


def model_layer_shapes(model: nn.Module, arch: Arch) -> list[dict[str, list[int]]]:
    return [layer_shapes(layer, arch) for layer in decoder_layers(model, arch)]


def model_skipped(model: nn.Module, arch: Arch) -> list[list[str]]:
    """Per layer, the names of its removed sub-blocks ("attn", "mlp")."""
    return [skipped_sub_blocks(layer, arch) for layer in decoder_layers(model, arch)]


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (any dtype, bf16 included)."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.data).hexdigest()  # the buffer itself: no copy of a (possibly huge) tensor


def tensor_hashes(path: Path) -> dict[str, str]:
    """sha256 of every tensor's raw bytes in a safetensors file (name → hex digest). The file is mapped per tensor:
    one mapping held over the loop would keep the whole file resident."""
    with safe_open(str(path), framework="pt") as f:
        names = sorted(f.keys())
    hashes = {}
    for name in names:
        with safe_open(str(path), framework="pt") as f:
            hashes[name] = tensor_sha256(f.get_tensor(name))
    return hashes


def _patch_config(
    folder: Path,
    arch: Arch,
    base_architecture: str,
    shapes: list[dict[str, list[int]]],
    skipped: list[list[str]],
    quantization: dict[str, Any] | None,
) -> StockConfig:
    """Record per-layer shapes; a standard config when they allow one (no remote code), else ``auto_map``."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.pop("quantization_config", None)
    if quantization is not None:
        config["quantization_config"] = quantization
    config["architectures"] = [base_architecture]
    config["secateurs_layers"] = shapes
    config["secateurs_layers_path"] = arch.layers
    config["secateurs_skipped"] = skipped
    config["secateurs_sub_blocks"] = arch.sub_blocks
    if arch.qkv:  # the loader gives each fused-qkv attention its head counts (compress.adapters.Arch.qkv)
        config["secateurs_fused_qkv"] = [arch.attn, arch.qkv, arch.o]
    stock = stock_config(config, arch, shapes, skipped)
    if stock.config is None:
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_secateurs.SecateursForCausalLM"}
    else:
        config = stock.config
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return stock


def quantization_config(model: nn.Module) -> dict[str, Any] | None:
    """The ``quantization_config`` of a model holding packed layers (None when it has none)."""
    modules = quant_linears(model)
    if not modules:
        return None
    specs = {name: module_spec(m, m.dtypes) for name, m in modules.items()}
    return SecateursQuantConfig(specs).to_dict()


def prepare_output(out_dir: Path, overwrite: bool) -> None:
    """Fail early (before any work) when the output cannot be written or exists and may not be replaced."""
    check_output(out_dir, overwrite)


def write_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    arch: Arch,
    out_dir: Path,
    provenance: dict[str, Any],
    overwrite: bool = False,
    verify: Callable[[Path], dict[str, str]] | None = None,
    export: str = "packed",
    save_weights: Callable[[Path], None] | None = None,
    quantization: dict[str, Any] | None = None,
) -> Path:
    """Write model, tokenizer, config, remote code, provenance and model card atomically to ``out_dir``.

    ``verify(tmp_dir)`` runs on the complete temporary folder before it is renamed into place (e.g. a reload
    check); it may return extra files {name: text} to add, and an exception from it leaves nothing behind.
    ``export="dequantized"`` writes packed layers as plain linears in the model's own dtype (for tools that accept
    nothing else). Uniform shapes with nothing skipped get a standard config (``compress.export.stock``): no
    ``auto_map``, no remote code. ``save_weights(tmp_dir)`` replaces ``model.save_pretrained`` (a streamed run:
    ``model`` is then a meta-device skeleton holding the compressed structure, see ``compress.stream.output``,
    and ``quantization`` its ``quantization_config``, recorded while each layer was in memory).
    """
    prepare_output(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out_dir)
    tmp = temp_sibling(out_dir)
    try:
        base_architecture: str = model_config(model).architectures[0]
        if export == "dequantized" and quant_linears(model):
            model = copy.deepcopy(model)
            dequantize_model(model)
        if save_weights is not None:
            save_weights(tmp)
        else:
            model.save_pretrained(tmp)  # type: ignore[operator]
        tokenizer.save_pretrained(tmp)
        stock = _patch_config(
            tmp,
            arch,
            base_architecture,
            model_layer_shapes(model, arch),
            model_skipped(model, arch),
            quantization if save_weights is not None else quantization_config(model),
        )
        add_zero_biases(tmp, stock.zero_biases)
        if stock.config is None:
            (tmp / REMOTE_FILE).write_text(remote_code_source(base_architecture))
        weights = sorted(tmp.glob("*.safetensors"))
        record = dict(provenance)
        record["versions"] = versions()
        record["remote_code"] = {"needed": stock.config is None, "reason": stock.reason or "standard config"}
        record["tensors"] = {k: v for w in weights for k, v in tensor_hashes(w).items()}
        record["bytes_on_disk"] = {w.name: w.stat().st_size for w in weights}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(record))
        for name, text in (verify(tmp) if verify else {}).items():
            (tmp / name).write_text(text)
        follow_umask(tmp)
        _replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        trash = temp_sibling(out_dir, "old")
        out_dir.rename(trash / "old")
        tmp.rename(out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out_dir)


def load_checkpoint_model(folder: Path, dtype: torch.dtype | str = torch.float32) -> nn.Module:
    """Load a Secateurs checkpoint with the in-package copy of its modeling code (no remote code executed).

    Only its structure is checked here (a missing or extra tensor is an InputError); ``compress.verify`` checks
    everything else before loading.
    """
    from compress.verify import read_json

    model_class = checkpoint_model_class(read_json(folder / "config.json", f"checkpoint {shown(str(folder))}"))
    try:
        model, info = model_class.from_pretrained(str(folder), dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise InputError(f"checkpoint {shown(str(folder))} cannot be loaded: {one_line(err, 160)}") from None
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            raise InputError(f"checkpoint {shown(str(folder))}: {kind.replace('_', ' ')} {shown(sorted(info[kind]))}")
    return model


def checkpoint_model_class(config: dict[str, Any]) -> Any:
    """The loader class of a checkpoint whose ``config.json`` is ``config``: its base architecture is looked up in
    the adapter table only (never as an arbitrary attribute of transformers)."""
    from compress.adapters import ARCHS
    from compress.remote.modeling_secateurs import make_model_class

    names = config.get("architectures")
    name = names[0] if isinstance(names, list) and names else None
    if not isinstance(name, str) or name not in ARCHS:
        raise InputError(
            f"config.json architectures[0] {shown(name)} is not supported; expected one of {sorted(ARCHS)}"
        )
    return make_model_class(name)


def read_provenance(folder: Path) -> dict[str, Any]:
    path = folder / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.exists() else {}
