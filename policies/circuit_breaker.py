"""CircuitBreakerPolicy: the async adapter around `BreakerStateMachine`.

A response whose status is in `failure_statuses` counts as a failure, and so do
connect failures, resets and timeouts (also a timeout outside the breaker that
cancels the call at the request's deadline). Rejections by policies further in
(another breaker, a bulkhead) and other cancellations (the client left) say
nothing about the upstream and are not counted.
"""

from __future__ import annotations

from asyncio import CancelledError, Task
from collections.abc import Iterable
from typing import Any, NoReturn

from policies.base import Call, Outcome, RequestContext
from policies.breaker_state import BreakerState, BreakerStateMachine, TimeWindow
from policies.clock import SYSTEM_CLOCK, Clock
from policies.errors import CircuitOpen, TimedOut, UpstreamReset, UpstreamUnavailable
from policies.events import BreakerRejected, BreakerTransitioned
from policies.guard import Inline

__all__ = ["CircuitBreakerPolicy", "expand_statuses"]

_UPSTREAM_FAILURES = (UpstreamUnavailable, UpstreamReset, TimedOut)


def expand_statuses(items: Iterable[str | int]) -> frozenset[int]:
    """`[5xx, 429]` -> the set of status codes it names."""
    statuses: set[int] = set()
    for item in items:
        if isinstance(item, int) or item.isdigit():
            statuses.add(int(item))
        elif len(item) == 3 and item[0] in "12345" and item[1:] == "xx":
            first = int(item[0]) * 100
            statuses.update(range(first, first + 100))
        else:
            raise ValueError(f"{item!r} is not a status or a class such as '5xx'")
    return frozenset(statuses)


_CLOSED = BreakerState.CLOSED  # (a module global is cheaper to reach than an Enum member)


class CircuitBreakerPolicy:
    __slots__ = ("name", "machine", "failure_statuses", "clock", "_rejected", "_timed")

    kind = "circuit_breaker"
    needs_task = False
    settles = True
    defers = False
    resumes = False
    recovers = False

    def __init__(
        self,
        machine: BreakerStateMachine,
        *,
        failure_statuses: Iterable[str | int] = ("5xx",),
        name: str = "circuit_breaker",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.name = name
        self.machine = machine
        self.failure_statuses = expand_statuses(failure_statuses)
        self.clock = clock
        self._rejected = BreakerRejected(name)
        # only a time window or a slow-call threshold needs the time after a successful call
        self._timed = machine.slow_call_duration is not None or isinstance(machine.window, TimeWindow)

    # -- as a guard (policies.guard): the token is the generation the call was admitted under

    def enter(self, ctx: RequestContext, now: float, task: Task[Any] | None) -> int:
        machine = self.machine
        generation = machine.generation
        if machine.state is _CLOSED:  # what try_acquire answers when closed, without the call
            return generation
        if not machine.try_acquire(now):
            ctx.emit(self._rejected)
            retry_after = machine.remaining_open(now)
            raise CircuitOpen(
                f"circuit breaker {self.name} is {machine.state.value}",
                retry_after=retry_after if retry_after > 0 else 1.0,
            )
        if machine.generation != generation:  # open -> half_open just now
            self._emit_transition(ctx)
            generation = machine.generation
        return generation

    def inline(self) -> Inline:
        """A closed breaker's `enter`; and the `exit` of a success there, if only failures in a row count."""
        machine = self.machine
        names = {"machine": machine, "failures": self.failure_statuses, "CLOSED": _CLOSED}
        enter = "token = machine.generation if machine.state is CLOSED else enter(ctx, now, task)"
        if machine.window is not None or machine.slow_call_duration is not None:
            return Inline(enter=enter, names=names)
        return Inline(enter=enter, names=names, exit="""
            if outcome.status in failures or token != machine.generation or machine.state is not CLOSED:
                outcome = exit(ctx, token, now, outcome)
            else:
                machine.streak = 0  # BreakerStateMachine.on_success, closed
            """)

    def exit(self, ctx: RequestContext, generation: int, started: float, outcome: Outcome) -> Outcome:
        machine = self.machine
        before = machine.generation  # did *this* result move the breaker? (others may have)
        if outcome.status in self.failure_statuses:
            now = self.clock.now()
            machine.on_error(now - started, now, generation)
        else:
            now = self.clock.now() if self._timed else started
            machine.on_success(now - started, now, generation)
        if machine.generation != before:
            self._emit_transition(ctx)
        return outcome

    def exit_error(self, ctx: RequestContext, generation: int, started: float, error: BaseException) -> NoReturn:
        machine = self.machine
        if isinstance(error, _UPSTREAM_FAILURES):
            self._failed(ctx, generation, started, self.clock.now())
        elif isinstance(error, CancelledError):
            now = self.clock.now()
            if ctx.deadline is not None and now >= ctx.deadline:
                # a timeout outside the breaker cancelled the call: the upstream was too slow
                self._failed(ctx, generation, started, now)
            else:
                machine.release(generation)  # e.g. the client went away
        else:
            machine.release(generation)
        try:
            raise error
        finally:
            del error  # (the traceback holds this frame: see Guard.exit_error)

    def _failed(self, ctx: RequestContext, generation: int, started: float, now: float) -> None:
        machine = self.machine
        before = machine.generation
        machine.on_error(now - started, now, generation)
        if machine.generation != before:
            self._emit_transition(ctx)

    async def __call__(self, call: Call, ctx: RequestContext) -> Outcome:
        start = self.clock.now()
        generation = self.enter(ctx, start, None)
        try:
            outcome = await call(ctx)
        except BaseException as error:
            self.exit_error(ctx, generation, start, error)
        return self.exit(ctx, generation, start, outcome)

    def _emit_transition(self, ctx: RequestContext) -> None:
        machine = self.machine
        ctx.emit(BreakerTransitioned(self.name, machine.previous.value, machine.state.value))

    @property
    def state(self) -> BreakerState:
        return self.machine.state

    def reset(self) -> None:
        """Force the breaker closed (POST /breakers/{name}/reset)."""
        self.machine.reset(self.clock.now())

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, **self.machine.describe(self.clock.now())}
