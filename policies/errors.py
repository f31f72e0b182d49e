"""Typed failures. Only these are raised through a chain; an upstream 5xx is an Outcome.

`proxy.errors` maps each `kind` to an HTTP response in one place.
"""

from __future__ import annotations

__all__ = [
    "FenderError",
    "TimedOut",
    "CircuitOpen",
    "RateLimited",
    "BulkheadFull",
    "UpstreamUnavailable",
    "UpstreamReset",
]


class FenderError(Exception):
    """A call that ended without an upstream response."""

    kind: str = "error"

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message or self.kind)
        self.message = message or self.kind
        self.retry_after = retry_after


class TimedOut(FenderError):
    kind = "timeout"


class CircuitOpen(FenderError):
    kind = "circuit_open"


class RateLimited(FenderError):
    """Carries what the IETF RateLimit header fields need."""

    kind = "rate_limited"

    def __init__(
        self,
        message: str = "",
        *,
        retry_after: float | None = None,
        limit: int = 0,
        remaining: int = 0,
        reset: float = 0.0,
        window: float = 1.0,
        policy: str = "",
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.limit = limit
        self.remaining = remaining
        self.reset = reset
        self.window = window
        self.policy = policy


class BulkheadFull(FenderError):
    kind = "bulkhead_full"


class UpstreamUnavailable(FenderError):
    """The upstream could not be connected to."""

    kind = "upstream_unavailable"


class UpstreamReset(FenderError):
    """The connection broke before a full response head arrived."""

    kind = "upstream_reset"
