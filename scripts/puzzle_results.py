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


def structure(record: dict[str, Any]) -> str:
    """Per layer "KV groups/MLP width", "L" for a linear replacement, "–" for a no-op sub-block."""
    linear = record.get("linear") or [[] for _ in record["kv_groups"]]
    return " ".join(
        f"{'L' if 'attn' in lin else a or '–'}/{'L' if 'mlp' in lin else m or '–'}"
        for a, m, lin in zip(record["kv_groups"], record["intermediate_sizes"], linear, strict=True)
    )


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


BASELINES = ("dense", "FLAP (WIFV, AL-AM, dense stats)", "FLAP (WIFV, UL-MM)")
RECOVERY_METHODS = ("Puzzle-MIP", "UL-MM", "AL-AM", "NSGA-II trial 53", "Puzzle-MIP (LS library)")
PUZZLE_METHODS = ("Puzzle-MIP", "Puzzle-MIP (LS library)")


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


def load_note(loads: list[list[float]] | None) -> str:
    """What the 1-minute load average around a timing says about it (2 cores)."""
    if not loads:
        return "load average not recorded: on this shared 2-core machine the times are upper bounds"
    worst = max(load[0] for load in loads)
    text = f"1/5/15-minute load average {' → '.join('/'.join(f'{v:.1f}' for v in load) for load in loads)}"
    return text + (": the machine was otherwise idle" if worst <= 2.5 else ": shared with other jobs, upper bounds")


