"""Cheap timeouts for the hot path: one timer per policy, not one per request.

`asyncio.timeout` arms and cancels an event-loop timer for every call, which
costs several microseconds. A `TimeoutPolicy` always uses the same duration, so
its deadlines arrive in the order the calls entered: a FIFO of entries is
already sorted, and a single timer armed for the oldest live deadline serves
them all. Entering and leaving is a deque append and a flag; finished entries
are dropped from the front as calls complete.

Expiry works like `asyncio.timeout`: the task is cancelled, and leaving the
scope turns that cancellation into `TimeoutError` (other cancellations pass).

A clock that offers `call_at(when, callback)` in its own time (the FakeClock)
gets its timers from there; otherwise the event loop's timer is used, with
the clock's `now()` mapped onto `loop.time()`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from policies.clock import Clock

__all__ = ["DeadlineQueue", "DeadlineEntry", "Scheduler"]


class Scheduler(Protocol):
    def call_at(self, when: float, callback: Callable[[], None]) -> Any:
        """Run `callback` once the clock reaches `when`; the result has `cancel()`."""


class DeadlineEntry:
    """One call under a deadline; `outer` is the caller's to keep (the timeout's enclosing deadline)."""

    __slots__ = ("deadline", "task", "cancelling", "outer", "done", "expired")

    def __init__(self, deadline: float, task: asyncio.Task[Any], cancelling: int, outer: float | None) -> None:
        self.deadline = deadline
        self.task = task
        self.cancelling = cancelling
        self.outer = outer
        self.done = False
        self.expired = False


class DeadlineQueue:
    __slots__ = ("duration", "clock", "_entries", "_timer", "_timer_at", "_scheduler", "_loop")

    def __init__(self, duration: float, clock: Clock) -> None:
        self.duration = duration
        self.clock = clock
        self._entries: deque[DeadlineEntry] = deque()
        self._timer: Any = None
        self._timer_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None  # where the timer is armed
        call_at = getattr(clock, "call_at", None)
        self._scheduler: Callable[[float, Callable[[], None]], Any] | None = call_at

    def __len__(self) -> int:
        return len(self._entries)

    def enter(self, task: asyncio.Task[Any], deadline: float, outer: float | None = None) -> DeadlineEntry:
        """`deadline` is the clock's now plus `duration`."""
        entry = DeadlineEntry(deadline, task, task.cancelling(), outer)
        self._entries.append(entry)
        if self._timer is None or (self._scheduler is None and task.get_loop() is not self._loop):
            self._arm(deadline)  # (a policy kept across event loops, e.g. in tests, re-arms)
        return entry

    def leave(self, entry: DeadlineEntry) -> None:
        entry.done = True
        entries = self._entries
        while entries and entries[0].done:
            entries.popleft()
        # the timer stays armed even when nothing is left: re-arming per call is what costs

    def _arm(self, when: float) -> None:
        self._timer_at = when
        if self._scheduler is not None:
            self._timer = self._scheduler(when, self._fire)
        else:
            loop = self._loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + (when - self.clock.now()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self.clock.now()
        entries = self._entries
        while entries:
            entry = entries[0]
            if entry.done:
                entries.popleft()
                continue
            if entry.deadline > now:
                self._arm(entry.deadline)
                return
            entries.popleft()
            entry.expired = True
            entry.task.cancel()
