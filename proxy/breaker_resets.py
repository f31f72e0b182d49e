"""`--workers N`: a breaker reset on the admin API reaches every worker.

Only worker 0 serves the admin API, but every worker has its own breakers. When worker 0
resets one, it adds the breaker's name to a file in the run's workers directory
(proxy/workers.py: made by the supervisor for this run alone); the other workers look at
the file twice a second and reset theirs. A file rather than a signal: nothing more to
forward or to handle before a worker's loop runs, and a worker busy with traffic is never
interrupted. Each reset has a number, so a worker applies each once, in order.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path

from proxy.workers import replace_file

__all__ = ["ResetAnnouncer", "ResetFollower"]

log = logging.getLogger("fender")

_FILE = "breaker-resets.json"
_KEPT = 64  # resets the file remembers: far more than a follower can miss in half a second
_EVERY = 0.5


class ResetAnnouncer:
    """Worker 0's side: `announce(name)` after it reset its own breaker `name`."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / _FILE
        self._recent: deque[tuple[int, str]] = deque(maxlen=_KEPT)
        self._seq = 0

    def announce(self, name: str) -> bool:
        """False if the other workers cannot be told (the file could not be written)."""
        self._seq += 1
        self._recent.append((self._seq, name))
        try:
            replace_file(self.path, json.dumps({"resets": list(self._recent)}))
        except OSError as exc:
            log.warning("the other workers were not told of the breaker reset", extra={"breaker": name,
                                                                                       "error": str(exc)})
            return False
        return True


class ResetFollower:
    """A FenderApp worker service of workers 1..N-1: resets the breakers worker 0 reset."""

    def __init__(self, directory: Path, reset: Callable[[str], object], every: float = _EVERY) -> None:
        self.path = directory / _FILE
        self.reset = reset
        self.every = every
        self.applied = 0  # the number of the last reset applied
        self._seen: tuple[int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def check(self) -> int:
        """Apply the resets announced since the last check; returns how many."""
        try:
            stat = self.path.stat()
            # (each announcement is a new file, made while the old one exists: a new inode)
            seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if seen == self._seen:
                return 0
            self._seen = seen
            resets = json.loads(self.path.read_bytes())["resets"]
        except (OSError, ValueError, KeyError, TypeError):
            return 0  # none announced yet (or not a file worker 0 wrote): nothing to do
        done = 0
        for seq, name in resets:
            if seq > self.applied:
                self.applied = seq
                self.reset(name)  # (a name this worker does not know is skipped by `reset`)
                done += 1
        return done

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            try:
                self.check()
            except Exception:  # one bad reset must not end the following
                log.exception("applying a breaker reset from worker 0 failed")
