"""From raw cells to the summary table, the ratios against the references and the goals."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Cell", "Summary", "format_cpu_table", "format_table", "goals", "ratios", "summarize", "fmt_us",
]


@dataclass
class Cell:
    """One wrk run: one target at one concurrency in one round."""

    target: str
    concurrency: int
    round: int
    rps: float
    p50_us: float
    p99_us: float
    errors: int = 0
    rss_kib: int = 0  # right after the run
    cpu_us_per_req: float | None = None  # CPU time of the target per request served
    cpu_util: float | None = None  # CPU seconds of the target per second of the run (1.0 = a core)


@dataclass
class Summary:
    """Median over rounds of one target at one concurrency."""

    rps: float
    p50_us: float
    p99_us: float
    errors: int
    rss_kib: int  # the largest seen after a run
    rounds: int
    cpu_us_per_req: float | None = None
    cpu_util: float | None = None


def summarize(cells: list[Cell]) -> dict[str, dict[int, Summary]]:
    grouped: dict[str, dict[int, list[Cell]]] = {}
    for cell in cells:
        grouped.setdefault(cell.target, {}).setdefault(cell.concurrency, []).append(cell)
    return {
        target: {
            conc: Summary(
                rps=statistics.median(c.rps for c in runs),
                p50_us=statistics.median(c.p50_us for c in runs),
                p99_us=statistics.median(c.p99_us for c in runs),
                errors=sum(c.errors for c in runs),
                rss_kib=max(c.rss_kib for c in runs),
                rounds=len(runs),
                cpu_us_per_req=_median_or_none([c.cpu_us_per_req for c in runs]),
                cpu_util=_median_or_none([c.cpu_util for c in runs]),
            )
            for conc, runs in sorted(by_conc.items())
        }
        for target, by_conc in grouped.items()
    }


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def _get(summary: dict[str, dict[int, Summary]], target: str, conc: int) -> Summary | None:
    return summary.get(target, {}).get(conc)


def ratios(summary: dict[str, dict[int, Summary]], concurrencies: list[int],
           fender: str = "fender-full") -> dict[str, Any]:
    """Throughput and latency ratios; None where a side was not measured."""

    def rps(target: str, conc: int) -> float | None:
        s = _get(summary, target, conc)
        return s.rps if s else None

    def p50(target: str, conc: int) -> float | None:
        s = _get(summary, target, conc)
        return s.p50_us if s else None

    out: dict[str, Any] = {
        "full_over_empty_rps": {c: _ratio(rps("fender-full", c), rps("fender-empty", c))
                                for c in concurrencies},
        "empty_over_aiohttp_ref_rps": {c: _ratio(rps("fender-empty", c), rps("aiohttp-ref", c))
                                       for c in concurrencies},
        "fender_full_over_envoy_rps": {c: _ratio(rps(fender, c), rps("envoy", c))
                                       for c in concurrencies},
        "fender_full_over_envoy_p50": {c: _ratio(p50(fender, c), p50("envoy", c))
                                       for c in concurrencies},
    }
    def cpu(target: str, conc: int) -> float | None:
        s = _get(summary, target, conc)
        return s.cpu_us_per_req if s else None

    # CPU per request hardly moves when other work shares the machine; throughput does
    out["full_over_empty_cpu_per_req"] = {c: _ratio(cpu("fender-full", c), cpu("fender-empty", c))
                                          for c in concurrencies}
    out["empty_over_aiohttp_ref_cpu_per_req"] = {
        c: _ratio(cpu("fender-empty", c), cpu("aiohttp-ref", c)) for c in concurrencies}
    out["fender_full_over_envoy_cpu_per_req"] = {c: _ratio(cpu(fender, c), cpu("envoy", c))
                                                 for c in concurrencies}
    low = min(concurrencies) if concurrencies else 1
    direct = p50("upstream", low)
    added: dict[str, float | None] = {}
    for target in summary:
        if target == "upstream":
            continue
        own = p50(target, low)
        added[target] = None if direct is None or own is None else round(own - direct, 1)
    out[f"added_p50_us_at_c{low}"] = added
    # what is left once the floor (two more hops through a Python loop, no HTTP) is taken
    # away: HTTP parsing and Fender's own work, apart from what the machine charges every
    # Python proxy
    floor = added.get("relay-floor")
    out[f"added_p50_over_floor_us_at_c{low}"] = {
        target: None if floor is None or added.get(target) is None else round(added[target] - floor, 1)
        for target in ("fender-empty", "fender-full") if target in added
    }
    return out


def goals(summary: dict[str, dict[int, Summary]], ratio: dict[str, Any],
          idle_rss_kib: dict[str, int], concurrencies: list[int]) -> list[dict[str, Any]]:
    """The targets of issue 9, each with the measured value and whether it was met."""
    high = [c for c in concurrencies if c > 1] or concurrencies
    low = min(concurrencies) if concurrencies else 1
    rows: list[dict[str, Any]] = []

    def add(goal: str, value: float | None, ok: bool | None) -> None:
        rows.append({"goal": goal, "value": value, "met": ok})

    def at_least(label: str, key: str, threshold: float) -> None:
        """A throughput-ratio goal, read from req/s and again from CPU per request."""
        for c in high:
            v = ratio[f"{key}_rps"].get(c)
            add(f"{label} req/s (c={c})", v, None if v is None else v >= threshold)
        for c in high:
            # the same goal read from CPU per request: throughput on a saturated core
            cpu = ratio.get(f"{key}_cpu_per_req", {}).get(c)
            v = None if not cpu else round(1 / cpu, 3)
            add(f"{label}, by CPU per request (c={c})", v, None if v is None else v >= threshold)

    at_least("full chain >= 0.95 x empty chain", "full_over_empty", 0.95)
    at_least("empty chain >= 1.0 x bare aiohttp", "empty_over_aiohttp_ref", 1.0)
    added = ratio.get(f"added_p50_us_at_c{low}", {})
    for target in ("fender-empty", "fender-full"):
        v = added.get(target)
        add(f"{target}: p50 added over upstream at c={low} <= 150 us", v,
            None if v is None else v <= 150)
    for target in ("fender-empty", "fender-full"):
        kib = idle_rss_kib.get(target)
        mib = None if kib is None else round(kib / 1024, 1)
        add(f"{target}: idle RSS <= 60 MB", mib, None if mib is None else mib <= 60)
    for c in concurrencies:
        v = ratio["fender_full_over_envoy_rps"].get(c)
        add(f"moonshot: full chain req/s >= Envoy's (c={c})", v, None if v is None else v >= 1.0)
        lat = ratio["fender_full_over_envoy_p50"].get(c)
        add(f"moonshot: full chain p50 <= Envoy's (c={c})", lat, None if lat is None else lat <= 1.0)
    for c in high:
        cpu = ratio.get("fender_full_over_envoy_cpu_per_req", {}).get(c)
        v = None if not cpu else round(1 / cpu, 3)
        add(f"moonshot: full chain >= Envoy, by CPU per request (c={c})", v,
            None if v is None else v >= 1.0)
    return rows


def fmt_us(us: float | None) -> str:
    if us is None:
        return "n/a"
    if us < 1000:
        return f"{us:.0f}us"
    if us < 1_000_000:
        return f"{us / 1000:.2f}ms"
    return f"{us / 1_000_000:.2f}s"


def _fmt_rps(rps: float | None) -> str:
    if rps is None:
        return "n/a"
    return f"{rps / 1000:.1f}k" if rps >= 1000 else f"{rps:.0f}"


def format_table(summary: dict[str, dict[int, Summary]], order: list[str], concurrencies: list[int],
                 idle_rss_kib: dict[str, int], notes: dict[str, str] | None = None) -> str:
    """One row per target, req/s | p50 | p99 per concurrency, then idle and loaded RSS."""
    head = ["target"]
    for c in concurrencies:
        head += [f"c={c} req/s", "p50", "p99"]
    head += ["RSS idle", "RSS load", "errors"]
    rows = [head]
    for target in order:
        by_conc = summary.get(target, {})
        row = [target]
        for c in concurrencies:
            s = by_conc.get(c)
            row += [_fmt_rps(s.rps), fmt_us(s.p50_us), fmt_us(s.p99_us)] if s else ["n/a"] * 3
        idle = idle_rss_kib.get(target)
        loaded = max((s.rss_kib for s in by_conc.values()), default=0)
        row.append("n/a" if idle is None else f"{idle / 1024:.1f}M")
        row.append(f"{loaded / 1024:.1f}M" if loaded else "n/a")
        row.append(str(sum(s.errors for s in by_conc.values())) if by_conc else "n/a")
        if notes and target in notes and not by_conc:
            row[-1] = notes[target]
        rows.append(row)
    return _render(rows, ragged_last=True)  # (the last column may hold a long note)


def format_cpu_table(summary: dict[str, dict[int, Summary]], order: list[str],
                     concurrencies: list[int]) -> str:
    """CPU microseconds per request and cores used, per concurrency."""
    head = ["target"] + [f"c={c} CPU/req (cores)" for c in concurrencies]
    rows = [head]
    for target in order:
        by_conc = summary.get(target, {})
        row = [target]
        for c in concurrencies:
            s = by_conc.get(c)
            if s is None or s.cpu_us_per_req is None:
                row.append("n/a")
            else:
                row.append(f"{s.cpu_us_per_req:.0f}us ({s.cpu_util or 0:.2f})")
        rows.append(row)
    return _render(rows)


def _render(rows: list[list[str]], *, ragged_last: bool = False) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned (the last
    one left as it is when `ragged_last`), a rule under the head row."""
    columns = len(rows[0])
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(columns)]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            cell if ragged_last and i == columns - 1 else cell.rjust(widths[i])
            for i, cell in enumerate(row) if i
        ]
        line = "  ".join(cells)
        lines.append(line.rstrip() if ragged_last else line)
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
