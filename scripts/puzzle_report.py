"""Markdown of docs/results/puzzle.md from puzzle.json: the tables, comparisons and goals that
``scripts/puzzle_results.py`` writes after every row (and alone with ``--render``)."""

from __future__ import annotations

import statistics
from typing import Any

BASELINES = ("dense", "FLAP (WIFV, AL-AM, dense stats)", "FLAP (WIFV, UL-MM)")
RECOVERY_METHODS = ("Puzzle-MIP", "UL-MM", "AL-AM", "NSGA-II trial 53", "Puzzle-MIP (LS library)")
PUZZLE_METHODS = ("Puzzle-MIP", "Puzzle-MIP (LS library)")


def structure(record: dict[str, Any]) -> str:
    """Per layer "KV groups/MLP width", "L" for a linear replacement, "–" for a no-op sub-block."""
    linear = record.get("linear") or [[] for _ in record["kv_groups"]]
    return " ".join(
        f"{'L' if 'attn' in lin else a or '–'}/{'L' if 'mlp' in lin else m or '–'}"
        for a, m, lin in zip(record["kv_groups"], record["intermediate_sizes"], linear, strict=True)
    )


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
