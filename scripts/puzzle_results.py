"""Regenerate docs/results/puzzle.md: Puzzle-MIP on SmolLM2-135M at several parameter ratios and one latency
budget, against FLAP's AL-AM and UL-MM structures (rows of docs/results/pruning.json, same protocol).

    python scripts/puzzle_results.py [--ratios 0.5 0.2 0.3] [--mlp-steps 8] [--estimate exact|local]
        [--allow-linear|--no-allow-linear] [--out docs/results]

Cost on a 2-core CPU: one dense statistics pass (128 × 128 tokens), the library scoring (see the scoring table in
the output: about layers × (1 tail pass + variants × one layer) for ``--estimate local``, layers × variants / 2
forward passes for ``exact``), then per budget a MILP (< 1 s) and one held-out evaluation (64 × 256 tokens).
Partial results are written after every row.

Further modes, each adding to puzzle.json (each recomputes the FLAP statistics and reads the scored library from
its cache):

    python scripts/puzzle_results.py --recovery ls [--ratios ...] [--methods Puzzle-MIP UL-MM AL-AM ...]
    python scripts/puzzle_results.py --recovery bld      # least squares + blockwise local distillation
    python scripts/puzzle_results.py --latency-match [--flap-ratios 0.3 0.4 0.5] [--rounds 15]
    python scripts/puzzle_results.py --time-scoring 15   # re-time the scoring of one layer's variants
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from puzzle_report import BASELINES, PUZZLE_METHODS, RECOVERY_METHODS, render

from compress.adapters import arch_for
from compress.corpus import calibration_batches
from compress.evaluate import perplexity
from compress.loading import load_model
from compress.prune.pruner import (
    collect_statistics,
    count_parameters,
    module_units,
    plan_masks,
    prunable_parameters,
    prune_model,
)
from compress.puzzle.config import PuzzleConfig
from compress.puzzle.score import dense_cache, kl_divergence
from compress.puzzle.step import (
    ScoredLibrary,
    apply_choice,
    cached_library,
    choice_summary,
    fit_tokens,
    solve_budget,
)
from compress.recipe import CalibrationConfig, PerplexityConfig, PruneConfig


@torch.no_grad()
def forward_latency(model: torch.nn.Module, ids: torch.Tensor, repeats: int = 7) -> float:
    model(input_ids=ids, use_cache=False)
    times = []
    for _ in range(repeats):
        clock = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        times.append(time.perf_counter() - clock)
    return statistics.median(times)


def predicted_sum(lib: ScoredLibrary, choice: list[int], score: str) -> float:
    return float(sum(lib.scores[score][g][v] for g, v in enumerate(choice)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.2, 0.3])
    parser.add_argument("--latency-ratio", type=float, default=0.7)
    parser.add_argument("--mlp-steps", type=int, default=8)
    parser.add_argument("--estimate", choices=["exact", "local"], default="exact")
    parser.add_argument(
        "--allow-linear",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a linear-replacement variant of every sub-block in the library (--no-allow-linear: the earlier library)",
    )
    parser.add_argument("--score", choices=["kl", "lm_loss"], default="kl")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render", action="store_true", help="only rewrite puzzle.md from puzzle.json")
    parser.add_argument(
        "--recovery",
        choices=["ls", "bld"],
        help="only add rows with recovery to puzzle.json (resumable; rows already there are kept): ls = least-squares "
        "reconstruction, bld = least squares + blockwise local distillation",
    )
    parser.add_argument("--methods", nargs="+", default=list(RECOVERY_METHODS), help="with --recovery")
    parser.add_argument("--evals", nargs="+", default=["web:eval"], help="with --recovery: held-out texts")
    parser.add_argument("--bld-steps", type=int, default=12)
    parser.add_argument("--bld-lr", type=float, default=3e-4)
    parser.add_argument("--bld-samples", type=int, default=32)
    parser.add_argument(
        "--ls-samples", type=int, default=32, help="with --recovery: calibration windows of the least-squares refit"
    )
    parser.add_argument(
        "--latency-match",
        action="store_true",
        help="only time the latency-budgeted Puzzle model against FLAP models at --flap-ratios (interleaved, same "
        "process) and add the FLAP model of equal measured forward time to puzzle.json",
    )
    parser.add_argument("--flap-ratios", type=float, nargs="+", default=[0.3, 0.4, 0.5])
    parser.add_argument("--rounds", type=int, default=15, help="with --latency-match: interleaved timing rounds")
    parser.add_argument(
        "--time-scoring",
        type=int,
        metavar="LAYER",
        help="only re-time the scoring of both sub-blocks of decoder layer LAYER (dense pass, per-variant seconds, "
        "load average) and add it to puzzle.json",
    )
    args = parser.parse_args()
    out = Path(args.out)
    if args.render:
        (out / "puzzle.md").write_text(render(json.loads((out / "puzzle.json").read_text())))
        return
    if args.recovery:
        recovery_rows(args, out)
        return
    if args.latency_match:
        latency_match(args, out)
        return
    if args.time_scoring is not None:
        time_scoring(args, out)
        return
    previous = json.loads((out / "puzzle.json").read_text()) if (out / "puzzle.json").exists() else {}
    timing: dict[str, Any] = {}
    dense, tokenizer, arch, ids, stats, lib, pcfg = _setup(args, timing)
    cal = CalibrationConfig()
    score_ids = ids[: pcfg.samples, : pcfg.seq_len]
    print(f"library: {lib.timing} {timing}", flush=True)
    cache = dense_cache(dense, arch, score_ids)  # for the realised models' KL on the scoring tokens
    dense_params, prunable = count_parameters(dense), prunable_parameters(dense, arch)
    baseline = json.loads((out / "pruning.json").read_text())
    latency_ids = ids[:1]
    dense_latency = forward_latency(dense, latency_ids)
    report: dict[str, Any] = {
        "model": args.model,
        "calibration": {"samples": cal.samples, "seq_len": cal.seq_len, "seed": args.seed},
        "puzzle": pcfg.model_dump(mode="json"),
        "statistics_seconds": timing["statistics_s"],
        "library": {
            "cached": timing["cached"],
            **lib.timing,
            "variants_per_sub_block": [len(v) for v in lib.variants],
        },
        "dense": {"params": dense_params, "prunable": prunable, "forward_s": round(dense_latency, 4)},
        "baselines": [r for r in baseline["rows"] if r["method"] in BASELINES],
        "eval_protocol": baseline.get("eval_protocol"),
        "rows": [],
        # rows with recovery that do not depend on the library (the FLAP baselines, the NSGA-II trial) are kept
        "recovery_rows": [r for r in previous.get("recovery_rows", []) if r["method"] not in PUZZLE_METHODS],
    }
    if "dense_ppl" in previous:
        report["dense_ppl"] = previous["dense_ppl"]
    trial = copy.deepcopy(dense)
    prune_model(trial, arch, nsga2_trial(), None, 8, None, stats)
    report["nsga2"] = {
        "trial": 53,
        "params": count_parameters(trial),
        "prunable_removed": 1 - prunable_parameters(trial, arch) / prunable,
        "ppl": round(perplexity(trial, tokenizer, PerplexityConfig())["perplexity"], 3),
    }
    del trial
    print(json.dumps(report["nsga2"]), flush=True)
    budgets: list[tuple[str, float | None, float | None]] = [(f"params {r:.0%}", r, None) for r in args.ratios]
    budgets.append((f"latency ≤ {args.latency_ratio:.2f}× dense sub-blocks", None, args.latency_ratio))
    for name, ratio, lat in budgets:
        params_budget = None if ratio is None else dense_params - ratio * prunable - lib.fixed_params
        sol = solve_budget(lib, pcfg.score, params_budget, None, lat, pcfg.time_limit)
        model = copy.deepcopy(dense)
        record = apply_choice(model, arch, stats, lib, sol.choice, fit_tokens(ids, pcfg))
        params = count_parameters(model)
        assert params == lib.fixed_params + int(sol.costs["params"]), "library costs must be exact"
        with torch.no_grad():
            logq = torch.cat([model(input_ids=b).logits.float().log_softmax(-1) for b in score_ids.split(4)])
        ppl = perplexity(model, tokenizer, PerplexityConfig())
        row = {
            "budget": name,
            "ratio": ratio,
            "latency_ratio": lat,
            "params": params,
            "prunable": prunable_parameters(model, arch),
            "prunable_removed": 1 - prunable_parameters(model, arch) / prunable,
            "ppl": round(ppl["perplexity"], 3),
            "predicted_kl_sum": round(predicted_sum(lib, sol.choice, "kl"), 4),
            "realised_kl": round(float(kl_divergence(cache.log_probs, logq)), 4),
            "milp_seconds": round(sol.seconds, 3),
            "milp_gap": sol.gap,
            "latency_sum_ratio": round(sol.costs["latency_s"] / lib.dense_cost("latency_s"), 3),
            "forward_ratio": round(forward_latency(model, latency_ids) / dense_latency, 3),
            "kv_bytes_ratio": round(sol.costs["kv_bytes"] / lib.dense_cost("kv_bytes"), 3),
            "load": [round(v, 2) for v in os.getloadavg()],
            **record,
        }
        report["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("kv_groups", "intermediate_sizes")}), flush=True)
        (out / "puzzle.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "puzzle.md").write_text(render(report))


def _setup(
    args: argparse.Namespace, timing: dict[str, Any] | None = None
) -> tuple[Any, Any, Any, torch.Tensor, list[Any], ScoredLibrary, PuzzleConfig]:
    """Dense model, tokenizer, arch, calibration tokens, FLAP statistics (recomputed: a pickle cache in /tmp,
    unkeyed by the model, was unsafe) and the scored library (from its cache, or scored now); ``timing`` receives
    the statistics seconds, whether the library came from the cache and the load average around the scoring."""
    loaded = load_model(args.model)
    dense, tokenizer = loaded.model, loaded.tokenizer
    arch = arch_for(dense.config)
    cal = CalibrationConfig()
    pcfg = PuzzleConfig(
        score=args.score,
        estimate=args.estimate,
        samples=args.samples,
        mlp_steps=args.mlp_steps,
        allow_linear=args.allow_linear,
    )
    ids = calibration_batches(tokenizer, cal.data, cal.samples, cal.seq_len, args.seed)
    clock = time.perf_counter()
    stats = collect_statistics(dense, arch, ids, cal.batch_size)
    stats_seconds = time.perf_counter() - clock
    loads = [os.getloadavg()]
    lib, cached = cached_library(
        dense, arch, stats, ids[: pcfg.samples, : pcfg.seq_len], pcfg, 4, fit_tokens(ids, pcfg)
    )
    loads.append(os.getloadavg())
    if not cached:
        print("the library was not in the cache (scored now)", flush=True)
    if timing is not None:
        timing.update(
            statistics_s=round(stats_seconds, 1),
            cached=cached,
            load_before_after=[[round(v, 2) for v in load] for load in loads],
        )
    return dense, tokenizer, arch, ids, stats, lib, pcfg


def latency_match(args: argparse.Namespace, out: Path) -> None:
    """The latency-budgeted Puzzle model against FLAP (AL-AM and UL-MM, bias compensation) at ``--flap-ratios``:
    one 512-token forward of each model per round, models in turn, ``--rounds`` rounds in one process; per model
    the median (and min / max) over rounds of its time relative to the dense model's in the same round. The FLAP
    model whose median ratio is closest to Puzzle's is evaluated (or its PPL taken from pruning.json)."""
    from compress.corpus import eval_windows

    path = out / "puzzle.json"
    report = json.loads(path.read_text())
    dense, tokenizer, arch, ids, stats, lib, pcfg = _setup(args)
    sol = solve_budget(lib, pcfg.score, None, None, args.latency_ratio, pcfg.time_limit)
    models: dict[str, torch.nn.Module] = {"dense": dense, "Puzzle-MIP": copy.deepcopy(dense)}
    apply_choice(models["Puzzle-MIP"], arch, stats, lib, sol.choice, fit_tokens(ids, pcfg))
    for structure_name in ("AL-AM", "UL-MM"):
        for ratio in args.flap_ratios:
            model = copy.deepcopy(dense)
            cfg = PruneConfig(method="flap", ratio=ratio, structure=structure_name)  # type: ignore[arg-type]
            prune_model(model, arch, cfg, None, 8, None, stats)
            models[f"{structure_name} {ratio:g}"] = model
    x = eval_windows(tokenizer, "web:eval", 512, 1)
    times: dict[str, list[float]] = {name: [] for name in models}
    loads = [os.getloadavg()]
    with torch.no_grad():
        for model in models.values():
            model(input_ids=x, use_cache=False)  # warm-up
        for _ in range(args.rounds):
            for name, model in models.items():
                clock = time.perf_counter()
                model(input_ids=x, use_cache=False)
                times[name].append(time.perf_counter() - clock)
    loads.append(os.getloadavg())
    ratios = {n: [t / d for t, d in zip(ts, times["dense"], strict=True)] for n, ts in times.items()}
    summary = {
        n: {
            "median_s": round(statistics.median(times[n]), 4),
            "ratio_median": round(statistics.median(r), 3),
            "ratio_min": round(min(r), 3),
            "ratio_max": round(max(r), 3),
            "params": count_parameters(models[n]),
        }
        for n, r in ratios.items()
    }
    target = summary["Puzzle-MIP"]["ratio_median"]
    flap = [n for n in summary if n not in ("dense", "Puzzle-MIP")]
    best = min(flap, key=lambda n: abs(summary[n]["ratio_median"] - target))
    pruning = {(b["method"], b["ratio"]): b["ppl"] for b in json.loads((out / "pruning.json").read_text())["rows"]}
    structure_name, ratio_text = best.split()
    method = "FLAP (WIFV, AL-AM, dense stats)" if structure_name == "AL-AM" else "FLAP (WIFV, UL-MM)"
    ppl = pruning.get((method, float(ratio_text)))
    if ppl is None:
        ppl = round(perplexity(models[best], tokenizer, PerplexityConfig())["perplexity"], 3)
    puzzle_row = next((r for r in report["rows"] if r.get("latency_ratio") == args.latency_ratio), None)
    report["latency_match"] = {
        "input_tokens": int(x.numel()),
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "load_before_after": [[round(v, 2) for v in load] for load in loads],
        "models": summary,
        "puzzle_ppl": puzzle_row["ppl"] if puzzle_row else None,
        "flap_match": best,
        "flap_ppl": ppl,
        "flap_ppl_from": "pruning.json" if (method, float(ratio_text)) in pruning else "measured here",
        "flap_ratios": [f"{r:g}" for r in args.flap_ratios],
    }
    print(json.dumps(report["latency_match"], indent=1), flush=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    (out / "puzzle.md").write_text(render(report))


def time_scoring(args: argparse.Namespace, out: Path) -> None:
    """Re-time the library scoring on a sample: the dense pass over the scoring tokens and the variants of both
    sub-blocks of one layer (with the library's estimate), with the load average before and after."""
    from compress.adapters import attention_layout, decoder_layers, model_config
    from compress.puzzle.library import block_shape, library, realize_sub_block
    from compress.puzzle.score import score_sub_block

    path = out / "puzzle.json"
    report = json.loads(path.read_text())
    dense, _, arch, ids, stats, _, pcfg = _setup(args)
    score_ids = ids[: pcfg.samples, : pcfg.seq_len]
    loads = [os.getloadavg()]
    clock = time.perf_counter()
    cache = dense_cache(dense, arch, score_ids)
    dense_seconds = time.perf_counter() - clock
    layers = decoder_layers(dense, arch)
    groups = library(block_shape(dense, arch), len(layers), pcfg.mlp_steps, pcfg.allow_noop, pcfg.allow_linear)
    units = module_units(dense, arch, PruneConfig(method="flap"), stats)
    config = model_config(dense)

    def realize(layer: torch.nn.Module, index: int, v: Any) -> None:
        realize_sub_block(layer, arch, attention_layout(config, layer, arch), stats[index], units[index], v)

    per_kind: dict[str, list[float]] = {}
    clock = time.perf_counter()
    for g in (2 * args.time_scoring, 2 * args.time_scoring + 1):
        result = score_sub_block(dense, arch, cache, args.time_scoring, groups[g], realize, pcfg.estimate)
        per_kind[groups[g][0].kind] = [round(r.seconds, 3) for r in result[1:]]
    loads.append(os.getloadavg())
    n_variants = sum(len(vs) - 1 for vs in groups)
    sample = [t for ts in per_kind.values() for t in ts]
    report["scoring_sample"] = {
        "layer": args.time_scoring,
        "estimate": pcfg.estimate,
        "dense_pass_s": round(dense_seconds, 2),
        "variant_seconds": per_kind,
        "sample_s": round(time.perf_counter() - clock, 2),
        "mean_per_variant_s": round(statistics.mean(sample), 3),
        "variants_in_library": n_variants,
        "load_before_after": [[round(v, 2) for v in load] for load in loads],
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(report["scoring_sample"], indent=1), flush=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    (out / "puzzle.md").write_text(render(report))


def nsga2_trial(number: int = 53) -> PruneConfig:
    """The prune step of NSGA-II trial ``number`` (docs/results/search-nsga2/trials.csv; the search recipe's
    ``prune: {method: flap, mlp_step: 32}`` with the trial's per-layer KV groups, MLP channels and removals)."""
    with open(Path("docs/results/search-nsga2/trials.csv"), newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["number"] == str(number))
    layers = sum(1 for k in row if k.startswith("param.mlp_channels."))
    attn = [
        0 if row.get(f"param.attn_skip.L{i}") == "True" else int(row[f"param.attn_groups.L{i}"]) for i in range(layers)
    ]
    mlp = [
        0 if row.get(f"param.mlp_skip.L{i}") == "True" else int(row[f"param.mlp_channels.L{i}"]) for i in range(layers)
    ]
    return PruneConfig(method="flap", mlp_step=32, attn_groups=attn, mlp_channels=mlp)


def recovery_rows(args: argparse.Namespace, out: Path) -> None:
    """Rows with recovery (``--recovery ls|bld``), one (ratio, method) at a time, written after each row.

    Least squares: the prune step's ridge least-squares reconstruction (α per consumer from RIDGE_GRID on held-out
    calibration mini-batches) on the same 128 × 128 calibration tokens as the statistics; Puzzle-MIP realises the
    choice of the training-free row through :func:`compress.puzzle.recover.reconstruct_choice`. BLD: the recovery
    recipe's budgets (``--bld-steps`` steps per layer, lr ``--bld-lr``, 4 windows per step drawn from
    ``--bld-samples`` windows of ``mix:calibration`` with seed + 1, dense inputs) on top of the least-squares model."""
    from compress.puzzle.recover import reconstruct_choice
    from compress.recover.distill import TrainSettings, distill_blocks
    from compress.recover.least_squares import RIDGE_GRID

    path = out / "puzzle.json"
    report = json.loads(path.read_text())
    rows: list[dict[str, Any]] = report.setdefault("recovery_rows", [])
    done = {(r["ratio"], r["method"], r["recovery"]) for r in rows}
    dense, tokenizer, arch, ids, stats, lib, pcfg = _setup(args)
    ls_ids = ids[: args.ls_samples]
    prunable = prunable_parameters(dense, arch)
    units = module_units(dense, arch, PruneConfig(method="flap"), stats)
    train_ids = calibration_batches(tokenizer, "mix:calibration", args.bld_samples, 128, args.seed + 1)
    report.setdefault("dense_ppl", {"web:eval": next(b["ppl"] for b in report["baselines"] if b["method"] == "dense")})
    for data in args.evals:
        if data not in report["dense_ppl"]:
            report["dense_ppl"][data] = round(
                perplexity(dense, tokenizer, PerplexityConfig(data=data))["perplexity"], 3
            )
    plan = [(r, m) for r in args.ratios for m in args.methods if m != "NSGA-II trial 53" or r == 0.2]
    libraries = {"Puzzle-MIP": (lib, pcfg)}
    if any(m == PUZZLE_METHODS[1] and (r, m, args.recovery) not in done for r, m in plan):
        # the library scored as the refit realises it: narrower variants with their consumer refitted by least
        # squares on the fit windows (replace-one-block), linear replacements as before
        ls_cfg = pcfg.model_copy(update={"repair": "least_squares"})
        loads = [os.getloadavg()]
        clock = time.perf_counter()
        ls_lib, cached = cached_library(
            dense, arch, stats, ids[: ls_cfg.samples, : ls_cfg.seq_len], ls_cfg, 4, fit_tokens(ids, ls_cfg)
        )
        loads.append(os.getloadavg())
        libraries[PUZZLE_METHODS[1]] = (ls_lib, ls_cfg)
        report["library_ls"] = {"cached": cached, **ls_lib.timing, "wall_s": round(time.perf_counter() - clock, 1)}
        print("LS library", report["library_ls"], flush=True)
    for ratio, method in plan:
        key_ratio = 0.2 if method == "NSGA-II trial 53" else ratio
        if (key_ratio, method, args.recovery) in done:
            continue
        model = copy.deepcopy(dense)
        clock = time.perf_counter()
        extra: dict[str, Any] = {}
        if method in PUZZLE_METHODS:
            mlib, mcfg = libraries[method]
            budget = count_parameters(dense) - ratio * prunable - mlib.fixed_params
            sol = solve_budget(mlib, mcfg.score, budget, None, None, mcfg.time_limit)
            chosen = [mlib.parsed(g)[v] for g, v in enumerate(sol.choice)]
            extra["refit_residual"] = reconstruct_choice(model, arch, stats, units, chosen, ls_ids, RIDGE_GRID)
            assert count_parameters(model) == mlib.fixed_params + int(sol.costs["params"]), "costs must be exact"
            extra.update(choice_summary(chosen))
            extra["predicted_kl_sum"] = round(predicted_sum(mlib, sol.choice, "kl"), 4)
        else:
            cfg = (
                nsga2_trial()
                if method == "NSGA-II trial 53"
                else PruneConfig(method="flap", ratio=ratio, structure=method)  # type: ignore[arg-type]
            )
            cfg = cfg.model_copy(update={"reconstruct": "least_squares"})
            record = prune_model(model, arch, cfg, ls_ids, 8, None, stats)
            extra.update(
                kv_groups=[int(m.sum()) for m in plan_masks(dense, arch, cfg, stats)[0]],
                refit_residual=record["refit_residual"],
            )
            extra["intermediate_sizes"] = [int(m.sum()) for m in plan_masks(dense, arch, cfg, stats)[1]]
        ls_seconds = time.perf_counter() - clock
        name = "least squares"
        if args.recovery == "bld":
            clock = time.perf_counter()
            bld = TrainSettings(steps=args.bld_steps, lr=args.bld_lr)
            extra["block_loss"] = distill_blocks(dense, model, arch, train_ids, bld, args.seed, "dense", 4)
            extra["bld"] = {**bld.__dict__, "windows": args.bld_samples, "data": "mix:calibration", "batch": 4}
            extra["bld_seconds"] = round(time.perf_counter() - clock, 1)
            name = "least squares + BLD"
        ppl = {d: round(perplexity(model, tokenizer, PerplexityConfig(data=d))["perplexity"], 3) for d in args.evals}
        row = {
            "ratio": key_ratio,
            "method": method,
            "recovery": args.recovery,
            "recovery_name": name,
            "params": count_parameters(model),
            "prunable_removed": 1 - prunable_parameters(model, arch) / prunable,
            "ppl": ppl,
            "ls_seconds": round(ls_seconds, 1),
            "ls_windows": int(ls_ids.shape[0]),
            "load": [round(x, 2) for x in os.getloadavg()],
            **extra,
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("refit_residual", "block_loss")}), flush=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        (out / "puzzle.md").write_text(render(report))
        del model


if __name__ == "__main__":
    main()
