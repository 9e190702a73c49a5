"""Tensors on disk and a model skeleton on the meta device: materialise a module's tensors when needed, free them
(back to meta) when done. Plumbing only: no arithmetic happens here besides the dtype conversion on load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from compress.errors import shown
from quant.errors import InputError

INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}  # fmt: skip


class TensorSource:
    """Name → tensor over the safetensors files of a folder (``model.safetensors`` or an index's shards), or over
    an explicit list of files. A tensor is read when asked for, through a file mapping of its own: a mapping kept
    open would keep every page read so far resident (a whole model, over a streamed run)."""

    def __init__(self, files: list[Path]):
        self.files = list(files)
        self.where: dict[str, Path] = {}
        for path in self.files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    self.where.setdefault(name, path)

    @classmethod
    def folder(cls, folder: Path) -> TensorSource:
        index = folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            return cls([folder / name for name in sorted(set(weight_map.values()))])
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise InputError(f"model {shown(str(folder))}: no *.safetensors files to stream from")
        return cls(files)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> Tensor:
        if name not in self.where:
            raise InputError(f"tensor {shown(name)} is missing from {shown(str(self.files[0].parent))}")
        with safe_open(str(self.where[name]), framework="pt") as f:
            return f.get_tensor(name)

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of ``name`` (read from the header only)."""
        with safe_open(str(self.where[name]), framework="pt") as f:
            return SAFETENSORS_DTYPES[f.get_slice(name).get_dtype()]


def persistent_tensors(module: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
    """{state-dict name: (owning module, attribute, is_parameter)} of ``module``'s stored tensors (tied ones once)."""
    found: dict[str, tuple[nn.Module, str, bool]] = {}
    for prefix, owner in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        for attr, param in owner._parameters.items():
            if param is not None:
                found[dot + attr] = (owner, attr, True)
        for attr, buf in owner._buffers.items():
            if buf is not None and attr not in owner._non_persistent_buffers_set:
                found[dot + attr] = (owner, attr, False)
    return found


def materialize(module: nn.Module, prefix: str, source: TensorSource, dtype: torch.dtype) -> None:
    """Fill ``module``'s parameters and persistent buffers from ``source`` (names ``prefix`` + state-dict name);
    floating tensors are converted to ``dtype``, the others kept as stored."""
    for name, (owner, attr, is_param) in persistent_tensors(module).items():
        tensor = source.get(prefix + name)
        current = owner._parameters[attr] if is_param else owner._buffers[attr]
        assert current is not None
        if tuple(tensor.shape) != tuple(current.shape):
            raise InputError(
                f"tensor {shown(prefix + name)}: shape {list(tensor.shape)} in the file, {list(current.shape)} "
                "expected by the config"
            )
        if tensor.is_floating_point() and current.is_floating_point():
            tensor = tensor.to(dtype)
        if is_param:
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[attr] = tensor


def release(module: nn.Module) -> None:
    """Back to the meta device: shapes, dtypes and structure stay; the memory is freed. Only the stored tensors
    go: non-persistent buffers (Gemma's embedding scale, rotary tables) are not in the files and must stay."""
    for owner, attr, is_param in persistent_tensors(module).values():
        if is_param:
            owner._parameters[attr] = nn.Parameter(owner._parameters[attr].to("meta"), requires_grad=False)  # type: ignore[union-attr]
        else:
            owner._buffers[attr] = owner._buffers[attr].to("meta")  # type: ignore[union-attr]
    _trim_heap()


def _trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc keeps what torch's threads freed otherwise, and a
    streamed run's RSS would grow by a layer's worth of temporaries per layer)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # glibc only


_LIBC = _load_libc()


def load_state(module: nn.Module, prefix: str, source: TensorSource) -> None:
    """Fill ``module`` (structure already final, e.g. pruned and packed on meta) with stored tensors as they are."""
    state = {name: source.get(prefix + name) for name in persistent_tensors(module)}
    module.load_state_dict(state, strict=True, assign=True)


def meta_skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``config`` with every parameter on the meta device (buffers such as the rotary inverse
    frequencies are computed on the CPU, as at a normal load)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
