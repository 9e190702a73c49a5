"""Evaluation: held-out perplexity (our protocol, recorded) and lm-evaluation-harness tasks on in-memory models.

Every number is stored with its protocol (data, window length, windows, tokens, dtype, batch size, max length):
perplexities from different protocols are not comparable.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from compress.corpus import eval_windows
from compress.lm_tasks import task_manager
from compress.metrics import recovery
from compress.recipe import LmEvalConfig, PerplexityConfig

log = logging.getLogger("secateurs")

@dataclass(frozen=True)
class LmEvalOptions:
    """lm-eval settings outside the recipe (``secateurs eval`` flags); recorded in the protocol when set."""

    num_fewshot: int | None = None
    batch_size: int | str | None = None  # an int or "auto" (lm-eval probes the largest that fits); None: config's
    apply_chat_template: bool = False


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


def lm_eval_tasks(
    model: nn.Module, tokenizer: Any, cfg: LmEvalConfig, seed: int, options: LmEvalOptions | None = None
) -> dict[str, Any]:
    """Run lm-eval ``simple_evaluate`` on the in-memory model with the shipped offline tasks available.

    Returns {"metrics": {task/metric: value}, "stderr": {task/metric: lm-eval's standard error}, "protocol", ...}.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    opts = options or LmEvalOptions()
    start = time.perf_counter()
    batch_size = opts.batch_size if opts.batch_size is not None else cfg.batch_size
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=cfg.max_length)
    out = simple_evaluate(
        model=lm,
        tasks=list(cfg.tasks),
        task_manager=task_manager(),  # registered + shipped + --trust-task-code folders
        limit=cfg.limit,
        num_fewshot=opts.num_fewshot,
        apply_chat_template=opts.apply_chat_template,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=False,
    )
    metrics, stderr = split_lm_eval_results((out or {}).get("results", {}))
    return {
        "metrics": metrics,
        "stderr": stderr,
        "protocol": {
            "tasks": list(cfg.tasks),
            "limit": cfg.limit,
            "batch_size": cfg.batch_size,
            "max_length": cfg.max_length,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "lm_eval": _lm_eval_version(),
            **{k: v for k, v in asdict(opts).items() if v is not None and v is not False},  # 0 shots is recorded
        },
        "seconds": round(time.perf_counter() - start, 2),
    }


def split_lm_eval_results(results: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """lm-eval ``results`` ({task: {"acc,none": v, "acc_stderr,none": se, ...}}) → (metrics, their stderr).

    A stderr lm-eval could not compute (the string "N/A") is left out.
    """
    metrics: dict[str, float] = {}
    stderr: dict[str, float] = {}
    for task, values in results.items():
        for key, value in values.items():
            name = key.split(",")[0]
            if not isinstance(value, int | float) or isinstance(value, bool) or name in ("alias", "sample_len"):
                continue
            if name.endswith("_stderr"):
                stderr[f"{task}/{name.removesuffix('_stderr')}"] = float(value)
            else:
                metrics[f"{task}/{name}"] = float(value)
    return metrics, stderr


def _lm_eval_version() -> str:
    from importlib import metadata

    return metadata.version("lm_eval")


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    ppl: PerplexityConfig | list[PerplexityConfig] | None,
    lm_eval: LmEvalConfig | None,
    seed: int,
    options: LmEvalOptions | None = None,
) -> dict[str, Any]:
    """{"metrics": {name: value}, "stderr": {name: se}, "protocol": {...}} for whatever evaluations are configured.

    Several perplexity texts: the first is ``heldout/perplexity``, the others ``heldout/perplexity@<data>``."""
    metrics: dict[str, float] = {}
    stderr: dict[str, float] = {}
    protocol: dict[str, Any] = {}
    texts = ppl if isinstance(ppl, list) else [ppl] if ppl is not None else []
    for index, text in enumerate(texts):
        result = perplexity(model, tokenizer, text)
        if index == 0:
            metrics["heldout/perplexity"] = result["perplexity"]
            protocol["perplexity"] = result["protocol"]
        else:
            metrics[perplexity_metric(text.data)] = result["perplexity"]
            protocol.setdefault("more_perplexity", []).append(result["protocol"])
    if lm_eval is not None and lm_eval.tasks:
        result = lm_eval_tasks(model, tokenizer, lm_eval, seed, options)
        metrics.update(result["metrics"])
        stderr.update(result["stderr"])
        protocol["lm_eval"] = result["protocol"]
    return {"metrics": metrics, "stderr": stderr, "protocol": protocol}


def perplexity_metric(data: str) -> str:
    """Metric name of the perplexity on a further text ("/" of a file path written as "|": names split on "/")."""
    return f"heldout/perplexity@{data.replace('/', '|')}"


def within_one_stderr(dense: float, compressed: float, se_dense: float, se_compressed: float) -> bool:
    """|compressed − dense| ≤ √(se_d² + se_c²): the difference is within one standard error of itself (the two
    estimates taken as independent; for paired runs on the same examples this bound is conservative)."""
    return abs(compressed - dense) <= math.sqrt(se_dense**2 + se_compressed**2)


def comparison_rows(
    dense: dict[str, float] | None,
    compressed: dict[str, float],
    dense_stderr: dict[str, float] | None = None,
    compressed_stderr: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """One row per compressed metric: values, recovery, lm-eval stderr and ``within_stderr`` where both are known."""
    rows = []
    d_se, c_se = dense_stderr or {}, compressed_stderr or {}
    for name, value in compressed.items():
        row: dict[str, Any] = {"metric": name, "compressed": round(value, 4)}
        if name in c_se:
            row["compressed_stderr"] = round(c_se[name], 4)
        if dense and name in dense:
            row["dense"] = round(dense[name], 4)
            rec = recovery(name, dense[name], value)
            row["recovery"] = round(rec, 4) if rec is not None else None
            if name in d_se:
                row["dense_stderr"] = round(d_se[name], 4)
            if name in d_se and name in c_se:
                row["within_stderr"] = within_one_stderr(dense[name], value, d_se[name], c_se[name])
        rows.append(row)
    return rows
