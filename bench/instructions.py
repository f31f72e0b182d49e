"""`python -m bench.instructions`: machine instructions per proxied request, counted by
valgrind's callgrind, for Fender's empty and full chains.

On a shared machine req/s and CPU per request move by 10 to 30 % from one run to the
next, more than the policies cost. Instruction counts do not move: the same code on the
same inputs executes the same instructions, whatever else the host is doing. So the
full/empty ratio here is the steady figure to compare commits by. It does not count
what instructions cost (cache misses, system calls in the kernel): `bench.run` measures
that, in time.

One Fender runs under callgrind (about fifty times slower), with the bench's config and
nginx upstream. For each route: wrk warms it up, the counters are zeroed, wrk loads it
for `--duration` seconds at `--connections`, and the counters are dumped; instructions
divided by requests answered is the figure. Routes take turns over `--rounds`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import Managed, free_port, wait_http
from bench.targets import Workspace, fender_config, start_upstream
from bench.tools import ensure_tools
from bench.wrk import run_wrk

__all__ = ["dump_total", "main"]

ROUTES = ("empty", "full")
_TOTAL = re.compile(r"^(?:summary|totals):\s*(\d+)", re.MULTILINE)


def dump_total(text: str) -> int:
    """The instruction total of one callgrind dump ("summary:" or "totals:" line)."""
    match = _TOTAL.search(text)
    if match is None:
        raise ValueError("not a callgrind dump: no summary or totals line")
    return int(match.group(1))


def _ensure_valgrind() -> str | None:
    if shutil.which("valgrind") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        print("bench: apt-get install valgrind", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "valgrind"],
                       check=False, env=env, stdout=subprocess.DEVNULL)
    return shutil.which("callgrind_control") and shutil.which("valgrind")


def _start_fender(ws: Workspace, port: int, dumps: Path) -> Managed:
    env = {
        "FENDER_PROXY_ADDR": f"127.0.0.1:{port}",
        "FENDER_ADMIN_ADDR": f"127.0.0.1:{free_port()}",
        "FENDER_METRICS_ADDR": f"127.0.0.1:{free_port()}",
        "FENDER_ACCESS_LOG": "false",
        "FENDER_DATA_DIR": str(ws.workdir / "fender-data"),
        "FENDER_LOG_LEVEL": "warning",
    }
    (ws.workdir / "fender-data").mkdir(exist_ok=True)
    args = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={dumps}/callgrind.%p.out",
            sys.executable, "-m", "proxy.cli", "run", "--config", str(fender_config(ws))]
    return Managed.start("fender-callgrind", args, ws.workdir / "fender.log", env=env,
                         cwd=Path(__file__).resolve().parent.parent)


def _count(pid: int, dumps: Path, url: str, route: str, args: argparse.Namespace) -> float:
    """Instructions per request of one loaded stretch on `route`."""
    headers = {"Host": route}
    run_wrk(url, connections=args.connections, duration=2, headers=headers, timeout_s=30)  # warm-up
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
    result = run_wrk(url, connections=args.connections, duration=args.duration, headers=headers, timeout_s=30)
    before = set(dumps.iterdir())
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new = sorted(set(dumps.iterdir()) - before)
        if new:
            time.sleep(0.2)  # (written in one go, but give it a moment to be closed)
            if result.requests <= 0 or result.errors:
                raise RuntimeError(f"wrk on route {route}: {result.requests} requests, {result.errors} errors")
            return dump_total(new[-1].read_text(errors="replace")) / result.requests
        time.sleep(0.1)
    raise RuntimeError("callgrind wrote no dump")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="turns per route; the minimum is reported (2)")
    parser.add_argument("--duration", type=int, default=5, help="seconds of load per measurement (5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    missing = ensure_tools(("nginx", "wrk"))  # (the upstream and the load; no other proxy is run)
    if missing or not _ensure_valgrind():
        print("bench.instructions needs nginx, wrk and valgrind", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fender-instr-") as tmp:
        workdir = Path(tmp)
        dumps = workdir / "dumps"
        dumps.mkdir()
        upstream, upstream_port = start_upstream(workdir)
        ws = Workspace(workdir, upstream_port)
        port = free_port()
        fender = _start_fender(ws, port, dumps)
        try:
            if not wait_http(port, "empty", timeout_s=180, proc=fender.proc):
                print(f"Fender did not start under valgrind:\n{fender.log_tail()}", file=sys.stderr)
                return 1
            url = f"http://127.0.0.1:{port}/"
            figures: dict[str, list[float]] = {route: [] for route in ROUTES}
            for _ in range(args.rounds):
                for route in ROUTES:
                    figures[route].append(_count(fender.pid, dumps, url, route, args))
        finally:
            fender.stop()
            upstream.stop()
    best = {route: min(values) for route, values in figures.items()}
    print("instructions per request (callgrind, Fender alone, minimum of rounds):")
    for route in ROUTES:
        rounds = ", ".join(f"{value / 1000:.1f}k" for value in figures[route])
        print(f"  {route:6} {best[route] / 1000:8.1f}k   rounds: {rounds}")
    ratio = best["empty"] / best["full"]
    print(f"  the full chain costs {best['full'] - best['empty']:,.0f} more: "
          f"full/empty throughput at equal cost per instruction {ratio:.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"per_request": figures, "min": best, "full_over_empty": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
