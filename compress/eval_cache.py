"""Dense-baseline cache: evaluate an unchanged model once, reuse its results on later runs.

About half of a run's evaluation time is the dense model, whose results only depend on its weights, its
tokenizer, the evaluation data and the protocol. The key hashes exactly these: every tensor of the state dict
(bytes, names, dtypes, shapes), the tokenizer's serialisation, the perplexity corpus fingerprint, the offline lm-eval
task files, the evaluation configs and extra lm-eval options, the seed, and the versions of torch, transformers and
lm-eval. Entries live in ``<cache>/dense-eval/<key>.json`` (``$SECATEURS_CACHE``, see ``compress.loading``); set
``SECATEURS_EVAL_CACHE=0`` to neither read nor write them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.corpus import corpus_fingerprint, task_dir
from compress.evaluate import LmEvalOptions, evaluate_model
from compress.loading import cache_dir
from compress.recipe import LmEvalConfig, PerplexityConfig

log = logging.getLogger("secateurs")

CACHE_ENV = "SECATEURS_EVAL_CACHE"
FORMAT = 1


def model_tensor_sha256(model: nn.Module) -> str:
    """sha256 over the state dict in name order: each name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=False).items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of the tokenizer's full serialisation (fast tokenizers) or its vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps(
        [getattr(tokenizer, "chat_template", None), getattr(tokenizer, "special_tokens_map", {})],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256((text + extra).encode()).hexdigest()


def _task_files_sha256() -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in task_dir().rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(task_dir())).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def evaluation_key(
    model: nn.Module,
    tokenizer: Any,
    ppl: PerplexityConfig | list[PerplexityConfig] | None,
    lm_eval: LmEvalConfig | None,
    seed: int,
    options: LmEvalOptions | None = None,
) -> dict[str, Any]:
    """What the dense results depend on (model, tokenizer, data, protocol, versions); hashed into the cache key."""
    if isinstance(ppl, list):  # several texts (one text keeps the key it always had)
        dumped: Any = [p.model_dump(mode="json") for p in ppl]
        data_sha: Any = [corpus_fingerprint(p.data) for p in ppl]
    else:
        dumped = ppl.model_dump(mode="json") if ppl else None
        data_sha = corpus_fingerprint(ppl.data) if ppl else None
    return {
        "format": FORMAT,
        "model_tensors_sha256": model_tensor_sha256(model),
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "perplexity": dumped,
        "perplexity_data_sha256": data_sha,
        "lm_eval": lm_eval.model_dump(mode="json") if lm_eval else None,
        "lm_eval_options": asdict(options) if options else None,
        "task_files_sha256": _task_files_sha256() if lm_eval else None,
        "seed": seed,
        "versions": {d: _version(d) for d in ("torch", "transformers", "lm_eval")},
    }


def cache_enabled() -> bool:
    return os.environ.get(CACHE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def cached_evaluation(
    model: nn.Module,
    tokenizer: Any,
    ppl: PerplexityConfig | list[PerplexityConfig] | None,
    lm_eval: LmEvalConfig | None,
    seed: int,
    options: LmEvalOptions | None = None,
    evaluate: Callable[..., dict[str, Any]] = evaluate_model,
) -> dict[str, Any]:
    """``evaluate(model, tokenizer, ppl, lm_eval, seed, options)`` through the cache.

    Returns the evaluation result plus ``"cache"``: {"key", "hit", "seconds" (this call), "computed_seconds" (the
    original evaluation's), "computed_at"}. A hit says so once in the log.
    """
    start = time.perf_counter()
    if not cache_enabled():
        result = evaluate(model, tokenizer, ppl, lm_eval, seed, options)
        return {**result, "cache": {"hit": False, "disabled": True}}
    key_fields = evaluation_key(model, tokenizer, ppl, lm_eval, seed, options)
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()
    path = cache_dir() / "dense-eval" / f"{key}.json"
    entry = _read_entry(path)
    if entry is not None:
        seconds = time.perf_counter() - start
        log.info(
            "dense baseline reused from %s (computed in %.0f s on %s)", path, entry["seconds"], entry["computed_at"]
        )
        info = {"key": key, "hit": True, "seconds": round(seconds, 2), "computed_seconds": entry["seconds"]}
        return {**entry["result"], "cache": {**info, "computed_at": entry["computed_at"], "path": str(path)}}
    result = evaluate(model, tokenizer, ppl, lm_eval, seed, options)
    seconds = round(time.perf_counter() - start, 2)
    computed_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _write_entry(path, {"key": key_fields, "result": result, "seconds": seconds, "computed_at": computed_at})
    info = {"key": key, "hit": False, "seconds": seconds, "computed_seconds": seconds, "computed_at": computed_at}
    return {**result, "cache": {**info, "path": str(path)}}


def _read_entry(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        log.warning("ignoring unreadable dense-evaluation cache entry %s: %s", path, err)
        return None
    return entry if isinstance(entry, dict) and {"result", "seconds", "computed_at"} <= entry.keys() else None


def _write_entry(path: Path, entry: dict[str, Any]) -> None:
    """Atomic write (temp file + rename): concurrent runs never read a half-written entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(entry, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
