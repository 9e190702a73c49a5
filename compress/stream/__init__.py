"""Layer streaming: compress a model stored as safetensors holding one decoder layer in memory at a time.

The skeleton is built on the meta device; embeddings are materialised only to capture the layer-0 inputs, each
decoder layer when the engine reaches it (``compress.stream.engine``), compressed, staged to its own file in the
output's temporary folder and freed; the checkpoint is assembled from the staged layers and the source's untouched
tensors (``compress.stream.output``). See docs/scale.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from compress.stream.engine import Streamer, not_streamable

log = logging.getLogger("secateurs")

__all__ = ["Streamer", "checkpoint_dtype", "not_streamable", "open_streamer", "stream_folder"]


def checkpoint_dtype(folder: Path) -> torch.dtype:
    """The dtype of the first floating tensor stored in ``folder`` (its safetensors headers only are read)."""
    from compress.stream.source import TensorSource

    source = TensorSource.folder(folder)
    for name in sorted(source.where):
        tensor = source.get(name)
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def stream_folder(resolved: Path | str, stream: bool | str, reason: str | None) -> Path | None:
    """The local folder to stream from, or None for the in-memory path.

    ``stream``: "auto" streams a local safetensors model whenever the recipe allows it (``reason`` is None);
    True demands it (InputError naming why not); False never streams."""
    from quant.errors import InputError

    local = isinstance(resolved, Path) and _plain_safetensors(resolved)
    if stream is False:
        return None
    if stream is True:
        if not local:
            raise InputError(
                f"stream: true needs a local *.safetensors folder of an architecture in the adapter table "
                f"(got {resolved})"
            )
        if reason is not None:
            raise InputError(f"stream: true is not possible: {reason}")
    if not local or reason is not None:
        if stream == "auto" and local:
            log.info("loading the whole model (no layer streaming): %s", reason)
        return None
    assert isinstance(resolved, Path)
    return resolved


def _plain_safetensors(folder: Path) -> bool:
    """A Hugging Face folder of safetensors weights, of an architecture in the adapter table, that is not a
    Secateurs checkpoint (those load packed)."""
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        return False
    from compress.verify import PROVENANCE_FILE

    try:
        config: dict[str, Any] = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    from compress.adapters import ARCHS

    names = config.get("architectures") or [None]
    known = names[0] in ARCHS  # the layer engine needs the adapter table's paths
    return known and not (folder / PROVENANCE_FILE).exists() and "secateurs_layers" not in config


def open_streamer(folder: Path, dtype: torch.dtype, staging: Path, device: str, source: str) -> Streamer:
    """A :class:`Streamer` over ``folder``'s safetensors in ``dtype`` (meta skeleton; nothing materialised yet)."""
    from transformers import AutoConfig

    from compress.adapters import arch_for
    from compress.errors import one_line, shown
    from compress.stream.source import TensorSource, meta_skeleton
    from quant.errors import InputError

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as err:  # transformers raises many types on a damaged or unknown config
        why = f"{type(err).__name__}: {one_line(err, 120)}"
        raise InputError(f"model {shown(source)} cannot be loaded: {why}") from None
    model = meta_skeleton(config, dtype)
    built: Any = model.config
    if not getattr(built, "architectures", None):
        built.architectures = [type(model).__name__]
    streamer = Streamer(
        model, arch_for(model.config), TensorSource.folder(folder), dtype, staging,
        None if device == "cpu" else device, source,
    )  # fmt: skip
    streamer.retie()
    return streamer
