"""Recipe steps: each step = calibration + pure math + surgery, applied to the model in a shared context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from compress.adapters import Arch
from compress.nas.step import run_nas
from compress.prune.pruner import prune_model
from compress.quantize import quantize_model, weight_storage
from compress.recipe import NasStep, PruneStep, QuantizeStep, Step


@dataclass
class StepContext:
    model: nn.Module
    tokenizer: Any
    arch: Arch
    calibration: Tensor | None  # [n_samples, seq_len] token ids, drawn once per run
    batch_size: int
    device: str | None
    seed: int = 0
    calibration_data: str = "web:calibration"


def apply_step(step: Step, ctx: StepContext) -> dict[str, Any]:
    """Apply one step in place; return its provenance record (with a one-line ``summary``)."""
    if isinstance(step, PruneStep):
        cfg = step.prune
        record = prune_model(ctx.model, ctx.arch, cfg, ctx.calibration, ctx.batch_size, ctx.device)
        record["config"] = cfg.model_dump(mode="json")
        record["summary"] = f"{cfg.method} {cfg.structure} ratio={cfg.ratio}"
        return record
    if isinstance(step, NasStep):
        record = run_nas(
            ctx.model,
            ctx.tokenizer,
            ctx.arch,
            step.nas,
            ctx.calibration,
            ctx.batch_size,
            ctx.seed,
            ctx.calibration_data,
        )
        record["config"] = step.nas.model_dump(mode="json")
        return record
    if isinstance(step, QuantizeStep):
        qcfg = step.quantize
        modules = quantize_model(ctx.model, ctx.arch, qcfg, ctx.calibration, ctx.batch_size, ctx.device)
        storage = weight_storage(ctx.model)
        return {
            "config": qcfg.model_dump(mode="json"),
            "modules": modules,
            **storage,
            "summary": f"quantize {qcfg.dtypes} g{qcfg.group_size} ({storage['bits_per_weight']:.3f} bits/weight)",
        }
    raise TypeError(f"unknown step {type(step).__name__}")
