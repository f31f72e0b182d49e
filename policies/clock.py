"""Time, injected: policies ask a Clock, tests hand them a FakeClock."""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager
from typing import Protocol

__all__ = ["Clock", "MonotonicClock", "SYSTEM_CLOCK"]


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds; only differences are meaningful."""

    def wall(self) -> float:
        """Seconds since the epoch, for HTTP dates such as Retry-After."""

    async def sleep(self, seconds: float) -> None: ...

    def timeout(self, seconds: float) -> AbstractAsyncContextManager[object]:
        """A context manager that cancels its body after `seconds` and raises TimeoutError."""


class MonotonicClock:
    __slots__ = ()

    # the functions themselves, not methods that call them: `now` runs several times per request
    now = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def timeout(self, seconds: float) -> AbstractAsyncContextManager[object]:
        return asyncio.timeout(seconds)


SYSTEM_CLOCK: Clock = MonotonicClock()
