"""Regenerate docs/results/recovery.{md,json}: what the recovery steps win back after FLAP pruning.

    python scripts/recovery_results.py [--ratios 0.2 0.5 0.3] [--structures AL-AM UL-MM] [--resume]

For every (ratio, structure): the rows none / bias / least squares / least squares + BLD / + global KD, each with
held-out perplexity on ``web:eval`` (the shipped Bible split) and on ``prose:eval`` (Jane Austen's *Persuasion*,
a domain the model is never calibrated or trained on: only other novels are in the mixture), the wall time of the
recovery (cumulative along the row chain, pruning included), and the tokens it used (calibration + training).
The dense statistics are computed once and shared (their time is added to every row). Rows are written after
each (ratio, structure) block, so an interrupted run keeps what it measured; ``--resume`` skips finished blocks.
Nothing is tuned on an evaluation split: all settings are fixed here before the run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.adapters import arch_for
from compress.corpus import calibration_batches
from compress.evaluate import perplexity
from compress.loading import load_model
from compress.prune.pruner import apply_masks, collect_statistics, plan_masks, prunable_parameters
from compress.recipe import PerplexityConfig, PruneConfig
from compress.recover.distill import TrainSettings, distill_blocks, distill_global
from compress.recover.least_squares import RIDGE_GRID
from compress.recover.reconstruct import reconstruct_model

ROWS = ("none", "bias", "least squares", "least squares + BLD", "+ global KD")
GRID_RATIOS, GRID_STRUCTURES = (0.2, 0.3, 0.5), ("AL-AM", "UL-MM")  # the grid the issue asks for
EVALS = ("web:eval", "prose:eval")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5, 0.3])
    p.add_argument("--structures", nargs="+", default=["AL-AM", "UL-MM"])
    p.add_argument("--calibration", default="mix:calibration")
    p.add_argument("--samples", type=int, default=64, help="calibration windows (statistics + least squares)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument(
        "--alpha",
        type=float,
        nargs="+",
        default=RIDGE_GRID,
        help="ridge (several: chosen on held-out calibration batches)",
    )
    p.add_argument("--train-data", default="mix:calibration")
    p.add_argument("--bld-samples", type=int, default=32)
    p.add_argument("--bld-steps", type=int, default=16)
    p.add_argument("--bld-lr", type=float, default=1e-4)
    p.add_argument("--bld-train", default="all")
    p.add_argument("--kd-samples", type=int, default=32)
    p.add_argument("--kd-steps", type=int, default=16)
    p.add_argument("--kd-lr", type=float, default=2e-5)
    p.add_argument("--batch", type=int, default=4, help="windows per training step")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results")
    p.add_argument("--resume", action="store_true")
    p.add_argument(
        "--only-requested",
        action="store_true",
        help="this output covers only the requested --ratios × --structures (e.g. a larger training budget for "
        "some blocks), not the whole 20/30/50 % × AL-AM/UL-MM grid",
    )
    p.add_argument(
        "--redo",
        nargs="+",
        default=[],
        metavar="RATIO:STRUCTURE",
        help="with --resume: measure these blocks again (e.g. 0.2:AL-AM after a budget change)",
    )
    p.add_argument("--from-log", help="only render: add the rows an interrupted run printed to <out>/recovery.json")
    args = p.parse_args()
    if args.from_log:
        render_log(Path(args.from_log), args)
        return
    torch.manual_seed(args.seed)
    out = Path(args.out)
    path = out / "recovery.json"
    loaded = load_model(args.model)
    dense, tok = loaded.model, loaded.tokenizer
    arch = arch_for(dense.config)
    record: dict[str, Any] = json.loads(path.read_text()) if args.resume and path.is_file() else {}
    record.pop("incomplete", None)
    redo = {_block(float(r), st) for r, st in (item.split(":") for item in args.redo)}
    record["rows"] = [r for r in record.get("rows", []) if _block(r["ratio"], r["structure"]) not in redo]
    for key in redo:
        record.get("block_settings", {}).pop(key, None)
    blocks: dict[str, Any] = record.setdefault("block_settings", {})
    for r in record.get("rows", []):  # rows of an earlier run keep that run's settings
        blocks.setdefault(_block(r["ratio"], r["structure"]), record.get("settings", {}))
    record.update({"settings": vars(args), "threads": torch.get_num_threads(), "cpu": platform.processor()})
    if args.only_requested:
        requested = {_block(r, st) for r in args.ratios for st in args.structures}
        requested |= {_block(r["ratio"], r["structure"]) for r in record.get("rows", [])}
        record["grid"] = sorted(set(record.get("grid", [])) | requested)
    rows: list[dict[str, Any]] = record.setdefault("rows", [])

    def ppl(model: torch.nn.Module) -> dict[str, float]:
        cfgs = [PerplexityConfig(data=d, seq_len=256, max_windows=args.eval_windows) for d in EVALS]
        return {c.data: round(perplexity(model, tok, c)["perplexity"], 3) for c in cfgs}

    if "dense" not in record:
        record["dense"] = ppl(dense)
        _write(out, record)
    print("dense", record["dense"], flush=True)
    clock = time.perf_counter()
    ids = calibration_batches(tok, args.calibration, args.samples, args.seq_len, args.seed)
    stats = collect_statistics(dense, arch, ids, 8)
    stats_seconds = time.perf_counter() - clock
    n_train = max(args.bld_samples, args.kd_samples)
    train_ids = calibration_batches(tok, args.train_data, n_train, args.seq_len, args.seed + 1)
    ctx = Context(args, dense, tok, arch, ids, stats, stats_seconds, train_ids, ppl)
    for ratio in args.ratios:
        for structure in args.structures:
            if _complete(record, ratio, structure):
                continue
            blocks[_block(ratio, structure)] = vars(args)
            rows[:] = [r for r in rows if not _in_block(r, ratio, structure)]  # a partial block is measured again
            rows.extend(run_block(ctx, ratio, structure))
            _write(out, record)
    print((out / "recovery.md").read_text())


def _block(ratio: float, structure: str) -> str:
    return f"{ratio:g} {structure}"


def _in_block(row: dict[str, Any], ratio: float, structure: str) -> bool:
    return bool(row["ratio"] == ratio and row["structure"] == structure)


def _complete(record: dict[str, Any], ratio: float, structure: str) -> bool:
    done = {r["recovery"] for r in record.get("rows", []) if r["ratio"] == ratio and r["structure"] == structure}
    return done == set(ROWS)


@dataclass
class Context:
    args: argparse.Namespace
    dense: torch.nn.Module
    tok: Any
    arch: Any
    ids: torch.Tensor
    stats: list[Any]
    stats_seconds: float
    train_ids: torch.Tensor
    ppl: Callable[[torch.nn.Module], dict[str, float]]


def run_block(ctx: Context, ratio: float, structure: str) -> list[dict[str, Any]]:
    """The five rows of one (ratio, structure): none, bias, least squares, + BLD, + global KD."""
    args, dense, arch = ctx.args, ctx.dense, ctx.arch
    cfg = PruneConfig(method="flap", ratio=ratio, structure=structure)  # type: ignore[arg-type]
    attn, mlp = plan_masks(dense, arch, cfg, ctx.stats)
    prunable = prunable_parameters(dense, arch)
    cal_tokens = ctx.ids.numel()
    block: list[dict[str, Any]] = []

    def add(name: str, model: torch.nn.Module, seconds: float, tokens: int, extra: dict[str, Any]) -> None:
        row = {"ratio": ratio, "structure": structure, "recovery": name, "seconds": round(seconds, 1)}
        row["load"] = round(os.getloadavg()[0], 1)  # 1-minute load average when the row's chain finished
        row.update(tokens=tokens, prunable_removed=round(1 - prunable_parameters(model, arch) / prunable, 4))
        row.update(ppl=ctx.ppl(model), **extra)
        block.append(row)
        print(row, flush=True)

    for name, comp in (("none", False), ("bias", True)):
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        apply_masks(model, arch, cfg.model_copy(update={"bias_compensation": comp}), ctx.stats, attn, mlp)
        add(name, model, ctx.stats_seconds + time.perf_counter() - start, cal_tokens, {})
        del model
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    errors = reconstruct_model(model, arch, ctx.ids, attn, mlp, args.alpha, ctx.stats, 8)
    seconds = ctx.stats_seconds + time.perf_counter() - start
    add("least squares", model, seconds, cal_tokens, {"alpha": args.alpha, "refit_residual": errors})
    start = time.perf_counter()
    bld = TrainSettings(steps=args.bld_steps, lr=args.bld_lr, train=args.bld_train)
    bld_ids = ctx.train_ids[: args.bld_samples]
    losses = distill_blocks(dense, model, arch, bld_ids, bld, args.seed, "dense", args.batch)
    seconds += time.perf_counter() - start
    tokens = cal_tokens + bld_ids.numel()
    add("least squares + BLD", model, seconds, tokens, {"bld": bld.__dict__, "block_loss": losses})
    start = time.perf_counter()
    kd = TrainSettings(steps=args.kd_steps, lr=args.kd_lr)
    kd_losses = distill_global(dense, model, arch, ctx.train_ids[: args.kd_samples], kd, args.seed, args.batch)
    seconds += time.perf_counter() - start
    tokens += min(args.kd_samples, args.kd_steps * args.batch) * args.seq_len
    add("+ global KD", model, seconds, tokens, {"kd": kd.__dict__, "kd_loss": kd_losses})
    return block


def render_log(log: Path, args: argparse.Namespace) -> None:
    """Add the rows an interrupted run printed (``dense {...}`` and one ``{...}`` per row) to
    ``<out>/recovery.json`` (rows already there are kept; new blocks get this command line's settings, which must
    be the run's), then render. Blocks left partial are shown as measured and listed as incomplete."""
    import ast

    path = Path(args.out) / "recovery.json"
    record: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    record.setdefault("threads", torch.get_num_threads())
    blocks = record.setdefault("block_settings", {})
    settings = {k: v for k, v in vars(args).items() if k != "from_log"}
    have = {(r["ratio"], r["structure"], r["recovery"]) for r in record["rows"]}
    for line in log.read_text().replace("\r", "\n").splitlines():
        if line.startswith("dense {") and "dense" not in record:
            record["dense"] = ast.literal_eval(line[len("dense ") :])
        elif line.startswith("{'ratio'"):
            row = ast.literal_eval(line)
            if (row["ratio"], row["structure"], row["recovery"]) not in have:
                record["rows"].append(row)
                blocks.setdefault(_block(row["ratio"], row["structure"]), settings)
    _write(Path(args.out), record)
    print(render(record))


def _write(out: Path, record: dict[str, Any]) -> None:
    record.setdefault("load_averages", []).append(round(os.getloadavg()[0], 1))
    loads = record["load_averages"]
    record["machine_note"] = (
        f"{os.cpu_count()} CPUs, 1-minute load average {min(loads)}-{max(loads)} when blocks were written (column "
        "`load`: when the row finished; above the CPU count the machine was shared with other jobs and the row's "
        "time is inflated)"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "recovery.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    (out / "recovery.md").write_text(render(record))


def render(record: dict[str, Any]) -> str:
    s = record.get("settings", {})
    dense = record.get("dense", {})
    lines = [
        "# Recovery after FLAP pruning (SmolLM2-135M-Instruct)",
        "",
        "Generated by `scripts/recovery_results.py` (do not edit by hand). Held-out perplexity on the shipped",
        "Bible split `web:eval` and on the second-domain text `prose:eval` (Jane Austen, *Persuasion*; never in any",
        f"calibration or training data), {s.get('eval_windows')} windows × 256 tokens each. Recovery = dense PPL /",
        "compressed PPL. Calibration: "
        f"`{s.get('calibration')}`, {s.get('samples')} × {s.get('seq_len')} tokens (statistics and least squares);"
        f" BLD / KD training windows from `{s.get('train_data')}` (seed + 1, so not the calibration windows).",
        f"Least squares: ridge α from {s.get('alpha')} (per consumer, on held-out calibration batches)."
        f" BLD: AdamW on every weight of the layer (`{s.get('bld_train')}`), dense inputs; global KD: KL to the dense"
        " model's next-token distribution, decoder layers only; their budgets (steps, windows of 128 tokens per step,"
        " windows in all, learning rate) are in the `training` column, per block as that block was run.",
        "",
        f"Time: wall seconds of the whole recovery chain up to that row (shared dense statistics + pruning + refit"
        f" + training), fp32 on CPU, {record.get('threads')} threads. {record.get('machine_note', '')}.",
        "Tokens: calibration tokens + training tokens the row used.",
        "",
        f"Dense: web:eval PPL {dense.get('web:eval')}, prose:eval PPL {dense.get('prose:eval')}.",
        "",
        "| ratio | structure | recovery | removed | web PPL | web recovery | prose PPL | prose recovery | time s "
        "| load | tokens | training |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = record.get("rows", [])
    for r in rows:
        web, prose = r["ppl"]["web:eval"], r["ppl"]["prose:eval"]
        lines.append(
            f"| {r['ratio']:.0%} | {r['structure']} | {r['recovery']} | {r['prunable_removed']:.1%} | {web:.2f} | "
            f"{dense['web:eval'] / web:.3f} | {prose:.2f} | {dense['prose:eval'] / prose:.3f} | {r['seconds']:.0f} | "
            f"{r.get('load', '')} | {r['tokens']} | {_training(record, r)} |"
        )
    missing = [
        f"{ratio:.0%} {structure}" + (" (partial)" if any(_in_block(r, ratio, structure) for r in rows) else "")
        for ratio in GRID_RATIOS
        for structure in GRID_STRUCTURES
        if not _complete(record, ratio, structure)
        and ("grid" not in record or _block(ratio, structure) in record["grid"])
    ]
    if missing:
        lines += ["", f"**Not measured** (the run did not reach them before the deadline): {', '.join(missing)}."]
    lines += ["", *goals(record)]
    return "\n".join(lines) + "\n"


def _training(record: dict[str, Any], row: dict[str, Any]) -> str:
    """The training budget of a BLD / KD row, from the settings of the run that measured its block."""
    s = record.get("block_settings", {}).get(_block(row["ratio"], row["structure"]), record.get("settings", {}))
    if row["recovery"] == "least squares + BLD":
        return (
            f"BLD {s.get('bld_steps')} steps/layer × {s.get('batch')} windows, {s.get('bld_samples')} windows, "
            f"lr {s.get('bld_lr')}"
        )
    if row["recovery"] == "+ global KD":
        return f"KD {s.get('kd_steps')} steps × {s.get('batch')} windows, lr {s.get('kd_lr')}"
    return ""


def goals(record: dict[str, Any]) -> list[str]:
    """The issue's goals, checked on the rows present (benchmarks, not asserts)."""
    dense, rows = record.get("dense", {}), record.get("rows", [])
    if not rows:
        return []
    out = ["## Goals (checked on the rows above)", ""]
    for r in rows:
        web = dense["web:eval"] / r["ppl"]["web:eval"]
        if r["ratio"] == 0.2:
            ok = "met" if web >= 0.87 else "not met"
            out.append(f"- 20 % {r['structure']} {r['recovery']}: web recovery {web:.3f} ≥ 0.87: {ok}")
        if r["ratio"] == 0.5:
            times = r["ppl"]["web:eval"] / dense["web:eval"]
            out.append(
                f"- 50 % {r['structure']} {r['recovery']}: web PPL {times:.2f}× dense ≤ 2×: "
                f"{'met' if times <= 2 else 'not met'}"
            )
    for r in rows:
        none = next(
            (
                x
                for x in rows
                if x["ratio"] == r["ratio"] and x["structure"] == r["structure"] and x["recovery"] == "none"
            ),
            None,
        )
        if none is not None and r["recovery"] != "none" and r["ppl"]["prose:eval"] > none["ppl"]["prose:eval"]:
            out.append(
                f"- prose:eval worse than no recovery: {r['ratio']:.0%} {r['structure']} {r['recovery']} "
                f"({r['ppl']['prose:eval']:.2f} > {none['ppl']['prose:eval']:.2f})"
            )
    if all(
        r["ppl"]["prose:eval"] <= x["ppl"]["prose:eval"]
        for r in rows
        for x in rows
        if x["recovery"] == "none" and x["ratio"] == r["ratio"] and x["structure"] == r["structure"]
    ):
        out.append("- prose:eval: no recovery setting is worse than no recovery (met on these rows)")
    return out


if __name__ == "__main__":
    main()
