"""Puzzle glue: score the library once (cached on disk), solve the MILP for a budget, realise the choice.

The realised model is the parent with every sub-block replaced by its chosen variant through the pruner's surgery
(explicit per-layer KV groups and MLP widths, no-ops as skipped sub-blocks), so checkpoints, reload and
provenance are those of any prune step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from compress.adapters import Arch, AttentionLayout, attention_layout, decoder_layers, model_config
from compress.calibration import LayerInputs, LayerStats
from compress.checkpoint import tensor_sha256
from compress.loading import cache_dir as secateurs_cache
from compress.prune.allocate import ModuleUnits
from compress.prune.pruner import collect_statistics, count_parameters, module_units, prunable_parameters
from compress.puzzle.config import PuzzleConfig
from compress.puzzle.library import (
    KINDS,
    BlockShape,
    Variant,
    block_shape,
    library,
    measure_latency,
    realize_sub_block,
    variant_kv_bytes,
    variant_params,
)
from compress.puzzle.milp import MilpSolution, solve_choice
from compress.puzzle.recover import keep_masks, reconstruct_choice
from compress.puzzle.score import dense_cache, layer_inputs, score_sub_block
from compress.recipe import PruneConfig
from compress.recover.least_squares import RIDGE_GRID
from compress.recover.reconstruct import reconstruct_layer
from quant.errors import InputError

log = logging.getLogger("secateurs")


@dataclass
class ScoredLibrary:
    """Variants, scores and costs of every sub-block (groups [L0 attn, L0 mlp, L1 attn, ...]); JSON-cacheable."""

    variants: list[list[str]]  # labels, e.g. "mlp:768", "attn:noop"
    scores: dict[str, list[list[float]]]  # "kl", "lm_loss", "local"
    exact: list[list[bool]]
    costs: dict[str, list[list[float]]]  # "params", "kv_bytes", "latency_s"
    fixed_params: int  # parameters outside the decoder sub-blocks (embeddings, final norm, head)
    dense_loss: float
    timing: dict[str, Any] = field(default_factory=dict)

    def parsed(self, g: int) -> list[Variant]:
        return [Variant.parse(label) for label in self.variants[g]]

    def dense_cost(self, name: str) -> float:
        return float(sum(row[0] for row in self.costs[name]))


def _library_key(
    model: nn.Module,
    stats: list[LayerStats],
    ids: Tensor,
    cfg: PuzzleConfig,
    shape: BlockShape,
    fit_ids: Tensor | None = None,
) -> str:
    """Parent weights, the statistics that choose units and compensate, scoring tokens and library settings."""
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor_sha256(p).encode())
    for layer_stats in stats:
        for name, st in sorted(layer_stats.items()):
            digest.update(name.encode() + tensor_sha256(st.total).encode() + tensor_sha256(st.total_sq).encode())
    digest.update(tensor_sha256(ids).encode())
    settings = {"estimate": cfg.estimate, "mlp_steps": cfg.mlp_steps, "noop": cfg.allow_noop, **asdict(shape)}
    if cfg.allow_linear:  # (absent otherwise: the keys of earlier libraries stay valid)
        settings["linear"] = True
    if cfg.repair != "bias":
        settings["repair"] = cfg.repair
    if cfg.allow_linear or cfg.repair != "bias":
        settings["fit"] = tensor_sha256(fit_ids) if fit_ids is not None else None
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:24]


def fit_tokens(calibration: Tensor, cfg: PuzzleConfig) -> Tensor | None:
    """The windows linear replacements and least-squares repairs are fitted on ([fit_samples, seq_len]): the
    ``cfg.fit_samples`` calibration rows after the ``cfg.samples`` scoring rows, so such a variant is scored out of
    sample; None when the library fits nothing. Raises InputError when the calibration has too few windows."""
    if not cfg.allow_linear and cfg.repair == "bias":
        return None
    need = cfg.samples + cfg.fit_samples
    if calibration.shape[0] < need:
        raise InputError(
            f"puzzle.fit_samples: linear replacements and least-squares repairs are fitted on {cfg.fit_samples} "
            f"calibration windows after the {cfg.samples} scoring ones, so calibration.samples must be at least "
            f"{need} (got {calibration.shape[0]})"
        )
    return calibration[cfg.samples : need, : cfg.seq_len]


def repair_variant(
    layer: nn.Module,
    arch: Arch,
    layout: AttentionLayout,
    stats: LayerStats,
    units: tuple[ModuleUnits, ModuleUnits],
    v: Variant,
    inputs: LayerInputs,
) -> None:
    """Realise a narrower attention/MLP variant of the parent ``layer`` with a ridge least-squares refit of its
    consumer (α per consumer from RIDGE_GRID on held-out mini-batches of ``inputs``) to the parent sub-block's
    output, on the parent's inputs ``inputs`` (replace-one-block: both streams are the parent's); the same
    :func:`compress.recover.reconstruct.reconstruct_layer` walk a prune step with ``reconstruct: least_squares``
    runs on the compressed prefix."""
    attn = v if v.kind == "attn" else Variant("attn", units[0].scores.numel())  # the other sub-block stays whole
    mlp = v if v.kind == "mlp" else Variant("mlp", units[1].scores.numel())
    attn_keep, mlp_keep = keep_masks(units, attn, mlp)
    means = (stats["o"].mean, stats["down"].mean)
    reconstruct_layer(layer, arch, layout, attn_keep, mlp_keep, inputs, inputs, RIDGE_GRID, means)


def score_library(
    model: nn.Module,
    arch: Arch,
    stats: list[LayerStats],
    ids: Tensor,
    cfg: PuzzleConfig,
    batch_size: int = 4,
    fit_ids: Tensor | None = None,
) -> ScoredLibrary:
    """Replace-one-block scores on the scoring tokens ``ids`` and exact costs of every variant, from the parent
    ``model`` (left unchanged); linear replacements are fitted on the parent's layer inputs for ``fit_ids``
    (:func:`fit_tokens`, disjoint from ``ids``)."""
    shape = block_shape(model, arch)
    layers = decoder_layers(model, arch)
    config = model_config(model)
    units = module_units(model, arch, PruneConfig(method="flap"), stats)
    groups = library(shape, len(layers), cfg.mlp_steps, cfg.allow_noop, cfg.allow_linear)
    load_before = os.getloadavg()
    clock = time.perf_counter()
    cache = dense_cache(model, arch, ids, batch_size)
    fits = cfg.allow_linear or cfg.repair == "least_squares"
    if fits and fit_ids is None:
        raise ValueError("a library with linear replacements or least-squares repairs needs the fit tokens")
    fit = layer_inputs(model, arch, fit_ids, batch_size) if fits and fit_ids is not None else None
    dense_seconds = time.perf_counter() - clock

    def realize(layer: nn.Module, index: int, v: Variant) -> None:
        layout = attention_layout(config, layer, arch)
        if cfg.repair == "least_squares" and v.units > 0 and fit is not None:
            repair_variant(layer, arch, layout, stats[index], units[index], v, fit[index])
            return
        inputs = fit[index] if v.linear and fit is not None else None  # fitted on the parent's inputs, out of sample
        realize_sub_block(layer, arch, layout, stats[index], units[index], v, inputs)

    scores: dict[str, list[list[float]]] = {"kl": [], "lm_loss": [], "local": []}
    exact: list[list[bool]] = []
    per_variant: list[float] = []
    for g, variants in enumerate(groups):
        index = g // 2
        result = score_sub_block(model, arch, cache, index, variants, realize, cfg.estimate)
        scores["kl"].append([s.kl for s in result])
        scores["lm_loss"].append([s.lm_loss for s in result])
        scores["local"].append([s.local for s in result])
        exact.append([s.exact for s in result])
        per_variant += [s.seconds for s in result[1:]]
        log.info("puzzle: scored layer %d %s (%d variants)", index, variants[0].kind, len(variants) - 1)
    latency = measure_latency(model, arch, stats, units, groups, cache.inputs[min(1, len(layers) - 1)])
    fixed = count_parameters(model) - sum(variant_params(shape, vs[0]) for vs in groups)
    return ScoredLibrary(
        variants=[[v.label for v in vs] for vs in groups],
        scores=scores,
        exact=exact,
        costs={
            "params": [[float(variant_params(shape, v)) for v in vs] for vs in groups],
            "kv_bytes": [[float(variant_kv_bytes(shape, v)) for v in vs] for vs in groups],
            "latency_s": [[latency[v] for v in vs] for vs in groups],
        },
        fixed_params=fixed,
        dense_loss=cache.loss,
        timing={
            "dense_pass_s": round(dense_seconds, 2),
            "variants": len(per_variant),
            "scoring_s": round(time.perf_counter() - clock, 2),
            "mean_per_variant_s": round(sum(per_variant) / max(len(per_variant), 1), 3),
            "tokens": int(ids.numel()),
            "threads": torch.get_num_threads(),
            # 1/5/15-minute load average before and after: above the thread count the times are upper bounds
            "load_before_after": [[round(v, 2) for v in load] for load in (load_before, os.getloadavg())],
        },
    )


def cached_library(
    model: nn.Module,
    arch: Arch,
    stats: list[LayerStats],
    ids: Tensor,
    cfg: PuzzleConfig,
    batch_size: int = 4,
    fit_ids: Tensor | None = None,
) -> tuple[ScoredLibrary, bool]:
    """The scored library from the on-disk cache (keyed by parent weights, scoring and fit tokens, settings) or
    scored now and stored; returns (library, came from the cache)."""
    key = _library_key(model, stats, ids, cfg, block_shape(model, arch), fit_ids)
    folder = Path(cfg.cache_dir) if cfg.cache_dir else secateurs_cache() / "puzzle"
    path = folder / f"library-{key}.json"
    if path.exists():
        return ScoredLibrary(**json.loads(path.read_text())), True
    lib = score_library(model, arch, stats, ids, cfg, batch_size, fit_ids)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(lib)))
    tmp.replace(path)
    return lib, False


def solve_budget(
    lib: ScoredLibrary,
    score: str,
    params_budget: float | None,
    kv_ratio: float | None = None,
    latency_ratio: float | None = None,
    time_limit: float = 60.0,
) -> MilpSolution:
    """The MILP on the library: ``params_budget`` bounds the summed sub-block parameters; the ratios bound the KV
    bytes and latency relative to the parent's."""
    budgets: dict[str, float] = {}
    if params_budget is not None:
        budgets["params"] = params_budget
    if kv_ratio is not None:
        budgets["kv_bytes"] = kv_ratio * lib.dense_cost("kv_bytes")
    if latency_ratio is not None:
        budgets["latency_s"] = latency_ratio * lib.dense_cost("latency_s")
    return solve_choice(lib.scores[score], lib.costs, budgets, time_limit)


