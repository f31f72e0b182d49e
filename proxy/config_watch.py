"""Reload when the config file changes, including a Kubernetes ConfigMap update.

A mounted ConfigMap is a directory in which kubelet keeps the real files in a
timestamped directory and points `..data` at it; each key is a symlink
`fender.yaml -> ..data/fender.yaml`. An update writes a new timestamped
directory and renames a fresh `..data` symlink over the old one, so neither the
path nor (often) the mtime of `fender.yaml` itself changes: only where it
resolves to. Watching the path's resolved target, its inode and mtime, the
symlink itself and the directory's `..data` link covers that and ordinary edits,
with a few `stat` calls per interval and no inotify dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["ConfigWatcher", "Fingerprint", "fingerprint", "DEFAULT_INTERVAL", "interval_from_env"]

log = logging.getLogger("fender")

DEFAULT_INTERVAL = 1.0
INTERVAL_ENV = "FENDER_CONFIG_WATCH_INTERVAL"

Fingerprint = tuple[Any, ...]


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def fingerprint(path: str) -> Fingerprint | None:
    """What identifies the file's current content cheaply; None while it does not exist."""
    try:
        target = os.stat(path)  # follows symlinks: the file that would be read
    except OSError:
        return None
    try:
        link = _stat_key(os.lstat(path))
        real = os.path.realpath(path)
    except OSError:
        return None
    try:
        data = os.readlink(os.path.join(os.path.dirname(path) or ".", "..data"))
    except OSError:
        data = None  # not a ConfigMap mount
    return (real, _stat_key(target), link, data)


def interval_from_env(default: float = DEFAULT_INTERVAL) -> float:
    """`FENDER_CONFIG_WATCH_INTERVAL` in seconds; 0 turns file watching off."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return default
    from config.units import parse_duration

    try:
        return max(0.0, parse_duration(float(raw) if _is_number(raw) else raw))
    except ValueError:
        log.warning("ignoring invalid %s=%r", INTERVAL_ENV, raw)
        return default


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class ConfigWatcher:
    """A service (`start`/`stop`) that calls `reload("file")` when the file changes."""

    def __init__(
        self,
        path: str,
        reload: Callable[[str], Awaitable[Any]],
        *,
        interval: float = DEFAULT_INTERVAL,
        seen: Fingerprint | None = None,
    ) -> None:
        """`seen`: the file's fingerprint when the serving config was read (default: at start)."""
        self.path = path
        self.reload = reload
        self.interval = interval
        self._seen = seen
        self._task: asyncio.Task[None] | None = None
        self.triggered = 0  # reloads this watcher started (for tests and /routes debugging)

    async def start(self) -> None:
        if self.interval <= 0 or self._task is not None:
            return
        if self._seen is None:
            self._seen = fingerprint(self.path)  # what serves now was read from the file as it is
        self._task = asyncio.create_task(self._run(), name="fender-config-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_now()
            except Exception:  # the watcher must outlive any one failed reload
                log.exception("config reload after a file change failed")

    async def check_now(self) -> bool:
        """One poll without waiting for the interval; True if it started a reload."""
        current = fingerprint(self.path)
        if current == self._seen:
            return False
        if current is None:
            # deleted or mid-replacement: keep serving, say so once, wait for it to return
            log.warning("config file is missing; keeping the last good config", extra={"path": self.path})
            self._seen = None
            return False
        # taken before reading, so a write that lands during the reload is seen next time
        self._seen = current
        self.triggered += 1
        await self.reload("file")
        return True
