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
        lines += ["| metric | dense | compressed | recovery |", "|---|---|---|---|"]
        for row in rows:
            lines.append(
                f"| {row['metric']} | {row.get('dense', '')} | {row['compressed']} | {row.get('recovery', '')} |"
            )
        lines += ["", f"Protocol: `{json.dumps(evaluation.get('protocol', {}), sort_keys=True)}`", ""]
    lines.append(f"Reload check: max |Δlogit| = {report.get('reload_max_abs_logit_diff', 'n/a')}")
    timings = report.get("timings_seconds", {})
    if timings:
        lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items())]
    return "\n".join(lines) + "\n"
