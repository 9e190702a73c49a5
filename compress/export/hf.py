"""``secateurs export DIR --to hf``: a packed (quantized) checkpoint dequantized after the fact, in its own dtype.

The result is an ordinary checkpoint (plain linears; a standard config when the shapes allow one), for tools that
cannot load Secateurs' packed format. The weights are the dequantized values Ŵ, so the model computes what the
packed one computes, rounded once to the model's dtype (bf16/fp16 checkpoints stay bf16/fp16).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from quant.errors import InputError

log = logging.getLogger("secateurs")


def checkpoint_dtype(folder: Path) -> torch.dtype:
    """The dtype recorded in ``config.json`` (``dtype`` or the older ``torch_dtype``; float32 when absent)."""
    config = json.loads((folder / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise InputError(f"{folder / 'config.json'}: dtype {name!r} is not a torch dtype")
    return dtype


def export_hf(folder: Path, out: Path | None = None, overwrite: bool = False) -> Path:
    """Write ``folder`` (any checkpoint this package loads) to ``out`` with packed layers dequantized."""
    from compress.adapters import arch_for
    from compress.checkpoint import read_provenance, write_checkpoint
    from compress.loading import load_model

    if not (folder / "config.json").exists():
        raise InputError(f"export --to hf needs a checkpoint directory with a config.json, got {str(folder)!r}")
    out = out or Path(f"{str(folder).rstrip('/')}-dequantized")
    dtype = checkpoint_dtype(folder)
    loaded = load_model(str(folder), dtype=dtype)
    provenance = read_provenance(folder)
    provenance["exported_from"] = {"path": str(folder), "export": "dequantized", "dtype": str(dtype)}
    arch = arch_for(loaded.model.config)
    log.info("writing %s dequantized in %s", out, dtype)
    return write_checkpoint(loaded.model, loaded.tokenizer, arch, out, provenance, overwrite, export="dequantized")
