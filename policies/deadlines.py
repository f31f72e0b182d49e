"""Cheap timeouts for the hot path: one timer per policy, not one per request.

`asyncio.timeout` arms and cancels an event-loop timer for every call, which
costs several microseconds. A `TimeoutPolicy` always uses the same duration, so
its deadlines arrive in the order the calls entered: a FIFO of entries is
already sorted, and a single timer armed for the oldest live deadline serves
them all. Leaving is setting a flag; the entries of calls that left are
dropped from the front when the next call enters or the timer fires (which
it does within `duration`, so they do not linger).

Expiry works like `asyncio.timeout`: the task is cancelled, and leaving the
scope turns that cancellation into `TimeoutError` (other cancellations pass).

A clock that offers `call_at(when, callback)` in its own time (the FakeClock)
gets its timers from there; otherwise the event loop's timer is used, with
the clock's `now()` mapped onto `loop.time()`.
"""

from __future__ import annotations

import asyncio
import textwrap
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from policies.clock import Clock

__all__ = ["DeadlineQueue", "DeadlineEntry", "Scheduler", "OUTER", "STATE", "TASK", "CANCELLING", "DONE", "EXPIRED"]


class Scheduler(Protocol):
    def call_at(self, when: float, callback: Callable[[], None]) -> Any:
        """Run `callback` once the clock reaches `when`; the result has `cancel()`."""


# One call under a deadline: a list, not an object, because one is built per call (a
# class instance costs three times as much). `OUTER` is the caller's to keep (the
# timeout's enclosing deadline); `STATE` says whether the call left or ran out of time.
DeadlineEntry = list[Any]  # [deadline, task, task.cancelling() at entry, outer, state]
DEADLINE, TASK, CANCELLING, OUTER, STATE = range(5)
LIVE, DONE, EXPIRED = 0, 1, 2


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
        """Calls still under a deadline."""
        return sum(1 for entry in self._entries if entry[STATE] == LIVE)

    def enter(self, task: asyncio.Task[Any], deadline: float, outer: float | None = None) -> DeadlineEntry:
        """`deadline` is the clock's now plus `duration`. Leaving is `entry[STATE] = DONE`.

        (`inline_enter` has this as source for fused layers: keep the two alike.)
        """
        entries = self._entries
        while entries and entries[0][STATE]:  # calls that left (expired ones were taken off when they fired)
            entries.popleft()
        entry = [deadline, task, task.cancelling(), outer, LIVE]
        entries.append(entry)
        if self._timer is None or (self._scheduler is None and task.get_loop() is not self._loop):
            self._arm(deadline)  # (a policy kept across event loops, e.g. in tests, re-arms)
        return entry

    def inline_enter(self) -> tuple[str, dict[str, Any]]:
        """`token = enter(task, deadline, outer)` as source, and the names it uses (policies.guard: Inline).

        For a fused layer, which spares the call; keep it alike with `enter`.
        """
        rearm = "" if self._scheduler is not None else " or task.get_loop() is not queue._loop"
        return textwrap.dedent(f"""
            while entries and entries[0][{STATE}]:
                entries.popleft()
            token = [deadline, task, task.cancelling(), outer, {LIVE}]
            entries.append(token)
            if queue._timer is None{rearm}:
                queue._arm(deadline)
            """), {"queue": self, "entries": self._entries}

    def enter_alone(self, task: asyncio.Task[Any], deadline: float, outer: float | None) -> tuple[DeadlineEntry, Any]:
        """An entry out of turn (its deadline is earlier than those of calls that entered since): it gets a timer of its own.

        Returns the entry and the timer, which the caller cancels when it leaves.
        """
        entry = [deadline, task, task.cancelling(), outer, LIVE]

        def fire() -> None:
            if entry[STATE] == LIVE:
                _expire(entry)

        return entry, self._call_at(deadline, fire)

    def _arm(self, when: float) -> None:
        self._timer_at = when
        self._timer = self._call_at(when, self._fire)
        if self._scheduler is None:
            self._loop = asyncio.get_running_loop()  # (only the queue's own timer says where it is armed)

    def _call_at(self, when: float, callback: Callable[[], None]) -> Any:
        if self._scheduler is not None:
            return self._scheduler(when, callback)
        loop = asyncio.get_running_loop()
        return loop.call_at(loop.time() + (when - self.clock.now()), callback)

    def _fire(self) -> None:
        self._timer = None
        now = self.clock.now()
        entries = self._entries
        while entries:
            entry = entries[0]
            if entry[STATE] == DONE:
                entries.popleft()
                continue
            if entry[DEADLINE] > now:
                self._arm(entry[DEADLINE])
                return
            entries.popleft()
            _expire(entry)


def _expire(entry: DeadlineEntry) -> None:
    entry[STATE] = EXPIRED
    entry[TASK].cancel()
