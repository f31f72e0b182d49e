"""Events policies emit; metrics, traces and logs subscribe to them.

Policies never call metrics or tracing code themselves: they hand an event to
`ctx.emit`, and whatever subscribed to the `EventBus` sees it with the request
context (which carries the route name and the tracing span slot).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from policies.base import RequestContext

__all__ = [
    "Event",
    "EventBus",
    "Subscriber",
    "RetryScheduled",
    "RetryBudgetExhausted",
    "RetryAfterTooLong",
    "BreakerTransitioned",
    "BreakerRejected",
    "RateLimitHit",
    "RateLimitBackendError",
    "BulkheadRejected",
    "BulkheadQueued",
    "TimeoutFired",
    "FallbackServed",
]


class Event:
    __slots__ = ()
    name = "event"


@dataclass(frozen=True, slots=True)
class RetryScheduled(Event):
    name = "retry"
    reason: str  # connect-failure | reset | timeout | gateway-error | 5xx | <status>
    attempt: int  # the attempt about to be made (2 for the first retry)
    delay: float


@dataclass(frozen=True, slots=True)
class RetryBudgetExhausted(Event):
    name = "retry_budget_exhausted"
    reason: str


@dataclass(frozen=True, slots=True)
class RetryAfterTooLong(Event):
    name = "retry_after_too_long"
    retry_after: float


@dataclass(frozen=True, slots=True)
class BreakerTransitioned(Event):
    name = "circuit_breaker_transition"
    policy: str
    from_state: str  # closed | half_open | open
    to_state: str


@dataclass(frozen=True, slots=True)
class BreakerRejected(Event):
    name = "circuit_open"
    policy: str


@dataclass(frozen=True, slots=True)
class RateLimitHit(Event):
    name = "rate_limited"
    policy: str
    shadow: bool


@dataclass(frozen=True, slots=True)
class RateLimitBackendError(Event):
    """The shared bucket store (Redis) failed; `on_backend_error` decided the request."""

    name = "rate_limit_backend_error"
    policy: str


@dataclass(frozen=True, slots=True)
class BulkheadRejected(Event):
    name = "bulkhead_full"
    policy: str


@dataclass(frozen=True, slots=True)
class BulkheadQueued(Event):
    name = "bulkhead_queued"
    policy: str


@dataclass(frozen=True, slots=True)
class TimeoutFired(Event):
    name = "timeout"
    budget: float


@dataclass(frozen=True, slots=True)
class FallbackServed(Event):
    name = "fallback"
    reason: str


Subscriber = Callable[[Event, "RequestContext"], None]


class EventBus:
    """Fan-out to subscribers. Cheap when nobody listens."""

    __slots__ = ("_subscribers",)

    def __init__(self) -> None:
        self._subscribers: tuple[Subscriber, ...] = ()

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers = (*self._subscribers, subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers = tuple(s for s in self._subscribers if s is not subscriber)

    def emit(self, event: Event, ctx: RequestContext) -> None:
        for subscriber in self._subscribers:
            subscriber(event, ctx)
