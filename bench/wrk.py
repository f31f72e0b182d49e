"""Running `wrk --latency` and reading its report."""

from __future__ import annotations

import re
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["WrkResult", "parse_duration_us", "parse_wrk_output", "run_wrk"]

_UNITS_US = {"us": 1.0, "ms": 1_000.0, "s": 1_000_000.0, "m": 60_000_000.0, "h": 3_600_000_000.0}
_DURATION = re.compile(r"^([0-9.]+)(us|ms|s|m|h)$")
_RPS = re.compile(r"^Requests/sec:\s+([0-9.]+)", re.M)
_PERCENTILE = re.compile(r"^\s+(50|75|90|99)(?:\.0+)?%\s+(\S+)", re.M)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([0-9.]+\w+)", re.M)
_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def parse_duration_us(text: str) -> float:
    """`56.00us`, `1.42ms`, `2.01s` -> microseconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS_US[match.group(2)]


@dataclass
class WrkResult:
    rps: float
    p50_us: float
    p99_us: float
    requests: int
    errors: int = 0  # socket errors plus non-2xx/3xx responses
    percentiles_us: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_wrk_output(text: str) -> WrkResult:
    """Read the numbers of a `wrk --latency` run; raises ValueError if it is not one."""
    rps = _RPS.search(text)
    percentiles = {p: parse_duration_us(v) for p, v in _PERCENTILE.findall(text)}
    if rps is None or "50" not in percentiles or "99" not in percentiles:
        raise ValueError("wrk output has no Requests/sec or latency distribution:\n" + text)
    total = _TOTAL.search(text)
    errors = 0
    if (non2xx := _NON2XX.search(text)) is not None:
        errors += int(non2xx.group(1))
    if (sock := _SOCKET.search(text)) is not None:
        errors += sum(int(g) for g in sock.groups())
    return WrkResult(
        rps=float(rps.group(1)),
        p50_us=percentiles["50"],
        p99_us=percentiles["99"],
        requests=int(total.group(1)) if total else 0,
        errors=errors,
        percentiles_us=percentiles,
    )


def run_wrk(
    url: str,
    *,
    connections: int,
    duration: int,
    headers: dict[str, str] | None = None,
    script: str | None = None,
    wrk: str = "wrk",
    timeout_s: int = 5,
) -> WrkResult:
    """One wrk run with one client thread, so that the client costs the same for every target."""
    args = [wrk, "-t1", f"-c{connections}", f"-d{duration}s", f"--timeout={int(timeout_s)}s", "--latency"]
    for name, value in (headers or {}).items():
        args += ["-H", f"{name}: {value}"]
    if script:
        args += ["-s", script]
    args.append(url)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=duration + timeout_s + 30)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return parse_wrk_output(proc.stdout)
