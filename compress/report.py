"""report.md: a human-readable run report (dense vs compressed with recovery, sizes, protocol, timings)."""

from __future__ import annotations

import json
from typing import Any


def report_markdown(report: dict[str, Any]) -> str:
    sizes = report.get("sizes", {})
    lines = [
        f"# Secateurs report — {report.get('base_model', '?')}",
        "",
        f"Steps: {', '.join(report.get('steps_summary', [])) or 'none'}",
        "",
        "| size | dense | compressed |",
        "|---|---|---|",
        f"| parameters | {sizes.get('params_before', '?'):,} | {sizes.get('params_after', '?'):,} |",
        f"| prunable decoder parameters | {sizes.get('prunable_before', '?'):,} "
        f"| {sizes.get('prunable_after', '?'):,} |",
        "",
    ]
    evaluation = report.get("evaluation") or {}
    rows = evaluation.get("rows", [])
    if rows:
        lines += evaluation_table(rows)
        lines += ["", f"Protocol: `{json.dumps(evaluation.get('protocol', {}), sort_keys=True)}`", ""]
    cache = report.get("dense_baseline_cache")
    if cache and cache.get("hit"):
        lines += [
            f"Dense baseline: reused from the cache (computed in {cache['computed_seconds']} s on "
            f"{cache['computed_at']}; this run: {cache['seconds']} s).",
            "",
        ]
    elif cache and not cache.get("disabled"):
        lines += [f"Dense baseline: computed in {cache['seconds']} s and cached for later runs.", ""]
    lines.append(f"Reload check: max |Δlogit| = {report.get('reload_max_abs_logit_diff', 'n/a')}")
    timings = report.get("timings_seconds", {})
    if timings:
        lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items())]
    return "\n".join(lines) + "\n"


def _with_stderr(row: dict[str, Any], side: str) -> str:
    value = row.get(side, "")
    se = row.get(f"{side}_stderr")
    return f"{value} ± {se}" if se is not None else str(value)


def evaluation_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: value ± lm-eval stderr; a difference within one stderr is marked as not significant."""
    out = ["| metric | dense | compressed | recovery | difference |", "|---|---|---|---|---|"]
    for row in rows:
        within = row.get("within_stderr")
        verdict = "within 1 stderr" if within else ("beyond 1 stderr" if within is False else "")
        out.append(
            f"| {row['metric']} | {_with_stderr(row, 'dense')} | {_with_stderr(row, 'compressed')} "
            f"| {row.get('recovery', '')} | {verdict} |"
        )
    return out
