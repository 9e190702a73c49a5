"""Recipe steps: glue only. One handler per step kind in :data:`HANDLERS`; each = calibration + pure math +
surgery applied to the model in a shared :class:`StepContext`, returning its provenance record.

Adding a step kind is one entry here (plus its config in ``compress/recipe.py``): ``HANDLERS[MyStep] = my_step``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from compress.adapters import Arch, require_separate_projections
from compress.candidates import DenseCache
from compress.corpus import calibration_batches
from compress.nas.evolve import EvolutionConfig, evolve
from compress.nas.space import Candidate
from compress.prune.pruner import apply_masks, plan_masks, prune_model
from compress.puzzle.step import run_puzzle
from compress.quantize import quantize_model, weight_storage
from compress.recipe import DistillStep, NasStep, PruneStep, QuantizeStep, Step
from compress.recover.step import distill_step

log = logging.getLogger("secateurs")


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
    source: str | None = None  # the recipe's input model (the dense parent of distill)


StepHandler = Callable[[Any, StepContext], dict[str, Any]]


def prune_step(step: PruneStep, ctx: StepContext) -> dict[str, Any]:
    cfg = step.prune
    if cfg.structure == "puzzle":
        assert cfg.puzzle is not None
        require_separate_projections(ctx.arch, "prune.structure: puzzle")
        record = run_puzzle(
            ctx.model, ctx.arch, cfg.ratio, cfg.puzzle, ctx.calibration, ctx.batch_size, prune=cfg, device=ctx.device
        )
    else:
        record = prune_model(ctx.model, ctx.arch, cfg, ctx.calibration, ctx.batch_size, ctx.device)
    record["config"] = cfg.model_dump(mode="json")
    record["summary"] = f"{cfg.method} {cfg.structure} ratio={cfg.ratio}"
    return record


def quantize_step(step: QuantizeStep, ctx: StepContext) -> dict[str, Any]:
    qcfg = step.quantize
    modules = quantize_model(ctx.model, ctx.arch, qcfg, ctx.calibration, ctx.batch_size, ctx.device)
    storage = weight_storage(ctx.model)
    return {
        "config": qcfg.model_dump(mode="json"),
        "modules": modules,
        **storage,
        "summary": f"quantize {qcfg.dtypes} g{qcfg.group_size} ({storage['bits_per_weight']:.3f} bits/weight)",
    }


def nas_step(step: NasStep, ctx: StepContext) -> dict[str, Any]:
    """Search widths and sub-block removal with Φ (seeded), prune the model in place to the best candidate.

    FLAP statistics come from the run's calibration tokens; Φ's gradient traces from a separate draw of
    ``proxy_samples`` × ``proxy_seq_len`` tokens of the calibration data (seed + 1)."""
    cfg = step.nas
    require_separate_projections(ctx.arch, "the nas step")
    if ctx.calibration is None:
        raise ValueError("the nas step needs calibration data")
    clock = time.perf_counter()

    def proxy_tokens() -> Tensor:
        return calibration_batches(
            ctx.tokenizer, ctx.calibration_data, cfg.proxy_samples, cfg.proxy_seq_len, ctx.seed + 1
        )

    cache = DenseCache(ctx.model, ctx.arch, ctx.calibration, ctx.batch_size, None, proxy_tokens)
    engine = cache.nas(cfg.mlp_step, cfg.skip_from, cfg.allow_skip, cfg.bias_compensation, cfg.least_squares)
    evo = EvolutionConfig(
        ratio=cfg.params_ratio,
        tolerance=cfg.tolerance,
        population=cfg.population,
        generations=cfg.generations,
        elites=cfg.elites,
        p_crossover=cfg.p_crossover,
        p_mutation=cfg.p_mutation,
        seed=ctx.seed,
    )
    seeds: list[Candidate] = []
    if cfg.seed_with_flap:
        seeds = [engine.flap_candidate(cfg.params_ratio, cfg.tolerance, ctx.seed)]
    seeds.append(engine.uniform_candidate(cfg.params_ratio, cfg.tolerance, ctx.seed))
    measured: dict[Candidate, dict[str, Any]] = {}

    def score(cand: Candidate) -> float:
        measured[cand] = engine.measure(cand)
        return float(measured[cand][cfg.proxy])

    def progress(generation: int, best: float) -> None:
        log.info(
            "nas generation %d/%d: best %s %.4f (%d scored)",
            generation + 1, evo.generations, cfg.proxy, best, len(measured),
        )  # fmt: skip

    result = evolve(engine.spec, score, evo, seeds, progress)
    best = result.best
    prune_cfg = engine.prune_config(best)
    if prune_cfg.reconstruct == "least_squares":
        prune_model(ctx.model, ctx.arch, prune_cfg, ctx.calibration, ctx.batch_size, None, cache.stats)
    else:
        attn, mlp = plan_masks(ctx.model, ctx.arch, prune_cfg, cache.stats)
        apply_masks(ctx.model, ctx.arch, prune_cfg, cache.stats, attn, mlp)
    skipped = [[n for n, k in (("attn", a), ("mlp", c)) if k == 0] for a, c in zip(best.attn, best.mlp, strict=True)]
    removed = sum(len(s) for s in skipped)
    return {
        "config": cfg.model_dump(mode="json"),
        "kv_groups": list(best.attn),
        "intermediate_sizes": list(best.mlp),
        "skipped": skipped,
        "equivalent_prune_step": prune_cfg.model_dump(
            mode="json", include={"method", "attn_groups", "mlp_channels", "bias_compensation", "reconstruct"}
        ),
        "proxy": cfg.proxy,
        "best_score": result.best_score,
        "best": {k: v for k, v in measured[best].items() if k != "phi_seconds"},
        "seeds": {
            ("flap" if i == 0 and cfg.seed_with_flap else "uniform"): measured[s][cfg.proxy]
            for i, s in enumerate(seeds)
            if s in measured
        },
        "history": result.history,
        "candidates_scored": len(result.scores),
        "base_trace_seconds": round(cache.base_seconds, 2),
        "seconds": round(time.perf_counter() - clock, 2),
        "summary": f"nas {cfg.proxy} params_ratio={cfg.params_ratio} ({len(result.scores)} candidates, "
        f"{removed} sub-blocks removed)",
    }


# the step table: a step's config class → its handler (recipe.Step lists the same kinds)
HANDLERS: dict[type, StepHandler] = {
    PruneStep: prune_step,
    NasStep: nas_step,
    QuantizeStep: quantize_step,
    DistillStep: distill_step,
}


def apply_step(step: Step, ctx: StepContext) -> dict[str, Any]:
    """Apply one step in place; return its provenance record (with a one-line ``summary``)."""
    handler = HANDLERS.get(type(step))
    if handler is None:
        raise TypeError(f"no handler for step {type(step).__name__}; register it in compress.steps.HANDLERS")
    return handler(step, ctx)
