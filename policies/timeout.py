"""TimeoutPolicy: cancel the inner call after a budget.

Outside a retry it is the total budget of the request (retries and backoff
included); inside a retry it bounds each attempt. Either way it narrows
`ctx.deadline` for the calls it wraps, so a retry never sleeps past it, and
restores the outer deadline afterwards.
"""

from __future__ import annotations

import textwrap
from asyncio import CancelledError, Task, current_task
from collections.abc import Awaitable
from typing import Any, NoReturn

from policies.base import Call, Outcome, RequestContext
from policies.clock import SYSTEM_CLOCK, Clock
from policies.deadlines import (
    CANCELLING,
    DONE,
    EXPIRED,
    OUTER,
    STATE,
    TASK,
    DeadlineEntry,
    DeadlineQueue,
)
from policies.errors import TimedOut
from policies.events import TimeoutFired
from policies.guard import Inline

__all__ = ["TimeoutPolicy"]


class TimeoutPolicy:
    __slots__ = ("duration", "name", "clock", "_event", "_message", "_deadlines")

    kind = "timeout"
    needs_task = True  # to cancel it at the deadline
    settles = True
    defers = False
    resumes = False
    recovers = False

    def __init__(self, duration: float, *, name: str = "timeout", clock: Clock = SYSTEM_CLOCK) -> None:
        if duration <= 0:
            raise ValueError("a timeout must be greater than zero")
        self.duration = duration
        self.name = name
        self.clock = clock
        self._event = TimeoutFired(budget=duration)  # immutable, so built once
        self._message = f"no response within {_seconds(duration)}"
        # not asyncio.timeout: one timer for all calls instead of one per call (see deadlines)
        self._deadlines = DeadlineQueue(duration, clock)

    # -- as a guard (policies.guard): register the deadline, settle it after the call

    def enter(self, ctx: RequestContext, now: float, task: Task[Any] | None) -> DeadlineEntry:
        assert task is not None
        outer = ctx.deadline
        deadline = now + self.duration
        if outer is None or deadline < outer:
            ctx.deadline = deadline
        return self._deadlines.enter(task, deadline, outer)

    def inline(self) -> Inline:
        """`enter` and `exit` as they are (the layer saves a call each, and the queue's)."""
        enter, names = self._deadlines.inline_enter()
        return Inline(names={**names, "duration": self.duration}, enter=self._narrow() + enter, exit=f"""
            token[{STATE}] = {DONE}
            ctx.deadline = token[{OUTER}]
            """)

    def _narrow(self) -> str:
        """`enter`'s first half as source: sets `outer` and `deadline`, and narrows `ctx.deadline`.

        (`duration` is a name, which the layer turns into the number: `repr` would not spell `inf`.)
        """
        return textwrap.dedent("""
            outer = ctx.deadline
            deadline = now + duration
            if outer is None or deadline < outer:
                ctx.deadline = deadline
            """)

    # -- covered by a shorter timeout in the same fused layer (policies.guard: Coverable)

    def inline_covered(self) -> Inline:
        """Only `ctx.deadline`, narrowed and restored: the timeout further in cancels first."""
        return Inline(names={"duration": self.duration}, enter=self._narrow(), exit="ctx.deadline = outer",
                      exit_error="guard.overran(ctx, deadline, outer, error)")

    def overran(self, ctx: RequestContext, deadline: float, outer: float | None, error: BaseException) -> NoReturn:
        """A covered timeout's `exit_error`: `error` goes on out, or this one's own TimedOut.

        Its own when `error` is the shorter timeout's and this one's time is up too (the loop
        ran late past both deadlines, or the call took long to unwind): as a layer of its own,
        this one would have cut the call off first.
        """
        ctx.deadline = outer
        # (a TimedOut with this one's message is this one's own, from `within`)
        if isinstance(error, TimedOut) and error.message != self._message and self.clock.now() >= deadline:
            ctx.emit(self._event)
            raise TimedOut(self._message) from None
        try:
            raise error
        finally:
            del error  # (the traceback holds this frame: see Guard.exit_error)

    async def within(self, ctx: RequestContext, deadline: float, awaitable: Awaitable[Outcome]) -> Outcome:
        """A covered timeout's await outside the shorter one (a retry's next attempts): cut off at `deadline`."""
        # out of turn in the deadline queue (the call entered earlier), so with a timer of its own
        task = ctx.task or current_task()
        assert task is not None
        entry, timer = self._deadlines.enter_alone(task, deadline, ctx.deadline)
        try:
            outcome = await awaitable
        except BaseException as error:
            self.exit_error(ctx, entry, 0.0, error)
        finally:
            timer.cancel()
        return self.exit(ctx, entry, 0.0, outcome)

    def exit(self, ctx: RequestContext, entry: DeadlineEntry, started: float, outcome: Outcome) -> Outcome:
        entry[STATE] = DONE
        ctx.deadline = entry[OUTER]
        return outcome

    def exit_error(
        self, ctx: RequestContext, entry: DeadlineEntry, started: float, error: BaseException
    ) -> NoReturn:
        try:
            # our expiry, not another cancellation (the client left, an outer timeout)
            if (isinstance(error, CancelledError) and entry[STATE] == EXPIRED
                    and entry[TASK].uncancel() <= entry[CANCELLING]):
                ctx.emit(self._event)
                raise TimedOut(self._message) from None
            raise error
        finally:
            entry[STATE] = DONE
            ctx.deadline = entry[OUTER]
            del error  # (the traceback holds this frame: see Guard.exit_error)

    async def __call__(self, call: Call, ctx: RequestContext) -> Outcome:
        entry = self.enter(ctx, self.clock.now(), ctx.task or current_task())
        try:
            outcome = await call(ctx)
        except BaseException as error:
            self.exit_error(ctx, entry, 0.0, error)
        return self.exit(ctx, entry, 0.0, outcome)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "duration": self.duration}


def _seconds(value: float) -> str:
    return f"{value * 1000:g}ms" if value < 1 else f"{value:g}s"
