"""The ``nas`` recipe step: search widths and sub-block removal with Φ, then prune the model to the winner."""

from __future__ import annotations

import logging
import time
from typing import Any

from torch import Tensor, nn

from compress.adapters import Arch
from compress.corpus import calibration_batches
from compress.nas.engine import NasEngine
from compress.nas.evolve import EvolutionConfig, evolve
from compress.nas.space import Candidate
from compress.prune.pruner import apply_masks, plan_masks
from compress.recipe import NasConfig

log = logging.getLogger("secateurs")


def run_nas(
    model: nn.Module,
    tokenizer: Any,
    arch: Arch,
    cfg: NasConfig,
    calibration: Tensor | None,
    batch_size: int,
    seed: int,
    calibration_data: str = "web:calibration",
) -> dict[str, Any]:
    """Search (seeded), prune ``model`` in place to the best candidate, return the provenance record.

    FLAP statistics come from ``calibration`` ([n, T] tokens); Φ's gradient traces from a separate draw of
    ``cfg.proxy_samples`` × ``cfg.proxy_seq_len`` tokens of ``calibration_data`` (seed + 1)."""
    if calibration is None:
        raise ValueError("the nas step needs calibration data")
    clock = time.perf_counter()
    proxy_ids = calibration_batches(tokenizer, calibration_data, cfg.proxy_samples, cfg.proxy_seq_len, seed + 1)
    engine = NasEngine(
        model,
        arch,
        calibration,
        proxy_ids,
        batch_size,
        mlp_step=cfg.mlp_step,
        skip_from=cfg.skip_from,
        allow_skip=cfg.allow_skip,
        bias_compensation=cfg.bias_compensation,
    )
    evo = EvolutionConfig(
        ratio=cfg.params_ratio,
        tolerance=cfg.tolerance,
        population=cfg.population,
        generations=cfg.generations,
        elites=cfg.elites,
        p_crossover=cfg.p_crossover,
        p_mutation=cfg.p_mutation,
        seed=seed,
    )
    seeds: list[Candidate] = []
    if cfg.seed_with_flap:
        seeds = [engine.flap_candidate(cfg.params_ratio, cfg.tolerance, seed)]
    seeds.append(engine.uniform_candidate(cfg.params_ratio, cfg.tolerance, seed))
    measured: dict[Candidate, dict[str, Any]] = {}

    def score(cand: Candidate) -> float:
        measured[cand] = engine.measure(cand)
        return float(measured[cand][cfg.proxy])

    def progress(generation: int, best: float) -> None:
        log.info(
            "nas generation %d/%d: best %s %.4f (%d scored)",
            generation + 1,
            evo.generations,
            cfg.proxy,
            best,
            len(measured),
        )

    result = evolve(engine.spec, score, evo, seeds, progress)
    best = result.best
    prune_cfg = engine.prune_config(best)
    attn, mlp = plan_masks(model, arch, prune_cfg, engine.stats)
    apply_masks(model, arch, prune_cfg, engine.stats, attn, mlp)
    skipped = [[n for n, k in (("attn", a), ("mlp", c)) if k == 0] for a, c in zip(best.attn, best.mlp, strict=True)]
    removed = sum(len(s) for s in skipped)
    return {
        "kv_groups": list(best.attn),
        "intermediate_sizes": list(best.mlp),
        "skipped": skipped,
        "equivalent_prune_step": {
            "method": "flap",
            "attn_keep": prune_cfg.attn_keep,
            "mlp_keep": prune_cfg.mlp_keep,
            "mlp_step": prune_cfg.mlp_step,
            "bias_compensation": prune_cfg.bias_compensation,
        },
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
        "base_trace_seconds": round(engine.base_seconds, 2),
        "seconds": round(time.perf_counter() - clock, 2),
        "summary": f"nas {cfg.proxy} params_ratio={cfg.params_ratio} ({len(result.scores)} candidates, "
        f"{removed} sub-blocks removed)",
    }
