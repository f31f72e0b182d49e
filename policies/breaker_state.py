"""The circuit breaker as a pure, synchronous state machine (after resilience4j).

It is told results rather than wrapping calls: `try_acquire(now)` before the
call, then `on_success(duration, now, generation)` or `on_error(...)` (or
`release(generation)` for a call that ended without a verdict). Every
transition is one assignment in `_to`, which bumps `generation` so that results
of calls admitted under an earlier state are ignored.

    closed --(threshold reached)--> open --(open_for elapsed)--> half_open
    half_open --(half_open_calls successes)--> closed
    half_open --(a failure or slow call)--> open, open_for doubled up to max_open_for
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, Protocol

__all__ = [
    "BreakerState",
    "BreakerStateMachine",
    "SlidingWindow",
    "CountWindow",
    "TimeWindow",
]


class BreakerState(Enum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"

    @property
    def gauge(self) -> int:
        """The value of fender_circuit_breaker_state: 0 closed, 1 half-open, 2 open."""
        return _GAUGE[self]


_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
_CLOSED = BreakerState.CLOSED  # (a module global is cheaper to reach than an Enum member)


class SlidingWindow(Protocol):
    """Recent call results; totals are kept up to date so a snapshot is O(1)."""

    calls: int
    failures: int
    slow: int

    def record(self, now: float, failed: bool, slow: bool) -> None: ...

    def roll(self, now: float) -> None:
        """Drop what has left the window by `now`."""

    def reset(self) -> None: ...


class CountWindow:
    """The last `size` calls, in a ring."""

    __slots__ = ("size", "calls", "failures", "slow", "_ring", "_pos")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a count window holds at least one call")
        self.size = size
        self._ring = bytearray(size)  # bit 1: failed, bit 2: slow, bit 4: occupied
        self.reset()

    def reset(self) -> None:
        self._ring[:] = bytes(self.size)
        self._pos = 0
        self.calls = self.failures = self.slow = 0

    def roll(self, now: float) -> None:
        return None

    def record(self, now: float, failed: bool, slow: bool) -> None:
        old = self._ring[self._pos]
        if old & 4:
            self.calls -= 1
            self.failures -= old & 1
            self.slow -= (old >> 1) & 1
        self._ring[self._pos] = 4 | (1 if failed else 0) | (2 if slow else 0)
        self._pos = (self._pos + 1) % self.size
        self.calls += 1
        self.failures += failed
        self.slow += slow


class TimeWindow:
    """The calls of the last `seconds`, in up to 60 buckets of equal width."""

    __slots__ = ("seconds", "calls", "failures", "slow", "_n", "_width", "_calls", "_failures",
                 "_slow", "_head")

    def __init__(self, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError("a time window must be longer than zero")
        self.seconds = seconds
        self._n = max(1, min(60, math.ceil(seconds)))
        self._width = seconds / self._n
        self._calls = [0] * self._n
        self._failures = [0] * self._n
        self._slow = [0] * self._n
        self.reset()

    def reset(self) -> None:
        for ring in (self._calls, self._failures, self._slow):
            ring[:] = [0] * self._n
        self._head: int | None = None
        self.calls = self.failures = self.slow = 0

    def roll(self, now: float) -> None:
        index = int(now // self._width)
        head = self._head
        if head is None:
            self._head = index
        elif index > head:
            for i in range(head + 1, min(index, head + self._n) + 1):
                slot = i % self._n
                self.calls -= self._calls[slot]
                self.failures -= self._failures[slot]
                self.slow -= self._slow[slot]
                self._calls[slot] = self._failures[slot] = self._slow[slot] = 0
            self._head = index

    def record(self, now: float, failed: bool, slow: bool) -> None:
        self.roll(now)
        assert self._head is not None
        slot = self._head % self._n
        self._calls[slot] += 1
        self.calls += 1
        if failed:
            self._failures[slot] += 1
            self.failures += 1
        if slow:
            self._slow[slot] += 1
            self.slow += 1


class BreakerStateMachine:
    """Either consecutive mode (`consecutive_failures`) or rate mode (`window` given)."""

    __slots__ = (
        "state", "generation", "previous", "consecutive_failures", "failure_rate", "window",
        "min_calls", "slow_call_duration", "slow_call_rate", "open_for", "max_open_for",
        "half_open_calls", "current_open_for", "open_until", "streak", "_probes", "_probe_successes",
    )

    def __init__(
        self,
        *,
        consecutive_failures: int | None = 5,
        failure_rate: float = 0.5,
        window: SlidingWindow | None = None,
        min_calls: int = 20,
        slow_call_duration: float | None = None,
        slow_call_rate: float = 1.0,
        open_for: float = 30.0,
        max_open_for: float = 300.0,
        half_open_calls: int = 1,
    ) -> None:
        if window is None and consecutive_failures is None:
            raise ValueError("give consecutive_failures or a sliding window")
        if max_open_for < open_for:
            raise ValueError("max_open_for must not be smaller than open_for")
        self.window = window
        self.consecutive_failures = consecutive_failures if window is None else None
        self.failure_rate = failure_rate
        # a count window smaller than min_calls could never trip otherwise
        size = getattr(window, "size", None)
        self.min_calls = min(min_calls, size) if isinstance(size, int) else min_calls
        self.slow_call_duration = slow_call_duration
        self.slow_call_rate = slow_call_rate
        self.open_for = open_for
        self.max_open_for = max_open_for
        self.half_open_calls = half_open_calls
        self.state = BreakerState.CLOSED
        self.previous = BreakerState.CLOSED  # the state before the last transition
        self.generation = 0
        self.current_open_for = open_for
        self.open_until = 0.0
        self.streak = 0  # failures in a row while closed (a closed breaker's fused layer resets it)
        self._probes = 0
        self._probe_successes = 0

    # -- transitions -------------------------------------------------------

    def _to(self, state: BreakerState, now: float) -> None:
        self.previous, self.state = self.state, state
        self.generation += 1
        if state is BreakerState.OPEN:
            self.open_until = now + self.current_open_for
        elif state is BreakerState.HALF_OPEN:
            self._probes = 0
            self._probe_successes = 0
        else:
            self.current_open_for = self.open_for
            self.streak = 0
            if self.window is not None:
                self.window.reset()

    def _trip(self, now: float) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self.current_open_for = min(self.current_open_for * 2, self.max_open_for)
        self._to(BreakerState.OPEN, now)

    def reset(self, now: float) -> None:
        """Force closed (admin)."""
        if self.state is not BreakerState.CLOSED:
            self._to(BreakerState.CLOSED, now)
        else:
            self.current_open_for = self.open_for
            self.streak = 0
            if self.window is not None:
                self.window.reset()

    # -- the calls ----------------------------------------------------------

    def try_acquire(self, now: float) -> bool:
        state = self.state
        if state is _CLOSED:
            return True
        if state is BreakerState.OPEN:
            if now < self.open_until:
                return False
            self._to(BreakerState.HALF_OPEN, now)
        if self._probes < self.half_open_calls:
            self._probes += 1
            return True
        return False

    def remaining_open(self, now: float) -> float:
        """Seconds until the breaker lets a probe through (0 when it would now)."""
        if self.state is BreakerState.OPEN:
            return max(0.0, self.open_until - now)
        return 0.0

    def release(self, generation: int) -> None:
        """A call admitted under `generation` ended with no verdict on the upstream."""
        if generation == self.generation and self.state is BreakerState.HALF_OPEN and self._probes > 0:
            self._probes -= 1

    def on_success(self, duration: float, now: float, generation: int | None = None) -> None:
        if generation is not None and generation != self.generation:
            return
        slow = self.slow_call_duration is not None and duration >= self.slow_call_duration
        if not slow and self.window is None and self.state is _CLOSED:
            self.streak = 0  # what _record does here, on every request: spare it the call
            # (CircuitBreakerPolicy.inline has this case too: keep the two alike)
            return
        self._record(now, False, slow)

    def on_error(self, duration: float, now: float, generation: int | None = None) -> None:
        if generation is not None and generation != self.generation:
            return
        slow = self.slow_call_duration is not None and duration >= self.slow_call_duration
        self._record(now, True, slow)

    def _record(self, now: float, failed: bool, slow: bool) -> None:
        state = self.state
        if state is BreakerState.OPEN:
            return
        if state is BreakerState.HALF_OPEN:
            if failed or slow:
                self._trip(now)
                return
            self._probe_successes += 1
            if self._probe_successes >= self.half_open_calls:
                self._to(BreakerState.CLOSED, now)
            return
        window = self.window
        if window is None:
            if failed:
                self.streak += 1
                if self.consecutive_failures is not None and self.streak >= self.consecutive_failures:
                    self._trip(now)
            else:
                self.streak = 0
            return
        window.record(now, failed, slow)
        calls = window.calls
        if calls < self.min_calls:
            return
        if window.failures >= self.failure_rate * calls or (
            self.slow_call_duration is not None and window.slow >= self.slow_call_rate * calls
        ):
            self._trip(now)

    def describe(self, now: float) -> dict[str, Any]:
        info: dict[str, Any] = {"state": self.state.value}
        if self.state is BreakerState.OPEN:
            info["retry_after"] = round(self.remaining_open(now), 3)
        info["open_for"] = self.current_open_for
        if self.window is None:
            info["consecutive_failures"] = self.streak
        else:
            self.window.roll(now)
            info["window"] = {"calls": self.window.calls, "failures": self.window.failures,
                              "slow": self.window.slow}
        return info
