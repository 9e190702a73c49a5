"""The ``distill`` recipe step: glue between the recipe, the training data and ``compress.recover.distill``."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from torch import Tensor

from compress.checkpoint import tensor_sha256
from compress.corpus import calibration_batches, corpus_fingerprint
from compress.recipe import DistillConfig, DistillStep
from compress.recover.distill import TrainSettings, distill_blocks, distill_global
from quant.errors import InputError

if TYPE_CHECKING:
    from compress.steps import StepContext

log = logging.getLogger("secateurs")


def distill_step(step: DistillStep, ctx: StepContext) -> dict[str, Any]:
    """Blockwise local distillation (and optional global KD) of ``ctx.model`` against the recipe's input model,
    loaded again as the dense parent. Provenance: settings, data and token hashes, loss per block and per KD step."""
    from compress.loading import load_model

    cfg = step.distill
    if ctx.source is None:
        raise InputError("distill: the dense parent model is unknown (StepContext.source is not set)")
    clock = time.perf_counter()
    dtype = next(ctx.model.parameters()).dtype
    device = str(next(ctx.model.parameters()).device)
    teacher = load_model(ctx.source, dtype=dtype, device=device).model.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    ids = distill_windows(cfg, ctx.tokenizer, ctx.seed)
    block_settings = TrainSettings(cfg.steps, cfg.lr, cfg.train, cfg.lora_rank, cfg.weight_decay)

    def block_progress(index: int, before: float, after: float) -> None:
        log.info("distill: layer %d block loss %.5f -> %.5f", index, before, after)

    blocks: list[dict[str, float]] = []
    if cfg.steps > 0:
        blocks = distill_blocks(
            teacher,
            ctx.model,
            ctx.arch,
            ids,
            block_settings,
            ctx.seed,
            cfg.inputs,
            cfg.batch_size,
            ctx.device,
            block_progress,
        )
    global_losses: list[float] = []
    if cfg.global_steps > 0:
        kd = TrainSettings(cfg.global_steps, cfg.global_lr, cfg.train, cfg.lora_rank, cfg.weight_decay)
        global_losses = distill_global(
            teacher,
            ctx.model,
            ctx.arch,
            ids,
            kd,
            ctx.seed,
            cfg.batch_size,
            cfg.temperature,
            lambda i, loss: log.info("distill: global step %d KL %.5f", i, loss),
        )
    del teacher
    ctx.model.eval()
    return distill_record(cfg, ctx.source, ids, blocks, global_losses, time.perf_counter() - clock)


def distill_record(
    cfg: DistillConfig,
    parent: str,
    ids: Tensor,
    blocks: list[dict[str, float]],
    global_losses: list[float],
    seconds: float,
) -> dict[str, Any]:
    """The provenance record of a distill step (in memory or streamed): settings, data and token hashes, loss
    per block and per KD step."""
    kd_tokens = min(cfg.samples, cfg.global_steps * cfg.batch_size) * cfg.seq_len if cfg.global_steps else 0
    return {
        "config": cfg.model_dump(mode="json"),
        "parent": parent,
        "data_sha256": corpus_fingerprint(cfg.data),
        "tokens_sha256": tensor_sha256(ids),
        "tokens": int(ids.numel()) if cfg.steps > 0 else kd_tokens,
        "block_loss": blocks,
        "global_loss": global_losses,
        "seconds": round(seconds, 2),
        "summary": f"distill BLD {cfg.steps} steps/layer ({cfg.train}, lr {cfg.lr}), global KD {cfg.global_steps} "
        f"steps, {cfg.samples}x{cfg.seq_len} tokens of {cfg.data}",
    }


def distill_windows(cfg: DistillConfig, tokenizer: Any, seed: int) -> Tensor:
    """The distill step's training windows [samples, seq_len] (seed + 1: not the calibration windows)."""
    return calibration_batches(tokenizer, cfg.data, cfg.samples, cfg.seq_len, seed + 1)
