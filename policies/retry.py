"""RetryPolicy: make the call again when it failed in a way worth retrying.

Each decision is a pure function of the attempt (its status or error, the
number made so far, the deadline and the budget). A retry is made only when all
of these hold: the condition is listed in `on`; attempts are left; the method
is idempotent or the request carries `Idempotency-Key`; the request body can be
replayed; the backoff (or the honoured Retry-After) ends before `ctx.deadline`;
and the retry budget has room. Otherwise the last response is returned as is,
or the last error is raised again.
"""

from __future__ import annotations

import random
from asyncio import Task
from collections.abc import Callable, Iterable
from typing import Any

from policies.backoff import FullJitterBackoff, parse_retry_after
from policies.base import Call, Outcome, RequestContext
from policies.clock import SYSTEM_CLOCK, Clock
from policies.errors import FenderError
from policies.events import RetryAfterTooLong, RetryBudgetExhausted, RetryScheduled
from policies.guard import Inline, Resume
from policies.retry_budget import RetryBudget

__all__ = ["RetryPolicy", "DEFAULT_ON", "IDEMPOTENT_METHODS", "GATEWAY_ERRORS"]

DEFAULT_ON: tuple[str | int, ...] = ("connect-failure", "reset", "gateway-error")
IDEMPOTENT_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE")
GATEWAY_ERRORS = (502, 503, 504)
# typed failures that a retry condition can name; anything else (circuit_open, ...) is final
_ERROR_CONDITIONS = {
    "upstream_unavailable": "connect-failure",
    "upstream_reset": "reset",
    "timeout": "timeout",
}


def _status_reasons(on: Iterable[str | int]) -> dict[int, str]:
    """Status -> retry reason, most specific condition first (a number, then gateway-error, then a class)."""
    reasons: dict[int, str] = {}
    items = list(on)
    for item in items:
        if isinstance(item, int) or (isinstance(item, str) and item.isdigit()):
            reasons.setdefault(int(item), str(int(item)))
    if "gateway-error" in items:
        for status in GATEWAY_ERRORS:
            reasons.setdefault(status, "gateway-error")
    for item in items:
        if isinstance(item, str) and len(item) == 3 and item.endswith("xx") and item[0] in "12345":
            first = int(item[0]) * 100
            for status in range(first, first + 100):
                reasons.setdefault(status, item)
    return reasons


