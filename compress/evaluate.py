"""Evaluation: held-out perplexity (our protocol, recorded) and lm-evaluation-harness tasks on in-memory models.

Every number is stored with its protocol (data, window length, windows, tokens, dtype, batch size, max length):
perplexities from different protocols are not comparable.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from compress.corpus import eval_windows, task_dir
from compress.recipe import LmEvalConfig, PerplexityConfig

log = logging.getLogger("secateurs")

LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "ppl")


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, cfg: PerplexityConfig) -> dict[str, Any]:
    """exp(mean next-token NLL) over non-overlapping windows [n, seq_len] of ``cfg.data`` (seq_len − 1 targets
    per window; no context carried between windows)."""
    windows = eval_windows(tokenizer, cfg.data, cfg.seq_len, cfg.max_windows)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    start = time.perf_counter()
    for batch in windows.split(cfg.batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += batch[:, 1:].numel()
    return {
        "perplexity": math.exp(nll / count),
        "protocol": {
            "data": cfg.data,
            "seq_len": cfg.seq_len,
            "windows": int(windows.shape[0]),
            "target_tokens": count,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        },
        "seconds": round(time.perf_counter() - start, 2),
    }


def lm_eval_tasks(model: nn.Module, tokenizer: Any, cfg: LmEvalConfig, seed: int) -> dict[str, Any]:
    """Run lm-eval ``simple_evaluate`` on the in-memory model with the shipped offline tasks available."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length)
    out = simple_evaluate(
        model=lm,
        tasks=list(cfg.tasks),
        task_manager=TaskManager(include_path=str(task_dir())),
        limit=cfg.limit,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=False,
    )
    metrics: dict[str, float] = {}
    for task, values in (out or {}).get("results", {}).items():
        for key, value in values.items():
            name = key.split(",")[0]
            if isinstance(value, int | float) and "stderr" not in name and name not in ("alias", "sample_len"):
                metrics[f"{task}/{name}"] = float(value)
    return {
        "metrics": metrics,
        "protocol": {
            "tasks": list(cfg.tasks),
            "limit": cfg.limit,
            "batch_size": cfg.batch_size,
            "max_length": cfg.max_length,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "lm_eval": _lm_eval_version(),
        },
        "seconds": round(time.perf_counter() - start, 2),
    }


def _lm_eval_version() -> str:
    from importlib import metadata

    return metadata.version("lm_eval")


def evaluate_model(
    model: nn.Module, tokenizer: Any, ppl: PerplexityConfig | None, lm_eval: LmEvalConfig | None, seed: int
) -> dict[str, Any]:
    """{"metrics": {name: value}, "protocol": {...}} for whatever evaluations are configured."""
    metrics: dict[str, float] = {}
    protocol: dict[str, Any] = {}
    if ppl is not None:
        result = perplexity(model, tokenizer, ppl)
        metrics["heldout/perplexity"] = result["perplexity"]
        protocol["perplexity"] = result["protocol"]
    if lm_eval is not None and lm_eval.tasks:
        result = lm_eval_tasks(model, tokenizer, lm_eval, seed)
        metrics.update(result["metrics"])
        protocol["lm_eval"] = result["protocol"]
    return {"metrics": metrics, "protocol": protocol}


def recovery(metric: str, dense: float, compressed: float) -> float | None:
    """Compressed relative to dense, oriented so that 1.0 = full recovery and < 1 = worse."""
    if dense == 0 or compressed == 0:
        return None
    lower_better = any(tag in metric for tag in LOWER_IS_BETTER)
    return dense / compressed if lower_better else compressed / dense


def comparison_rows(dense: dict[str, float] | None, compressed: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for name, value in compressed.items():
        row: dict[str, Any] = {"metric": name, "compressed": round(value, 4)}
        if dense and name in dense:
            row["dense"] = round(dense[name], 4)
            rec = recovery(name, dense[name], value)
            row["recovery"] = round(rec, 4) if rec is not None else None
        rows.append(row)
    return rows
