"""`--profile TARGET`: sample a Python target with py-spy while wrk loads it, and print where
the time goes (self and inclusive share per function)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.targets import tool
from bench.wrk import run_wrk

__all__ = ["parse_collapsed", "profile_target"]

_LINE = re.compile(r":\d+\)$")


def _frame(raw: str) -> str:
    # "handle (proxy/handler.py:42)" -> "handle (proxy/handler.py)": aggregate over lines
    return _LINE.sub(")", raw.strip())


def parse_collapsed(text: str, top: int = 15) -> dict[str, Any]:
    """Read py-spy's raw (collapsed) stacks: `f1;f2;f3 COUNT` per line, root first."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        # --subprocesses puts a `process PID:"cmd"` frame at the root: not a function
        frames = [_frame(f) for f in stack.split(";") if f.strip() and not f.startswith("process ")]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    share = (lambda c: round(100 * c / total, 1)) if total else (lambda c: 0.0)
    return {
        "samples": total,
        "self_pct": [(f, share(c)) for f, c in own.most_common(top)],
        "inclusive_pct": [(f, share(c)) for f, c in inclusive.most_common(top)],
    }


def profile_target(name: str, pid: int, url: str, host: str, *, duration: int, connections: int,
                   out_dir: Path) -> dict[str, Any]:
    spy = tool("py-spy")
    if spy is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=False)
        spy = tool("py-spy")
    if spy is None:
        return {"error": "py-spy is not installed"}
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    raw = out_dir / f"profile-{name}-{stamp}.txt"  # collapsed stacks: speedscope, flamegraph.pl
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--duration", str(duration), "--rate", "250",
         "--nonblocking", "--subprocesses", "--format", "raw", "--output", str(raw)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    time.sleep(0.3)
    load = run_wrk(url, connections=connections, duration=duration, headers={"Host": host})
    _, err = proc.communicate(timeout=duration + 30)
    if not raw.exists():
        return {"error": "py-spy wrote nothing: " + err.decode(errors="replace").strip()[-300:]}
    result = parse_collapsed(raw.read_text())
    result.update(stacks=str(raw), rps_while_sampled=load.rps, connections=connections)
    return result