class RetryPolicy:
    __slots__ = ("name", "attempts", "methods", "backoff", "honor_retry_after", "retry_after_max",
                 "budget", "max_body", "clock", "_status_reason", "_error_reason", "_on")

    kind = "retry"
    needs_task = False
    settles = True
    defers = False
    resumes = True  # every attempt after the first
    recovers = False  # (its exits resume instead)

    def __init__(
        self,
        *,
        attempts: int = 3,
        on: Iterable[str | int] = DEFAULT_ON,
        methods: Iterable[str] = IDEMPOTENT_METHODS,
        backoff: FullJitterBackoff | None = None,
        honor_retry_after: bool = True,
        retry_after_max: float = 10.0,
        budget: RetryBudget | None = None,
        max_body: int = 64 * 1024,
        name: str = "retry",
        clock: Clock = SYSTEM_CLOCK,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts counts the first call too, so it is at least 1")
        self.name = name
        self.attempts = attempts
        self._on = tuple(on)
        self.methods = frozenset(m.upper() for m in methods)
        self.backoff = backoff if backoff is not None else FullJitterBackoff(rng=rng)
        self.honor_retry_after = honor_retry_after
        self.retry_after_max = retry_after_max
        self.budget = budget if budget is not None else RetryBudget()
        self.max_body = max_body
        self.clock = clock
        self._status_reason = _status_reasons(self._on)
        self._error_reason = {kind: cond for kind, cond in _ERROR_CONDITIONS.items() if cond in self._on}

    # -- as a guard (policies.guard): the first attempt is the inner call the guard wraps;
    # -- any further one is a Resume, which makes them through the rest of the chain

    def enter(self, ctx: RequestContext, now: float, task: Task[Any] | None) -> bool:
        """Whether this request may be retried at all (it then counts in the budget)."""
        if self.attempts == 1 or not ctx.replayable or (
            ctx.method not in self.methods and "idempotency-key" not in ctx.headers
        ):
            return False
        self.budget.record_request(now)
        return True

    def inline(self) -> Inline:
        """`enter` for an idempotent method, and `exit` for a status that is not retried."""
        names = {"methods": self.methods, "budget": self.budget, "reasons": self._status_reason}
        if self.attempts == 1:
            return Inline(enter="token = False", exit="pass")
        return Inline(names=names, enter="""
            if ctx.replayable and ctx.method in methods:
                token = True
                if now < budget.head_ends:  # RetryBudget.record_request, within the newest bucket
                    budget.requests += 1
                else:
                    budget.record_request(now)
            else:
                token = enter(ctx, now, task)
            """, exit="""
            if token and outcome.status in reasons:
                outcome = exit(ctx, token, now, outcome)
            """)

    def exit(self, ctx: RequestContext, retrying: bool, started: float, outcome: Outcome) -> Outcome | Resume:
        if not retrying or outcome.status not in self._status_reason:  # (the common case, cheaply)
            return outcome
        retry = self._after_outcome(ctx, outcome, 1)
        return outcome if retry is None else self._resume(ctx, *retry)

    def exit_error(
        self, ctx: RequestContext, retrying: bool, started: float, error: BaseException
    ) -> Resume:
        if retrying and isinstance(error, FenderError):
            retry = self._after_error(ctx, error, 1)
            if retry is not None:
                return self._resume(ctx, *retry)
        try:
            raise error
        finally:
            del error  # (the traceback holds this frame: see Guard.exit_error)

    def _resume(self, ctx: RequestContext, reason: str, delay: float) -> Resume:
        return Resume(lambda inner: self._retry(inner, ctx, 1, reason, delay))

    async def __call__(self, call: Call, ctx: RequestContext) -> Outcome:
        retrying = self.enter(ctx, self.clock.now(), None)
        result: Outcome | Resume
        try:
            outcome = await call(ctx)
        except BaseException as error:
            result = self.exit_error(ctx, retrying, 0.0, error)
        else:
            result = self.exit(ctx, retrying, 0.0, outcome)
        return await result.run(call) if isinstance(result, Resume) else result

    async def _retry(self, call: Call, ctx: RequestContext, attempt: int, reason: str, delay: float) -> Outcome:
        """The attempts after `attempt`, the next one for `reason` after `delay`."""
        while True:
            attempt += 1
            ctx.emit(RetryScheduled(reason, attempt, delay))
            if delay > 0:
                await self.clock.sleep(delay)
            try:
                outcome = await call(ctx)
            except FenderError as exc:
                retry = self._after_error(ctx, exc, attempt)
                if retry is None:
                    raise
            else:
                retry = self._after_outcome(ctx, outcome, attempt)
                if retry is None:
                    return outcome
            reason, delay = retry

    # -- the decisions: the reason and delay of the next attempt, or None (no retry)

    def _after_error(self, ctx: RequestContext, error: FenderError, attempt: int) -> tuple[str, float] | None:
        reason = self._error_reason.get(error.kind)
        if reason is None or attempt >= self.attempts or not ctx.replayable:
            return None
        delay = self.backoff.delay(attempt)
        if not self._may_retry(ctx, reason, delay):
            return None
        return reason, delay

    def _after_outcome(self, ctx: RequestContext, outcome: Outcome, attempt: int) -> tuple[str, float] | None:
        """(Releases the outcome when it is to be retried.)"""
        reason = self._status_reason.get(outcome.status)
        if reason is None or attempt >= self.attempts or not ctx.replayable:
            return None
        delay = self.backoff.delay(attempt)
        if self.honor_retry_after:
            headers = outcome.headers
            retry_after = parse_retry_after(
                headers.get("retry-after") or headers.get("Retry-After"), self.clock.wall()
            )
            if retry_after is not None:
                if retry_after > self.retry_after_max:
                    ctx.emit(RetryAfterTooLong(retry_after))
                    return None
                delay = retry_after
        if not self._may_retry(ctx, reason, delay):
            return None
        outcome.release()
        return reason, delay

    def _may_retry(self, ctx: RequestContext, reason: str, delay: float) -> bool:
        now = self.clock.now()
        if ctx.deadline is not None and now + delay >= ctx.deadline:
            return False  # the retry could not finish within the total budget
        if not self.budget.try_spend(now):
            ctx.emit(RetryBudgetExhausted(reason))
            return False
        return True

    def describe(self) -> dict[str, Any]:
        requests, retries = self.budget.snapshot(self.clock.now())
        return {
            "kind": self.kind,
            "name": self.name,
            "attempts": self.attempts,
            "on": [str(i) for i in self._on],
            "budget": {"requests": requests, "retries": retries},
        }
