"""`python -m bench.markdown RESULT.json`: a run's table, ratios and goals as Markdown, for
the README or an issue note."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.report import fmt_us

__all__ = ["to_markdown"]


def _rps(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


def to_markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    concs = [str(c) for c in meta["concurrency"]]
    head = ["target"]
    for c in concs:
        head += [f"c={c} req/s", "p50", "p99"]
    head += [f"CPU/req c={concs[len(concs) // 2]}", "RSS idle"]
    mid = concs[len(concs) // 2]
    lines = [
        f"`{meta['command']}` at {meta['git']}, {meta['date']}, {meta['cpus']} CPUs, "
        f"load average {meta.get('loadavg_before', 'n/a')} before; medians of {meta['rounds']} "
        f"rounds x {meta['duration_s']}s.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    summary = result["summary"]
    for target in result["targets"]:
        by_conc = summary.get(target, {})
        row = [target]
        for c in concs:
            s = by_conc.get(c)
            row += [_rps(s["rps"]), fmt_us(s["p50_us"]), fmt_us(s["p99_us"])] if s else ["n/a"] * 3
        cpu = (by_conc.get(mid) or {}).get("cpu_us_per_req")
        row.append("n/a" if cpu is None else f"{cpu:.0f}us")
        idle = result["idle_rss_kib"].get(target)
        row.append("n/a" if idle is None else f"{idle / 1024:.1f} MB")
        if target in result.get("notes", {}) and not by_conc:
            row[-1] += f" ({result['notes'][target]})"
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| goal | value | |", "|---|---|---|"]
    for goal in result["goals"]:
        mark = {True: "met", False: "missed", None: "n/a"}[goal["met"]]
        value = "n/a" if goal["value"] is None else goal["value"]
        lines.append(f"| {goal['goal']} | {value} | {mark} |")
    conc = meta["concurrency"][0] if meta["concurrency"] else 1
    added = result.get("ratios", {}).get(f"added_p50_us_at_c{conc}", {})
    if added:
        over = result["ratios"].get(f"added_p50_over_floor_us_at_c{conc}", {})
        shown = ", ".join(f"{target} {fmt_us(value)}" for target, value in added.items() if value is not None)
        lines += ["", f"p50 added over the upstream at c={conc}: {shown}."]
        if any(value is not None for value in over.values()):
            mine = ", ".join(f"{target} {fmt_us(value)}" for target, value in over.items() if value is not None)
            lines.append(f"Beyond the relay floor (HTTP parsing and Fender's own work): {mine}.")
    saga = result.get("saga", {})
    lines.append("")
    if saga.get("available"):
        for conc, row in saga["by_concurrency"].items():
            lines.append(
                f"- sagas, c={conc}: {row['sagas_per_s']} three-step sagas/s (p50 "
                f"{fmt_us(row['saga_p50_us'])}); the same call direct: {row['direct_calls_per_s']}/s "
                f"(p50 {fmt_us(row['direct_p50_us'])}); per step +{row['overhead_per_step_us']:.0f}us "
                f"latency, +{row['cost_per_step_us'] or 0:.0f}us cost")
    else:
        lines.append(f"- sagas: n/a ({saga.get('reason')})")
    return "\n".join(lines)


if __name__ == "__main__":
    paths = sys.argv[1:] or [str(max(Path(__file__).resolve().parent.glob("results/bench-*.json")))]
    print(to_markdown(json.loads(Path(paths[0]).read_text())))