def apply_choice(
    model: nn.Module,
    arch: Arch,
    stats: list[LayerStats],
    lib: ScoredLibrary,
    choice: list[int],
    ids: Tensor | None = None,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Replace every sub-block of the parent ``model`` by its chosen variant in place; per-layer summary.

    Linear replacements are fitted as they were scored: on the parent's inputs to their layer for the fit tokens
    ``ids`` (:func:`fit_tokens`; one dense pass, only when one is chosen), the MLP before its layer's attention
    changes."""
    config = model_config(model)
    units = module_units(model, arch, PruneConfig(method="flap"), stats)
    layers = decoder_layers(model, arch)
    chosen = [lib.parsed(g)[v] for g, v in enumerate(choice)]
    inputs = None
    if any(v.linear for v in chosen):
        if ids is None:
            raise ValueError("fitting linear replacements needs the fit tokens (fit_tokens)")
        inputs = layer_inputs(model, arch, ids, batch_size)
    for g in [g for index in range(len(layers)) for g in (2 * index + 1, 2 * index)]:
        index, v = g // 2, chosen[g]
        layer = layers[index]
        layout = attention_layout(config, layer, arch)
        fit_on = inputs[index] if inputs is not None and v.linear else None
        realize_sub_block(layer, arch, layout, stats[index], units[index], v, fit_on, (config, index))
    return choice_summary(chosen)


def choice_summary(chosen: list[Variant]) -> dict[str, Any]:
    """Per-layer provenance of the chosen variants: KV groups, MLP widths, no-op and linear sub-blocks."""
    attn, mlp = chosen[0::2], chosen[1::2]
    return {
        "kv_groups": [v.units for v in attn],
        "intermediate_sizes": [v.units for v in mlp],
        "skipped": [
            [k for k, v in zip(KINDS, pair, strict=True) if v.units == 0] for pair in zip(attn, mlp, strict=True)
        ],
        "linear": [[k for k, v in zip(KINDS, pair, strict=True) if v.linear] for pair in zip(attn, mlp, strict=True)],
    }


def puzzle_widths(
    model: nn.Module, arch: Arch, stats: list[LayerStats], calibration: Tensor, cfg: PuzzleConfig, ratio: float
) -> tuple[list[int], list[int]]:
    """Kept KV groups and MLP channels per layer of the Puzzle-MIP choice at ``ratio`` (0 = no-op), e.g. as a seed
    of a width search; the library comes from its cache (scored once). Linear replacements have no width."""
    if cfg.allow_linear:
        raise InputError("puzzle widths: linear replacements have no width (set puzzle.allow_linear: false)")
    fit_ids = fit_tokens(calibration, cfg)
    lib, _ = cached_library(model, arch, stats, calibration[: cfg.samples, : cfg.seq_len], cfg, 4, fit_ids)
    budget = count_parameters(model) - ratio * prunable_parameters(model, arch) - lib.fixed_params
    sol = solve_budget(lib, cfg.score, budget, cfg.kv_cache_ratio, cfg.latency_ratio, cfg.time_limit)
    summary = choice_summary([lib.parsed(g)[v] for g, v in enumerate(sol.choice)])
    return summary["kv_groups"], summary["intermediate_sizes"]


def run_puzzle(
    model: nn.Module,
    arch: Arch,
    ratio: float,
    cfg: PuzzleConfig,
    calibration: Tensor | None,
    batch_size: int = 8,
    dense_stats: list[LayerStats] | None = None,
    prune: PruneConfig | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """The ``structure: puzzle`` prune step: remove ``ratio`` of the prunable decoder parameters (and meet the KV
    and latency budgets) with the variants of least summed score; returns the provenance record.

    ``prune`` (the step's config) with ``reconstruct: least_squares`` realises the choice with least-squares
    reconstruction on all of ``calibration`` (:mod:`compress.puzzle.recover`) instead of bias compensation."""
    if calibration is None:
        raise ValueError("puzzle needs calibration data")
    least_squares = prune is not None and prune.reconstruct == "least_squares"
    if prune is not None and prune.replacement != "constant":
        raise InputError(
            "prune.replacement: structure: puzzle chooses linear replacements itself (set puzzle.allow_linear)"
        )
    stats = dense_stats or collect_statistics(model, arch, calibration, batch_size)
    ids = calibration[: cfg.samples, : cfg.seq_len]
    fit_ids = fit_tokens(calibration, cfg)
    lib, cached = cached_library(model, arch, stats, ids, cfg, min(batch_size, 4), fit_ids)
    dense_params = count_parameters(model)
    budget = dense_params - ratio * prunable_parameters(model, arch) - lib.fixed_params
    sol = solve_budget(lib, cfg.score, budget, cfg.kv_cache_ratio, cfg.latency_ratio, cfg.time_limit)
    refit = None
    if least_squares:
        assert prune is not None
        chosen = [lib.parsed(g)[v] for g, v in enumerate(sol.choice)]
        units = module_units(model, arch, PruneConfig(method="flap"), stats)
        alphas = RIDGE_GRID if prune.ridge is None else [prune.ridge]
        refit = reconstruct_choice(model, arch, stats, units, chosen, calibration, alphas, batch_size, device)
        record = choice_summary(chosen)
    else:
        record = apply_choice(model, arch, stats, lib, sol.choice, fit_ids, min(batch_size, 4))
    realised = count_parameters(model)
    predicted = lib.fixed_params + int(sol.costs["params"])
    if realised != predicted:  # the solver's costs must be the realised model's
        raise RuntimeError(f"puzzle: realised {realised} parameters but the library predicted {predicted}")
    return {
        **record,
        "parameters": realised,
        "milp": {
            "objective": sol.objective,
            "gap": sol.gap,
            "seconds": round(sol.seconds, 3),
            "costs": sol.costs,
            "score": cfg.score,
        },
        "library": {"cached": cached, **lib.timing},
        **({"refit_residual": refit} if refit is not None else {}),
        "equivalent_prune_step": None  # linear maps fitted by the library: no prune step reproduces them
        if any(record["linear"])
        else {
            "method": "flap",
            "attn_groups": record["kv_groups"],
            "mlp_channels": record["intermediate_sizes"],
            "bias_compensation": True,
            **({"reconstruct": "least_squares", "ridge": prune.ridge} if least_squares and prune else {}),
        },
    }
