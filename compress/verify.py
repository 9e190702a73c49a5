"""Checkpoint self-verification: a damaged or tampered checkpoint is a one-line error naming the tensor.

Three sources must agree before a Secateurs checkpoint loads:

- ``config.json`` says which tensors the model has, with which shapes and dtypes: the base architecture (looked up
  in the adapter table only), resized per layer (``secateurs_layers``), skipped sub-blocks, packed layers
  (``quantization_config``). The model is built from it on the ``meta`` device (no memory, no weights).
- the safetensors headers say what the files hold; every tensor's bytes must lie inside its file (truncation).
- ``secateurs.json`` records the sha256 of every tensor's bytes when it was written (checked when ``hashes``).

Transformers alone would randomly initialise a tensor missing from the file, ignore an extra one, and load
whatever bytes a tampered file holds; these checks make all three an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from compress.errors import one_line, shown
from quant.errors import InputError

PROVENANCE_FILE = "secateurs.json"
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; InputError naming the file (and line) when it is missing or malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{what}: {path.name} is missing from {shown(str(path.parent))}") from None
    except OSError as err:
        raise InputError(f"{what}: {shown(str(path))} cannot be read: {err.strerror}") from None
    except UnicodeDecodeError:
        raise InputError(f"{what}: {shown(str(path))} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{what}: {shown(str(path))} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise InputError(f"{what}: {shown(str(path))} holds a {type(data).__name__}, expected a JSON object")
    return data


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Tensor name → entry from a safetensors file, after checking that every tensor's bytes are in the file."""
    what = f"weights file {shown(str(path))}"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if n < 2 or n > min(MAX_HEADER_BYTES, size - 8):
                raise InputError(f"{what} is truncated or not a safetensors file (header of {n} bytes, file {size})")
            header = json.loads(f.read(n))
    except OSError as err:
        raise InputError(f"{what} cannot be read: {err.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{what} is damaged: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise InputError(f"{what} is damaged: its header is not a JSON object")
    data_bytes = size - 8 - n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{what} is damaged: bad header entry for tensor {shown(name)}") from None
        numel = 1
        for d in shape:
            numel *= d
        if end > data_bytes:
            raise InputError(f"{what} is truncated: tensor {shown(name)} ends at byte {end} of {data_bytes}")
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise InputError(f"{what} is damaged: tensor {shown(name)} has {end - begin} bytes for shape {list(shape)}")
        entries[name] = TensorEntry(path.name, dtype, shape)
    return entries


def stored_tensors(folder: Path) -> dict[str, TensorEntry]:
    """Every tensor of every ``*.safetensors`` file in ``folder`` (a name in two files is an error)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"checkpoint {shown(str(folder))} has no *.safetensors weights file")
    found: dict[str, TensorEntry] = {}
    for path in files:
        for name, entry in read_header(path).items():
            if name in found:
                raise InputError(f"tensor {shown(name)} is stored twice ({found[name].file} and {path.name})")
            found[name] = entry
    return found


def expected_tensors(folder: Path, config: dict[str, Any]) -> tuple[dict[str, TensorEntry], set[str]]:
    """(name → shape/dtype the model that ``config.json`` describes has, names that may be absent: tied weights).

    The model is built on the ``meta`` device with the same code that loads the checkpoint.
    """
    from transformers import AutoConfig

    from compress.checkpoint import checkpoint_model_class

    model_class = checkpoint_model_class(config)
    try:
        hf_config = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            model: nn.Module = model_class(hf_config)
        quantized = (config.get("quantization_config") or {}).get("modules") or {}
        if quantized:
            from quant.hf import replace_with_quant_linears

            replace_with_quant_linears(model, quantized)
    except InputError:
        raise
    except Exception as err:  # a tampered config can break model construction anywhere in transformers
        raise InputError(
            f"checkpoint {shown(str(folder))}: config.json does not describe a buildable model: "
            f"{type(err).__name__}: {one_line(err, 120)}"
        ) from None
    declared = config.get("dtype") or config.get("torch_dtype") or "float32"
    float_dtype = getattr(torch, str(declared), None)
    if not isinstance(float_dtype, torch.dtype):
        raise InputError(f"checkpoint {shown(str(folder))}: config.json dtype {shown(declared)} is not a torch dtype")
    expected: dict[str, TensorEntry] = {}
    seen: dict[int, str] = {}
    optional: set[str] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            optional.add(name)  # tied to an earlier tensor: save_pretrained stores it once
            continue
        seen[id(tensor)] = name
        in_quantized = any(name.startswith(module + ".") for module in quantized)
        own_dtype = not in_quantized or name.endswith(".bias")  # a packed linear's bias keeps the model's dtype
        dtype = float_dtype if tensor.is_floating_point() and own_dtype else tensor.dtype
        expected[name] = TensorEntry("", dtype, tuple(tensor.shape))
    return expected, optional


def check_structure(folder: Path, config: dict[str, Any], stored: dict[str, TensorEntry]) -> None:
    """Names, shapes and dtypes in the files against the model ``config.json`` describes."""
    expected, optional = expected_tensors(folder, config)
    for name, want in expected.items():
        have = stored.get(name)
        if have is None:
            raise InputError(f"tensor {shown(name)} is missing from the checkpoint's weights (config.json expects it)")
        if have.shape != want.shape:
            raise InputError(
                f"tensor {shown(name)} has shape {list(have.shape)} in {have.file}, "
                f"but config.json implies {list(want.shape)}"
            )
        if have.dtype != want.dtype:
            raise InputError(
                f"tensor {shown(name)} is {str(have.dtype).replace('torch.', '')} in {have.file}, "
                f"expected {str(want.dtype).replace('torch.', '')}"
            )
    for name, have in stored.items():
        if name not in expected and name not in optional:
            raise InputError(f"tensor {shown(name)} in {have.file} is not part of the model config.json describes")


def check_hashes(folder: Path, stored: dict[str, TensorEntry], recorded: dict[str, Any], hashes: bool) -> None:
    """Names against ``secateurs.json``; with ``hashes``, every tensor's sha256 too."""
    from compress.checkpoint import tensor_sha256

    for name in recorded:
        if name not in stored:
            raise InputError(f"tensor {shown(name)} listed in {PROVENANCE_FILE} is missing from the weights")
    for name, entry in stored.items():
        if name not in recorded:
            raise InputError(f"tensor {shown(name)} in {entry.file} is not listed in {PROVENANCE_FILE}")
    if not hashes:
        return
    by_file: dict[str, list[str]] = {}
    for name, entry in stored.items():
        by_file.setdefault(entry.file, []).append(name)
    for file, names in sorted(by_file.items()):
        try:
            with safe_open(str(folder / file), framework="pt") as f:
                for name in sorted(names):
                    tensor = f.get_tensor(name)
                    if tensor_sha256(tensor) != recorded[name]:
                        raise InputError(
                            f"tensor {shown(name)} in {file} does not match its sha256 in {PROVENANCE_FILE} "
                            "(changed after it was written)"
                        )
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        bad = int((~torch.isfinite(tensor)).sum())
                        raise InputError(f"tensor {shown(name)} in {file} holds {bad} non-finite values (NaN/inf)")
        except InputError:
            raise
        except Exception as err:  # safetensors raises its own error type for damaged files
            raise InputError(f"weights file {shown(file)} cannot be read: {one_line(err, 120)}") from None


def verify_checkpoint(folder: Path, hashes: bool = True) -> int:
    """Check a Secateurs checkpoint folder before it loads; returns the number of tensors checked.

    InputError (one line naming the file or tensor) when config.json, secateurs.json and the weights disagree,
    when a weights file is truncated, or (``hashes``) when a tensor's bytes differ from its recorded sha256.
    """
    what = f"checkpoint {shown(str(folder))}"
    config = read_json(folder / "config.json", what)
    provenance = read_json(folder / PROVENANCE_FILE, what)
    recorded = provenance.get("tensors")
    if not isinstance(recorded, dict) or not recorded:
        raise InputError(f"{what}: {PROVENANCE_FILE} has no 'tensors' record (name → sha256)")
    stored = stored_tensors(folder)
    check_hashes(folder, stored, recorded, hashes=False)
    check_structure(folder, config, stored)
    if hashes:
        check_hashes(folder, stored, recorded, hashes=True)
    return len(stored)


def nonfinite_tensors(model: nn.Module) -> list[tuple[str, int]]:
    """(name, count) of every floating parameter or buffer holding NaN or ±inf values."""
    found = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.device.type != "meta":
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                found.append((name, bad))
    return found


def check_finite(model: nn.Module, source: str) -> None:
    """InputError naming the first tensor of ``model`` that holds non-finite values (and how many tensors do)."""
    found = nonfinite_tensors(model)
    if found:
        name, count = found[0]
        more = f" (and {len(found) - 1} more tensors)" if len(found) > 1 else ""
        raise InputError(f"model {shown(source)}: tensor {shown(name)} holds {count} non-finite values (NaN/inf){more}")
