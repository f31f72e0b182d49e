"""BulkheadPolicy: at most `max_concurrent` calls in flight, `max_queue` more waiting.

A waiter gives up after `queue_timeout` and the request fails with
`BulkheadFull`; 0 means no limit of its own (an enclosing timeout still ends
the wait, as a 504). A slot
freed by a finishing call is handed straight to the oldest waiter, so waiters
are served in order and a newcomer cannot overtake them.
"""

from __future__ import annotations

import asyncio
from asyncio import Task
from collections import deque
from typing import Any, NoReturn

from policies.base import Call, Outcome, RequestContext
from policies.clock import SYSTEM_CLOCK, Clock
from policies.errors import BulkheadFull
from policies.events import BulkheadQueued, BulkheadRejected
from policies.guard import DEFER

__all__ = ["BulkheadPolicy"]


class BulkheadPolicy:
    __slots__ = ("name", "max_concurrent", "max_queue", "queue_timeout", "clock", "in_flight",
                 "_waiters", "_rejected", "_queued", "_message")

    kind = "bulkhead"
    needs_task = False
    settles = True
    defers = True  # when full: it queues the call in its own layer
    resumes = False
    recovers = False

    def __init__(
        self,
        max_concurrent: int = 100,
        max_queue: int = 0,
        queue_timeout: float = 0.0,
        *,
        name: str = "bulkhead",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if max_concurrent < 1 or max_queue < 0 or queue_timeout < 0:
            raise ValueError("a bulkhead needs max_concurrent >= 1, max_queue >= 0, queue_timeout >= 0")
        self.name = name
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.clock = clock
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._rejected = BulkheadRejected(name)
        self._queued = BulkheadQueued(name)
        self._message = f"bulkhead {name} is full ({max_concurrent} in flight)"

    @property
    def queued(self) -> int:
        return len(self._waiters)

    # -- as a guard (policies.guard): a free slot is taken at once; queueing is the async path's

    def enter(self, ctx: RequestContext, now: float, task: Task[Any] | None) -> object:
        if self.in_flight < self.max_concurrent and not self._waiters:
            self.in_flight += 1
            return None
        return DEFER

    def exit(self, ctx: RequestContext, token: object, started: float, outcome: Outcome) -> Outcome:
        self._release()
        return outcome

    def exit_error(self, ctx: RequestContext, token: object, started: float, error: BaseException) -> NoReturn:
        self._release()
        try:
            raise error
        finally:
            del error  # (the traceback holds this frame: see Guard.exit_error)

    async def __call__(self, call: Call, ctx: RequestContext) -> Outcome:
        if self.enter(ctx, 0.0, None) is DEFER:
            await self._enqueue(ctx)  # returns holding a slot, or raises BulkheadFull
        try:
            return await call(ctx)
        finally:
            self._release()

    async def _enqueue(self, ctx: RequestContext) -> None:
        if len(self._waiters) >= self.max_queue:
            ctx.emit(self._rejected)
            raise BulkheadFull(self._message)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        ctx.emit(self._queued)
        try:
            if self.queue_timeout > 0:
                async with self.clock.timeout(self.queue_timeout):
                    await waiter
            else:
                await waiter  # bounded by an enclosing timeout, if any
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot arrived as we gave up: pass it on
            else:
                waiter.cancel()
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            if isinstance(exc, TimeoutError):
                ctx.emit(self._rejected)
                raise BulkheadFull(self._message + " and the queue wait ran out") from None
            raise

    def _release(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter; in_flight is unchanged
                return
        self.in_flight -= 1

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "in_flight": self.in_flight,
                "queued": len(self._waiters), "max_concurrent": self.max_concurrent,
                "max_queue": self.max_queue}
