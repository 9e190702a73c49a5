"""Tokenizer → GGUF metadata (``tokenizer.ggml.*``) for byte-level BPE tokenizers (GPT-2 / SmolLM / Llama-3 / Qwen2).

llama.cpp's BPE tokenizer needs the token strings, their types, the merges, the special-token ids and the name of
its pre-tokenizer (the regex that splits text before BPE). The name is read from the structure of
``tokenizer.json``'s ``pre_tokenizer`` through :data:`PRE_TOKENIZERS`; an unknown structure is written as
``default`` with a logged warning (``scripts/gguf_check.py`` compares the two tokenizations on its prompts).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gguf

from quant.errors import InputError

log = logging.getLogger("secateurs")

# Regexes of the Split pre-tokenizers of known families (tokenizer.json), by llama.cpp pre-tokenizer name.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's name for a ``tokenizer.json`` pre_tokenizer (None when not recognised)."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # the GPT-2 regex inside ByteLevel
    if pre.get("type") != "Sequence":
        return None
    parts = pre.get("pretokenizers", [])
    kinds = [p.get("type") for p in parts]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = parts[0].get("pattern", {}).get("Regex")
        return {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}.get(regex)
    return None


def _merges(model: dict[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def add_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> dict[str, Any]:
    """Write the tokenizer of the model folder ``folder`` into ``writer``; returns a summary for logs/tests.

    ``vocab_size``: rows of the embedding; ids past the tokenizer's vocabulary are written as unused ``[PADi]``.
    """
    from transformers import AutoTokenizer

    path = folder / "tokenizer.json"
    if not path.exists():
        raise InputError(f"{folder}: no tokenizer.json (GGUF export needs a fast byte-level BPE tokenizer)")
    spec = json.loads(path.read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise InputError(
            f"{path}: tokenizer model {model.get('type')!r} (byte_fallback={model.get('byte_fallback')}) is not "
            "supported by the GGUF export (byte-level BPE only)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    vocab: dict[str, int] = tokenizer.get_vocab()
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    if max(vocab.values()) >= vocab_size:
        raise InputError(f"{path}: token id {max(vocab.values())} does not fit the embedding ({vocab_size} rows)")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for text, index in vocab.items():
        tokens[index] = text
        if text in added:
            types[index] = int(gguf.TokenType.CONTROL if added[text] else gguf.TokenType.USER_DEFINED)
        else:
            types[index] = int(gguf.TokenType.NORMAL)
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    if pre is None:
        log.warning("%s: pre-tokenizer not recognised; written as llama.cpp 'default'", path)
        pre = "default"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(model))
    for name, setter in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setter(int(value))
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(bool(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]))
    writer.add_add_eos_token(bool(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)
    return {"pre": pre, "tokens": len(vocab), "merges": len(model.get("merges", [])), "chat_template": bool(template)}