def render(report: dict[str, Any]) -> str:
    lib, p = report["library"], report["puzzle"]
    lines = [
        "# Puzzle-MIP on SmolLM2-135M-Instruct",
        "",
        "Regenerate with `python scripts/puzzle_results.py` (the training-free rows), then `--recovery ls` (the "
        "rows with least-squares reconstruction, resumable), `--latency-match` and `--time-scoring 15`; each "
        "writes this file and `puzzle.json`.",
        "",
        "- Library: per layer attention with 3/2/1 KV groups (FLAP WIFV groups, bias compensation)"
        + (
            ", a linear replacement (ridge least-squares map hidden → hidden, fitted on the "
            f"{p.get('fit_samples')} calibration windows after the scoring ones)"
            if p.get("allow_linear")
            else ""
        )
        + f" or no-op (not layer 0), MLP widths on a grid of 1/{p['mlp_steps']} of 1,536 channels"
        + (", a linear replacement" if p.get("allow_linear") else "")
        + f" or no-op; {sum(lib['variants_per_sub_block'])} variants in {len(lib['variants_per_sub_block'])} "
        "sub-blocks"
        + (
            "."
            if p.get("allow_linear")
            else ". No linear-replacement variant (this library was scored before `puzzle.allow_linear` existed)."
        ),
        f"- Scores: replace-one-block {p['score']} against the dense model's next-token distribution on "
        f"{lib['tokens']} calibration tokens ({p['samples']} × {p['seq_len']}), estimate `{p['estimate']}`"
        + (
            " (the no-op of every sub-block through the rest of the model; the other variants by their local "
            "output error scaled to it)."
            if p["estimate"] == "local"
            else " (every variant through the rest of the model)."
        ),
        f"- Scoring cost: dense pass {lib['dense_pass_s']} s, {lib['variants']} variants in {lib['scoring_s']} s "
        f"({lib['mean_per_variant_s']} s per variant, {lib['threads']} threads), on top of the FLAP statistics "
        f"pass ({report['statistics_seconds']} s); " + load_note(lib.get("load_before_after")) + ".",
        "- Evaluation: held-out perplexity on `web:eval`, 64 windows × 256 tokens, as in [pruning.md](pruning.md); "
        "the AL-AM and UL-MM rows are copied from `pruning.json` (same model, calibration, protocol).",
        "- MILP: SciPy `milp` (HiGHS), one binary per variant; `gap` is the relative optimality gap HiGHS proved "
        "(0: proven optimal).",
        "- `prunable removed` counts the attention/MLP linears removed; a linear replacement (hidden² + hidden "
        "parameters) is counted outside them, so Puzzle rows with linear replacements remove more prunable "
        "parameters than the budget ratio while `parameters` (the budgeted quantity) matches the baselines'.",
        "- `predicted` = Σ of the chosen variants' replace-one-block KL (the additive model the MILP optimises); "
        "`realised` = KL of the chosen model on the same scoring tokens.",
        "",
        "| budget | method | parameters | prunable removed | held-out PPL | predicted / realised KL | MILP s (gap) |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in report["baselines"]:
        removed = b.get("prunable_removed", 0.0)
        lines.append(f"| {b['ratio']:.0%} | {b['method']} | {b['params']:,} | {removed:.2%} | {b['ppl']:.2f} | | |")
    for r in report["rows"]:
        lines.append(
            f"| {r['budget']} | Puzzle-MIP | {r['params']:,} | {r['prunable_removed']:.2%} | {r['ppl']:.2f} | "
            f"{r['predicted_kl_sum']:.3f} / {r['realised_kl']:.3f} | {r['milp_seconds']:.3f} ({r['milp_gap']:.1e}) |"
        )
    lines += []
    nsga = report.get("nsga2")
    if nsga:
        lines.append(
            f"| ~20% | best NSGA-II trial (trial {nsga['trial']} of [search.md](search.md)) | {nsga['params']:,} | "
            f"{nsga['prunable_removed']:.2%} | {nsga['ppl']:.2f} | | |"
        )
    lines += [
        "",
        "The NSGA-II row is the trial's structure (100 trials, selection on calibration text; it exists only near "
        "20 %) pruned again here with this script's statistics and evaluated with the same protocol."
        + ("" if p["estimate"] == "exact" else " Not run: exact (non-`local`) scores.")
        + ("" if report.get("recovery_rows") else " Not run: rows with recovery.")
        + ("" if report.get("latency_match") else " Not run: FLAP at equal measured latency."),
        "",
        "## Scoring cost and how it scales",
        "",
        "With N layers, V variants per layer and T scoring tokens, one forward pass costs ∝ N·T. The parent's "
        "input to every layer is cached once (memory N·T·hidden), so a variant at layer i runs layers i..N−1 and "
        "the head only: exact scoring costs Σ_i V·(N−i)/N ≈ V·N/2 forward passes, i.e. O(V·N²·T) layer "
        "evaluations. The `local` estimate runs the tail only for one anchor per sub-block (≈ N forward passes) "
        "and one layer per other variant (≈ V forward passes): O((N + V)·N·T). Memory: one extra layer at a time "
        "plus the cached inputs and the parent's log-probabilities (T × vocabulary).",
    ]
    lines += recovery_section(report)
    lines += latency_section(report)
    lines += scoring_sample(report)
    lines += ["", "## Against the baselines at equal parameter ratio (training-free)", ""] + comparisons(report)
    lines += goals_section(report)
    lines += [
        "",
        "## Chosen structure per layer (KV groups / MLP channels, L = linear replacement, – = no-op)",
        "",
        "Forward ratio: one 128-token forward of the chosen model against the dense model's, timed when the row was "
        "made (" + load_note([r["load"] for r in report["rows"] if "load" in r] or None) + "); Σ block latency: "
        "the per-variant latencies measured during the scoring.",
        "",
    ]
    for r in report["rows"]:
        lines.append(
            f"- **{r['budget']}** (forward {r['forward_ratio']:.2f}× dense measured, Σ block latency "
            f"{r['latency_sum_ratio']:.2f}×, KV cache {r['kv_bytes_ratio']:.2f}×): `{structure(r)}`"
        )
    return "\n".join(lines) + "\n"


def recovery_section(report: dict[str, Any]) -> list[str]:
    """The rows with recovery (``--recovery``): PPL per held-out text, parameters, structure, seconds, load."""
    rows = report.get("recovery_rows", [])
    if not rows:
        return []
    texts = sorted({d for r in rows for d in r["ppl"]}, key=lambda d: (d != "web:eval", d))
    dense = report.get("dense_ppl", {})
    lines = [
        "",
        "## With recovery",
        "",
        "Least squares: the prune step's ridge least-squares reconstruction of the kept consumers (o_proj / "
        "down_proj; inputs from the compressed prefix, targets from the dense model; α per consumer from "
        "0.01..1e4 on held-out calibration mini-batches) on the first "
        f"{rows[0].get('ls_windows', 128)} × 128 of the `web:calibration` windows the statistics (128 × 128) came "
        "from; no-ops keep FLAP's constant. Puzzle-MIP: the "
        "training-free row's choice (same library and "
        "budget) realised with that refit (`structure: puzzle` + `reconstruct: least_squares`). Puzzle-MIP (LS "
        "library): the choice from a library whose narrower variants were scored with their consumer refitted by "
        "least squares on the fit windows (`puzzle.repair: least_squares`"
        + (
            f"; scoring {report['library_ls']['scoring_s']:.0f} s, "
            + load_note(report["library_ls"].get("load_before_after"))
            if report.get("library_ls")
            else ""
        )
        + "), realised with the same refit. BLD: blockwise "
        "local distillation after least squares (steps per layer, lr and windows in `puzzle.json`). Evaluation as "
        "above"
        + "".join(f"; dense {d} PPL {v:.2f}" for d, v in dense.items())
        + ". `s` = wall seconds of the refit (+ BLD) on 2 cores, `load` = 1/5/15-minute load average when the row "
        "was written (above 2: the cores were shared with other jobs and `s` is an upper bound).",
        "",
        "`refit residual` = mean over the refitted consumers of the relative residual on the fit tokens / on the "
        "held-out calibration mini-batches (a large gap: the refit overfits the few calibration tokens).",
        "",
        "| ratio | method | recovery | parameters | prunable removed | "
        + " | ".join(f"{d} PPL" for d in texts)
        + " | refit residual | s | load |",
        "|---|---|---|---|---|" + "---|" * len(texts) + "---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["ratio"], r["recovery"], RECOVERY_METHODS.index(r["method"]))):
        ppls = " | ".join(f"{r['ppl'][d]:.2f}" if d in r["ppl"] else "" for d in texts)
        seconds = r["ls_seconds"] + r.get("bld_seconds", 0.0)
        fits = [c for layer in r["refit_residual"] for c in layer.values() if "holdout_residual" in c]
        residual = (
            f"{statistics.mean(c['residual'] for c in fits):.3f} / "
            f"{statistics.mean(c['holdout_residual'] for c in fits):.3f}"
            if fits
            else ""
        )
        lines.append(
            f"| {r['ratio']:.0%} | {r['method']} | {r['recovery_name']} | {r['params']:,} | "
            f"{r['prunable_removed']:.2%} | {ppls} | {residual} | {seconds:.0f} | "
            f"{'/'.join(f'{x:.1f}' for x in r['load'])} |"
        )
    lines += ["", "At equal parameter ratio with the same recovery:", ""]
    for key in sorted({(r["ratio"], r["recovery"]) for r in rows}):
        by = {r["method"]: r["ppl"]["web:eval"] for r in rows if (r["ratio"], r["recovery"]) == key}
        base = {m: by[m] for m in ("AL-AM", "UL-MM") if m in by}
        if not base:
            continue
        best = min(base, key=lambda m: base[m])
        missing = "" if len(base) == 2 else " (the other baseline not measured)"
        name = next(r["recovery_name"] for r in rows if (r["ratio"], r["recovery"]) == key)
        for puzzle in (m for m in PUZZLE_METHODS if m in by):
            verdict = "at or below" if by[puzzle] <= base[best] else "above"
            others = ", ".join(f"{m} {v:.2f} ({by[puzzle] / v - 1:+.1%})" for m, v in base.items())
            lines.append(
                f"- {key[0]:.0%}, {name}: {puzzle} {by[puzzle]:.2f} vs {others}: {verdict} the best measured "
                f"baseline{missing}."
            )
    wanted = [
        (ratio, m)
        for ratio in (0.2, 0.3, 0.5)
        for m in RECOVERY_METHODS[:4]
        if m != RECOVERY_METHODS[3] or ratio == 0.2
    ]
    present = {(r["ratio"], r["method"]) for r in rows}
    absent = [f"{m} {ratio:.0%}" for ratio, m in wanted if (ratio, m) not in present]
    not_run = [f"least squares for {', '.join(absent)} (`--recovery ls` resumes where it stopped)"] if absent else []
    if not any(r["recovery"] == "bld" for r in rows):
        not_run.append("least squares + BLD (`--recovery bld`) for any row")
    if not any("prose:eval" in r["ppl"] for r in rows):
        not_run.append("`prose:eval` (`--evals`)")
    if not_run:
        lines.append("- Not measured: " + "; ".join(not_run) + ".")
    free = {r["ratio"]: r["ppl"] for r in report["rows"] if r["ratio"] is not None}
    for r in rows:
        if r["method"] == "Puzzle-MIP" and r["ratio"] in free:
            ppl = r["ppl"]["web:eval"]
            change = "improves" if ppl < free[r["ratio"]] else "does not improve"
            lines.append(
                f"- {r['ratio']:.0%} Puzzle-MIP: {r['recovery_name']} {ppl:.2f} vs training-free (bias "
                f"compensation) {free[r['ratio']]:.2f}: the refit {change} the same architecture."
            )
    lines += [
        "",
        "Structure per layer of the rows with recovery (KV groups / MLP channels, L = linear replacement, – = no-op):",
        "",
    ]
    seen = set()
    for r in rows:
        key = (r["ratio"], r["method"])
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"- {r['ratio']:.0%} {r['method']}: `{structure(r)}`")
    return lines


def scoring_sample(report: dict[str, Any]) -> list[str]:
    """The re-timed scoring sample (``--time-scoring``) and the whole-library estimate it gives."""
    m = report.get("scoring_sample")
    if not m:
        return []
    before, after = m["load_before_after"]
    total = m["dense_pass_s"] + m["mean_per_variant_s"] * m["variants_in_library"]
    kinds = "; ".join(f"{k}: {', '.join(f'{t:.2f}' for t in ts)} s" for k, ts in m["variant_seconds"].items())
    return [
        "",
        f"Re-timed sample (layer {m['layer']}, both sub-blocks, estimate `{m['estimate']}`, {m['threads']} threads, "
        f"load average 1/5/15 min {'/'.join(f'{v:.1f}' for v in before)} before and "
        f"{'/'.join(f'{v:.1f}' for v in after)} after, 2 cores): dense pass {m['dense_pass_s']:.1f} s; per "
        f"variant ({kinds}; the last of each sub-block is the anchor with its tail pass) mean "
        f"{m['mean_per_variant_s']:.2f} s. Whole library at that rate: {m['dense_pass_s']:.0f} s + "
        f"{m['variants_in_library']} × {m['mean_per_variant_s']:.2f} s ≈ {total / 60:.1f} min, plus the FLAP "
        "statistics pass; the goal of 15 minutes on 2 cores "
        + ("is met at this rate." if total <= 900 else "is not met at this rate.")
        + " The per-variant cost is that of one decoder layer on the scoring tokens plus, for the anchors, the "
        "tail of the model; it grows linearly with the variants per layer and (anchors) quadratically with depth.",
    ]


def latency_section(report: dict[str, Any]) -> list[str]:
    """The latency-budgeted Puzzle model against FLAP at equal measured forward time (``--latency-match``)."""
    m = report.get("latency_match")
    if not m:
        return []
    before, after = m["load_before_after"]
    lines = [
        "",
        "## Latency budget against FLAP at equal measured latency",
        "",
        f"One {m['input_tokens']}-token forward pass per model per round, the models in turn, {m['rounds']} rounds "
        f"in one process ({m['threads']} threads); `ratio` = time / the dense model's time in the same round "
        f"(median, min–max over rounds). {load_note(m['load_before_after'])}. The interleaving makes the ratios "
        "comparable across models.",
        "",
        "| model | parameters | median s | ratio median | ratio min–max |",
        "|---|---|---|---|---|",
    ]
    for name, v in m["models"].items():
        label = name if name in ("dense", "Puzzle-MIP") else f"FLAP {name.split()[0]} ratio {name.split()[1]}"
        if name == "Puzzle-MIP":
            label = "Puzzle-MIP (latency budget)"
        lines.append(
            f"| {label} | {v['params']:,} | {v['median_s']:.3f} | {v['ratio_median']:.3f} | "
            f"{v['ratio_min']:.3f}–{v['ratio_max']:.3f} |"
        )
    puzzle, flap = m["puzzle_ppl"], m["flap_ppl"]
    verdict = "lower" if puzzle is not None and puzzle < flap else "higher"
    flap_ratios = sorted({n.split()[1] for n in m["models"] if n not in ("dense", "Puzzle-MIP")}, key=float)
    ordered = all(
        m["models"][f"{s} {a}"]["ratio_median"] >= m["models"][f"{s} {b}"]["ratio_median"]
        for s in ("AL-AM", "UL-MM")
        for a, b in zip(flap_ratios, flap_ratios[1:], strict=False)
    )
    lines += [
        "",
        f"Closest FLAP model in measured forward time: **{m['flap_match']}** (web:eval PPL {flap:.2f}, "
        f"{m['flap_ppl_from']}) against Puzzle-MIP under the latency budget (PPL {puzzle:.2f}): Puzzle's PPL is "
        f"{verdict} at this match.",
        "",
        ""
        if ordered
        else "**The measurement does not support this match**: the FLAP medians are not ordered by pruning ratio, "
        "so the timing noise exceeds the differences between these models.",
    ]
    return lines


def goals_section(report: dict[str, Any]) -> list[str]:
    """The issue's goals (benchmarks), checked on the rows present."""
    lines = ["", "## Goals (checked on the rows above)", ""]
    base = {(b["ratio"], b["method"]): b["ppl"] for b in report["baselines"]}
    for r in report["rows"]:
        alam, ulmm = base.get((r["ratio"], BASELINES[1])), base.get((r["ratio"], BASELINES[2]))
        if r["ratio"] is None or alam is None or ulmm is None:
            continue
        met = "met" if r["ppl"] <= min(alam, ulmm) else "not met"
        lines.append(
            f"- {r['ratio']:.0%}, training-free: Puzzle-MIP {r['ppl']:.2f} ≤ best of AL-AM / UL-MM "
            f"{min(alam, ulmm):.2f}: {met}"
        )
        if r["ratio"] == 0.5:
            cut = 1 - r["ppl"] / alam
            lines.append(
                f"- 50 %: Puzzle-MIP ≥ 30 % lower PPL than AL-AM: {cut:.1%} lower: {'met' if cut >= 0.3 else 'not met'}"
            )
    rows = report.get("recovery_rows", [])
    for key in sorted({(r["ratio"], r["recovery"]) for r in rows}):
        by = {r["method"]: r["ppl"]["web:eval"] for r in rows if (r["ratio"], r["recovery"]) == key}
        puzzles = [m for m in PUZZLE_METHODS if m in by]
        if puzzles and "AL-AM" in by and "UL-MM" in by:
            best = min(by["AL-AM"], by["UL-MM"])
            name = next(r["recovery_name"] for r in rows if (r["ratio"], r["recovery"]) == key)
            ours = min(puzzles, key=lambda m: by[m])
            lines.append(
                f"- {key[0]:.0%}, {name}: best Puzzle ({ours}) {by[ours]:.2f} ≤ best of AL-AM / UL-MM {best:.2f}: "
                f"{'met' if by[ours] <= best else 'not met'}"
            )
    if report["rows"]:
        worst = max(r["milp_seconds"] for r in report["rows"])
        lines.append(f"- MILP solve under 10 s: slowest {worst:.2f} s: {'met' if worst < 10 else 'not met'}")
    for name, lib in (("", report["library"]), (" (LS library)", report.get("library_ls"))):
        if not lib:
            continue
        total = report["statistics_seconds"] + lib["dense_pass_s"] + lib["scoring_s"]
        lines.append(
            f"- Library scoring{name} under 15 minutes on 2 cores: statistics + dense pass + scoring "
            f"{total / 60:.1f} min ({load_note(lib.get('load_before_after'))}): {'met' if total <= 900 else 'not met'}"
        )
    return lines


def comparisons(report: dict[str, Any]) -> list[str]:
    """One line per Puzzle row with a parameter ratio: its PPL against AL-AM and UL-MM at the same ratio."""
    lines = []
    for r in report["rows"]:
        base = {b["method"]: b["ppl"] for b in report["baselines"] if b["ratio"] == r["ratio"]}
        alam, ulmm = base.get(BASELINES[1]), base.get(BASELINES[2])
        if r["ratio"] is None or alam is None or ulmm is None:
            continue
        best = min(alam, ulmm)
        verdict = "at or below" if r["ppl"] <= best else "above"
        lines.append(
            f"- {r['ratio']:.0%}: Puzzle-MIP {r['ppl']:.2f} vs AL-AM {alam:.2f} ({r['ppl'] / alam - 1:+.1%}) and "
            f"UL-MM {ulmm:.2f} ({r['ppl'] / ulmm - 1:+.1%}): {verdict} the best baseline. Additive prediction "
            f"{r['predicted_kl_sum']:.3f} vs realised KL {r['realised_kl']:.3f} on the scoring tokens."
        )
    return lines or ["- (no Puzzle row at a baseline ratio yet)"]


if __name__ == "__main__":
    main()
