"""`--workers N`: how the worker serving /metrics counts the others' requests too.

Every other worker writes its `FenderMetrics.snapshot()` to a file in a directory the
supervisor made for this run alone (a new one each run: a file left by a run that was
killed is never read), once a second and when it stops; worker 0 reads them when
scraped and adds them to its own numbers. Files rather than a socket per worker: nothing
more listens, a scrape never waits on a busy worker, and the numbers of a worker are at
most a second old.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from proxy.telemetry.metrics import FenderMetrics
from proxy.workers import replace_file

__all__ = ["SnapshotWriter", "read_peers"]

log = logging.getLogger("fender.telemetry")

_EVERY = 1.0


def _path(directory: Path, index: int) -> Path:
    return directory / f"worker-{index}.json"


def read_peers(directory: Path, workers: int) -> list[dict[str, Any]]:
    """The snapshots of workers 1..N-1 (worker 0 reads them); a missing or unreadable one is left out."""
    out = []
    for index in range(1, workers):
        path = _path(directory, index)
        try:
            snap = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue  # (written by rename, so never half a file; gone if the run is ending)
        if isinstance(snap, dict):
            out.append(snap)
    return out


class SnapshotWriter:
    """A FenderApp service of workers 1..N-1: their numbers, for worker 0's /metrics."""

    def __init__(self, metrics: FenderMetrics, directory: Path, index: int) -> None:
        self.metrics = metrics
        self.path = _path(directory, index)
        self._task: asyncio.Task[None] | None = None
        self._warned = False

    async def start(self) -> None:
        self.write()
        self._task = asyncio.get_running_loop().create_task(self._every_second())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.write()  # (after the proxy listener closed: every request it served is counted)

    def write(self) -> None:
        try:
            replace_file(self.path, json.dumps(self.metrics.snapshot()))
        except OSError as exc:
            if not self._warned:  # (once: this runs every second)
                self._warned = True
                log.warning("cannot write this worker's metrics for worker 0: %s", exc)

    async def _every_second(self) -> None:
        while True:
            await asyncio.sleep(_EVERY)
            self.write()
