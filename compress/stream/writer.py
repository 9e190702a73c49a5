"""A safetensors file written one tensor at a time, byte-identical to ``safetensors.torch.save_file``.

``save_file`` needs every tensor in memory at once; a streamed run holds one decoder layer. The format is simple
(8-byte little-endian header length, JSON header padded with spaces to a multiple of 8, then the raw tensor bytes in
the header's order); the *order* (safetensors sorts by dtype, then name) is taken from safetensors itself by
serialising one-element stand-ins of the same names and dtypes, so the layout never drifts from the library's.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}  # fmt: skip


@dataclass(frozen=True)
class TensorEntry:
    """One tensor to write: its name, dtype, shape and a loader called once, when its bytes are written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty(0, dtype=self.dtype).element_size()


def library_order(entries: list[TensorEntry], metadata: dict[str, str]) -> list[str]:
    """The order in which safetensors lays out (and lists) these tensors: asked of safetensors itself."""
    stand_ins = {e.name: torch.zeros(1, dtype=e.dtype) for e in entries}
    blob = save(stand_ins, metadata=metadata)
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + size])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda name: header[name]["data_offsets"][0])


def header_bytes(entries: list[TensorEntry], metadata: dict[str, str]) -> tuple[bytes, list[TensorEntry]]:
    """(length prefix + padded JSON header, the entries in file order)."""
    by_name = {e.name: e for e in entries}
    if len(by_name) != len(entries):
        raise ValueError("duplicate tensor names")
    ordered = [by_name[name] for name in library_order(entries, metadata)]
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for entry in ordered:
        header[entry.name] = {
            "dtype": _DTYPE_NAMES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, ordered


def write_streaming(path: Path, entries: list[TensorEntry], metadata: dict[str, str] | None = None) -> int:
    """Write ``entries`` to ``path`` loading one tensor at a time; returns the file size in bytes."""
    head, ordered = header_bytes(entries, dict(metadata or {}))
    with open(path, "wb") as f:
        f.write(head)
        for entry in ordered:
            tensor = entry.load().detach().to("cpu").contiguous()
            if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
                raise ValueError(
                    f"tensor {entry.name}: loaded {tensor.dtype} {tuple(tensor.shape)}, "
                    f"declared {entry.dtype} {entry.shape}"
                )
            if tensor.numel():
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            del tensor
        f.flush()
        os.fsync(f.fileno())
        return f.tell()
