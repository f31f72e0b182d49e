"""A fake clock for tests: time moves only when a test (or a sleeper) moves it.

`sleep(s)` advances the clock by `s` at once and yields to the loop, so code that
backs off or waits for a token runs instantly. `timeout(s)` behaves like
`asyncio.timeout`: when the fake time passes its deadline the body is cancelled
and `TimeoutError` is raised from the context manager.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from policies.base import Outcome, RequestContext
from policies.events import Event, EventBus

__all__ = ["FakeClock", "StalledClock", "FakeTimeout", "ScriptedUpstream", "Hang", "EventLog", "make_ctx"]

E = TypeVar("E", bound=Event)


class FakeTimeout:
    """One `async with clock.timeout(s)` scope on a FakeClock."""

    __slots__ = ("_clock", "_seconds", "deadline", "_task", "expired", "_done")

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        self._clock = clock
        self._seconds = seconds
        self.deadline = 0.0
        self._task: asyncio.Task[object] | None = None
        self.expired = False
        self._done = False

    async def __aenter__(self) -> FakeTimeout:
        self._task = asyncio.current_task()
        self.deadline = self._clock.now() + self._seconds
        self._clock._timers.append(self)
        if self._seconds <= 0:
            self._fire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._done = True
        if self in self._clock._timers:
            self._clock._timers.remove(self)
        if self.expired and exc_type is asyncio.CancelledError:
            assert self._task is not None
            if self._task.uncancel() == 0:
                raise TimeoutError from exc
        return None

    def _fire(self) -> None:
        if not self.expired and not self._done and self._task is not None:
            self.expired = True
            self._task.cancel()


class FakeHandle:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A `policies.clock.Clock` whose time only moves by `advance` or `sleep`."""

    def __init__(self, start: float = 1000.0, wall: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall - start
        self._timers: list[FakeTimeout] = []
        self._scheduled: list[FakeHandle] = []
        self.sleeps: list[float] = []  # every sleep asked for, in order

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def call_at(self, when: float, callback: Callable[[], None]) -> FakeHandle:
        """A timer in fake time (what `policies.deadlines` uses on this clock)."""
        handle = FakeHandle(when, callback)
        self._scheduled.append(handle)
        return handle

    def _next_due(self) -> float | None:
        whens = [t.deadline for t in self._timers] + [h.when for h in self._scheduled if not h.cancelled]
        return min(whens) if whens else None

    def advance(self, seconds: float) -> None:
        """Move time forward, firing every timer that falls due, in deadline order."""
        until = self._now + seconds
        while True:
            due = self._next_due()
            if due is None or due > until:
                break
            self._now = max(self._now, due)
            self._fire_due()
        self._now = until

    def _fire_due(self) -> None:
        for timer in list(self._timers):
            if timer.deadline <= self._now:
                self._timers.remove(timer)
                timer._fire()
        for handle in list(self._scheduled):
            if handle.cancelled:
                self._scheduled.remove(handle)
            elif handle.when <= self._now:
                self._scheduled.remove(handle)
                handle.callback()

    async def sleep(self, seconds: float) -> None:
        """Advance by `seconds` at once; a sleeper cancelled on the way wakes at that moment."""
        self.sleeps.append(seconds)
        task = asyncio.current_task()
        until = self._now + seconds
        while seconds > 0:
            due = self._next_due()
            if due is None or due > until:
                self._now = until
                break
            self._now = max(self._now, due)
            self._fire_due()
            if task is not None and task.cancelling():
                break
        await asyncio.sleep(0)

    def timeout(self, seconds: float) -> FakeTimeout:
        return FakeTimeout(self, seconds)


class StalledClock(FakeClock):
    """A FakeClock whose sleeps never end: a sleeper leaves only by being cancelled."""

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await asyncio.Event().wait()


class ScriptedUpstream:
    """A terminal call for policy tests: plays its script, one step per attempt.

    A step is a status (`503`), a `(status, headers)` pair, an exception instance
    to raise, or `Hang(seconds)` (sleeps on the clock, then answers 200). The
    last step repeats. Like the proxy's forwarder it increments `ctx.attempts`.
    """

    def __init__(self, clock: FakeClock, *script: object) -> None:
        self.clock = clock
        self.script = list(script) or [200]
        self.calls = 0
        self.released: list[int] = []  # statuses of outcomes a policy released

    async def __call__(self, ctx: RequestContext) -> Outcome:
        step = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        ctx.attempts += 1
        if isinstance(step, Hang):
            await self.clock.sleep(step.seconds)
            return Outcome(step.status, {})
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, tuple):
            status, headers = step
        else:
            assert isinstance(step, int)
            status, headers = step, {}
        return Outcome(status, headers, release=lambda: self.released.append(status))


class Hang:
    def __init__(self, seconds: float, status: int = 200) -> None:
        self.seconds = seconds
        self.status = status


class EventLog:
    """An EventBus subscriber that keeps what it saw."""

    def __init__(self) -> None:
        self.bus = EventBus()
        self.events: list[Event] = []
        self.bus.subscribe(lambda event, ctx: self.events.append(event))

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]


def make_ctx(
    method: str = "GET",
    headers: dict[str, str] | None = None,
    *,
    route: str = "r",
    client_ip: str | None = "10.0.0.1",
    replayable: bool = True,
    bus: EventBus | None = None,
) -> RequestContext:
    return RequestContext(route, method, headers or {}, client_ip=client_ip, replayable=replayable, bus=bus)
