"""Processes under test: free ports, start/stop, readiness, resident memory."""

from __future__ import annotations

import http.client
import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Managed", "cpu_seconds", "free_port", "rss_kib", "tree_pids", "wait_http"]

_TICKS = os.sysconf("SC_CLK_TCK")


_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port for a server that this process will start shortly.

    Picked below the kernel's ephemeral range on purpose: a port from bind(0)
    comes from that range, which is also where every outgoing connection's local
    port comes from, so between our release and the server's bind a client
    socket can take it (seen in CI: "address already in use" on a metrics
    listener). Below the range only explicit binds compete, and those are ours.
    """
    low = _ephemeral_low()
    for _ in range(500):
        port = random.randrange(20000, max(low, 20001))
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as sock:  # a machine with no room below its ephemeral range
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _status_field(pid: int, name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def tree_pids(pid: int) -> list[int]:
    """`pid` and all its descendants (nginx master + worker, fender --workers N)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        # the command name may contain spaces and parentheses: fields start after the last ')'
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, ()))
    return out


def rss_kib(pid: int, *, peak: bool = False) -> int:
    """Sum of VmRSS (or VmHWM with peak=True) over the process tree, in KiB."""
    name = "VmHWM" if peak else "VmRSS"
    return sum(_status_field(p, name) for p in tree_pids(pid))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process tree (all threads), in seconds."""
    ticks = 0
    for p in tree_pids(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / _TICKS


def wait_http(port: int, host: str, *, path: str = "/", timeout_s: float = 20.0,
              proc: subprocess.Popen[bytes] | None = None) -> bool:
    """Poll until GET answers 200 with the given Host header (or the process died)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
            conn.request("GET", path, headers={"Host": host})
            status = conn.getresponse().status
            conn.close()
            if status == 200:
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


@dataclass
class Managed:
    """A started server: its process, log file and the pid whose tree we measure."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    extra: dict[str, int] = field(default_factory=dict)

    @classmethod
    def start(cls, name: str, args: list[str], log: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> Managed:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
            )
        return cls(name=name, proc=proc, log=log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        # each server runs in its own session: signal its group, so nginx workers and
        # fender worker processes go too
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
