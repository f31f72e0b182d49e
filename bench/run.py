"""`python -m bench.run`: start every target, drive each with wrk at several concurrencies,
interleaved round by round, and print/save the table, the ratios and the goals of issue 9."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.procs import cpu_seconds, free_port, rss_kib, wait_http
from bench.profile import profile_target
from bench.report import Cell, format_cpu_table, format_table, goals, ratios, summarize
from bench.saga import run_saga_bench
from bench.targets import (
    Target,
    Workspace,
    all_targets,
    fender_supports_workers,
    start_upstream,
    tool,
)
from bench.tools import ensure_tools
from bench.wrk import run_wrk

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--duration", type=int, default=2, help="whole seconds per wrk run (2)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; medians are reported (2)")
    parser.add_argument("--concurrency", default="1,32,256", help="wrk connections, comma separated")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of load per target before round 1 (1)")
    parser.add_argument("--only", default="", help="comma separated targets to measure (upstream always)")
    parser.add_argument("--skip", default="", help="comma separated targets not to measure")
    parser.add_argument("--fender-workers", type=int, default=-1,
                        help="also measure `fender run --workers N` (default: 2 when the flag exists)")
    parser.add_argument("--no-saga", action="store_true", help="skip the saga coordinator part")
    parser.add_argument("--profile", default="", help="also sample these Python targets with py-spy "
                        "under load at the largest concurrency below 256 (comma separated)")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get/pip install missing tools")
    parser.add_argument("--nice", type=int, default=0,
                        help="run the harness, wrk and every target at this nice value, e.g. -10 "
                        "on a machine shared with other work (root only for negative values)")
    parser.add_argument("--out", type=Path, default=None, help="JSON result file (bench/results/<time>.json)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and logs of the run")
    return parser.parse_args(argv)


def _version(args: list[str]) -> str:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return text[0].strip() if text else "n/a"


def versions() -> dict[str, str]:
    import aiohttp

    out = {"python": platform.python_version(), "aiohttp": aiohttp.__version__}
    for name, args in {
        "nginx": ["-v"], "haproxy": ["-v"], "envoy": ["--version"], "traefik": ["version"],
        "wrk": ["-v"], "fender": ["version"],
    }.items():
        binary = tool(name)
        out[name] = _version([binary, *args]) if binary else "missing"
    return out


def select(targets: list[Target], only: str, skip: str) -> list[Target]:
    wanted = {n.strip() for n in only.split(",") if n.strip()}
    unwanted = {n.strip() for n in skip.split(",") if n.strip()}
    return [t for t in targets
            if t.name == "upstream" or ((not wanted or t.name in wanted) and t.name not in unwanted)]


def start_targets(targets: list[Target], ws: Workspace, notes: dict[str, str]) -> list[Target]:
    started: list[Target] = []
    for target in targets:
        if target.name == "upstream":
            started.append(target)
            continue
        missing = target.missing()
        if missing:
            notes[target.name] = f"missing {', '.join(missing)}"
            continue
        target.port = free_port()
        try:
            target.managed = target.start(ws, target.port)
        except OSError as exc:
            notes[target.name] = f"failed to start: {exc}"
            continue
        # a target sharing another's process listens where that one does
        target.port = target.managed.extra.get("proxy_port", target.port)
        started.append(target)
    ready: list[Target] = []
    for target in started:
        managed = target.managed
        if managed is None:  # the upstream
            ready.append(target)
            continue
        if wait_http(target.port, target.host, proc=managed.proc, timeout_s=30):
            ready.append(target)
        else:
            notes[target.name] = "did not answer 200"
            print(f"bench: {target.name} did not answer 200 on :{target.port}; log tail:\n"
                  f"{managed.log_tail()}", file=sys.stderr)
            managed.stop()
    return ready


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    # (SystemExit unwinds through main's `finally`, which stops every server it started;
    # without this a `kill` or a CI timeout left nginx, Envoy and the rest running)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not args.no_install:
        missing = ensure_tools()
        if "wrk" in missing or "nginx" in missing:
            print("bench: wrk and nginx are required", file=sys.stderr)
            return 2
    wrk = tool("wrk") or "wrk"
    workers = args.fender_workers
    if workers < 0:
        workers = 2 if (os.cpu_count() or 1) >= 2 and fender_supports_workers() else 0
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # every server and wrk inherit it
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"bench: warning: load average is {load_before:.2f} before the run; other work on "
              "this machine moves the numbers (ratios of the same run are still comparable)",
              file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="fender-bench-"))
    notes: dict[str, str] = {}
    targets = select(all_targets(workers), args.only, args.skip)
    order = [t.name for t in targets]
    upstream, upstream_port = start_upstream(workdir)
    started_at = time.monotonic()
    try:
        if not wait_http(upstream_port, "upstream", proc=upstream.proc):
            print(f"bench: upstream nginx did not start:\n{upstream.log_tail()}", file=sys.stderr)
            return 2
        for target in targets:
            if target.name == "upstream":
                target.port, target.managed = upstream_port, upstream
        ws = Workspace(workdir, upstream_port)
        ready = start_targets(targets, ws, notes)
        time.sleep(0.5)  # let start-up garbage settle before reading idle memory
        idle_rss = {t.name: rss_kib(t.managed.pid) for t in ready if t.managed}
        print(f"bench: measuring {', '.join(t.name for t in ready)} at c={concurrencies}, "
              f"{args.rounds} round(s) x {args.duration:g}s", file=sys.stderr, flush=True)
        cells = measure(ready, concurrencies, args, wrk, notes)
        saga: dict[str, Any] = {"available": False, "reason": "skipped (--no-saga)"}
        fender_full = next((t for t in ready if t.name == "fender-full"), None)
        if not args.no_saga:
            if fender_full is None or fender_full.managed is None:
                saga = {"available": False, "reason": "fender-full not running"}
            else:
                try:
                    saga = run_saga_bench(workdir, admin_port=fender_full.managed.extra["admin_port"],
                                          proxy_port=fender_full.port, duration=args.duration)
                except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as exc:
                    saga = {"available": False, "reason": f"saga run failed: {str(exc)[:300]}"}
        profiles = run_profiles(ready, args, concurrencies)
        peak_rss = {t.name: rss_kib(t.managed.pid, peak=True) for t in ready if t.managed}
    finally:
        for target in targets:
            if target.managed is not None:
                target.managed.stop()
        upstream.stop()  # (again, if it was a target: stop() of a stopped server does nothing)
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started_at
    summary = summarize(cells)
    ratio = ratios(summary, concurrencies)
    goal_rows = goals(summary, ratio, idle_rss, concurrencies)
    print_report(summary, order, concurrencies, idle_rss, notes, ratio, goal_rows, saga,
                 [t.description for t in targets], order)
    result = {
        "meta": {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, "-m", "bench.run", *(argv or sys.argv[1:])]),
            "duration_s": args.duration, "rounds": args.rounds, "concurrency": concurrencies,
            "cpus": os.cpu_count(), "elapsed_s": round(elapsed, 1), "fender_workers": workers,
            "nice": args.nice, "loadavg_before": round(load_before, 2), "loadavg_after": round(os.getloadavg()[0], 2),
            "versions": versions(), "git": _version(["git", "rev-parse", "--short", "HEAD"]),
            "workdir": str(workdir) if args.keep_workdir else None,
        },
        "targets": {t.name: t.description for t in targets},
        "notes": notes,
        "idle_rss_kib": idle_rss,
        "peak_rss_kib": peak_rss,
        "summary": {t: {c: asdict(s) for c, s in by.items()} for t, by in summary.items()},
        "ratios": ratio,
        "goals": goal_rows,
        "saga": saga,
        "profiles": profiles,
        "cells": [asdict(c) for c in cells],
    }
    print_profiles(profiles)
    out = args.out or RESULTS / f"bench-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out} ({elapsed:.0f}s)")
    return 0


def measure(ready: list[Target], concurrencies: list[int], args: argparse.Namespace, wrk: str,
            notes: dict[str, str]) -> list[Cell]:
    cells: list[Cell] = []
    dead: set[str] = set()
    if args.warmup > 0:
        for target in ready:
            try:
                run_wrk(target.url, connections=32, duration=args.warmup,
                        headers={"Host": target.host}, wrk=wrk)
            except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
                notes[target.name] = f"warm-up failed: {exc}"
                dead.add(target.name)
    for rnd in range(1, args.rounds + 1):
        for conc in concurrencies:
            for target in ready:  # round-robin: each target in turn, then the next concurrency
                if target.name in dead or target.managed is None:
                    continue
                cpu_before, t_before = cpu_seconds(target.managed.pid), time.monotonic()
                try:
                    res = run_wrk(target.url, connections=conc, duration=args.duration,
                                  headers={"Host": target.host}, wrk=wrk)
                except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
                    notes[target.name] = f"run failed at c={conc}: {str(exc).splitlines()[0]}"
                    dead.add(target.name)
                    if not target.managed.alive():
                        print(f"bench: {target.name} died:\n{target.managed.log_tail()}", file=sys.stderr)
                    continue
                cpu = cpu_seconds(target.managed.pid) - cpu_before
                wall = time.monotonic() - t_before
                cells.append(Cell(target.name, conc, rnd, res.rps, res.p50_us, res.p99_us,
                                  res.errors, rss_kib(target.managed.pid),
                                  cpu_us_per_req=round(cpu * 1e6 / res.requests, 1) if res.requests else None,
                                  cpu_util=round(cpu / wall, 3) if wall > 0 else None))
        print(f"bench: round {rnd}/{args.rounds} done", file=sys.stderr, flush=True)
    return cells


def run_profiles(ready: list[Target], args: argparse.Namespace,
                 concurrencies: list[int]) -> dict[str, Any]:
    wanted = [n.strip() for n in args.profile.split(",") if n.strip()]
    conc = max([c for c in concurrencies if c < 256] or [32])
    out: dict[str, Any] = {}
    for target in ready:
        if target.name in wanted and target.managed is not None:
            try:
                out[target.name] = profile_target(
                    target.name, target.managed.pid, target.url, target.host,
                    duration=max(args.duration, 3), connections=conc, out_dir=RESULTS)
            except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as exc:
                out[target.name] = {"error": str(exc)[:300]}
    for name in wanted:
        out.setdefault(name, {"error": "not running"})
    return out


def print_profiles(profiles: dict[str, Any]) -> None:
    for name, prof in profiles.items():
        print(f"\nprofile of {name}:")
        if "error" in prof:
            print(f"  n/a: {prof['error']}")
            continue
        print(f"  {prof['samples']} samples at {prof['rps_while_sampled']:.0f} req/s "
              f"(c={prof['connections']}); stacks in {prof['stacks']}")
        print("  self %      inclusive %")
        for (own, own_pct), (inc, inc_pct) in zip(prof["self_pct"], prof["inclusive_pct"], strict=False):
            print(f"  {own_pct:5.1f} {own[:60]:<60}  {inc_pct:5.1f} {inc[:60]}")


def print_report(summary: Any, order: list[str], concurrencies: list[int], idle_rss: dict[str, int],
                 notes: dict[str, str], ratio: dict[str, Any], goal_rows: list[dict[str, Any]],
                 saga: dict[str, Any], descriptions: list[str], names: list[str]) -> None:
    print()
    print(format_table(summary, order, concurrencies, idle_rss, notes))
    print("\nCPU time of the target per request (and cores it used), steadier than req/s on a busy machine:")
    print(format_cpu_table(summary, order, concurrencies))
    print()
    for name, description in zip(names, descriptions, strict=True):
        note = f"  [{notes[name]}]" if name in notes else ""
        print(f"  {name:<16} {description}{note}")
    print("\nratios (medians of rounds):")
    for key, values in ratio.items():
        shown = ", ".join(f"{k}: {'n/a' if v is None else v}" for k, v in values.items())
        print(f"  {key:<36} {shown}")
    print("\ngoals of issue 9:")
    for row in goal_rows:
        mark = {True: "met ", False: "MISS", None: "n/a "}[row["met"]]
        value = "n/a" if row["value"] is None else row["value"]
        print(f"  [{mark}] {row['goal']}: {value}")
    print("\nsaga coordinator (three-step sagas, SQLite journal):")
    if not saga.get("available"):
        print(f"  n/a: {saga.get('reason')}")
    else:
        for conc, row in saga["by_concurrency"].items():
            print(f"  c={conc}: {row['sagas_per_s']} sagas/s, p50 {row['saga_p50_us'] / 1000:.2f}ms; "
                  f"direct calls {row['direct_calls_per_s']}/s p50 {row['direct_p50_us']:.0f}us; "
                  f"per step: +{row['overhead_per_step_us']:.0f}us latency, "
                  f"+{row['cost_per_step_us'] or 0:.0f}us cost")
        counts = saga.get("not_completed", {})
        bad = {k: v for k, v in counts.items() if v}
        if bad:
            print(f"  sagas not completed: {bad}")
        elif counts and all(v is None for v in counts.values()):
            print("  could not list sagas by status")
        else:
            print("  every saga completed")


if __name__ == "__main__":
    sys.exit(main())
