"""Full-jitter exponential backoff and Retry-After parsing: pure functions of their inputs."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC
from email.utils import parsedate_to_datetime

__all__ = ["FullJitterBackoff", "parse_retry_after"]


class FullJitterBackoff:
    """Delay before retry n (1 for the first retry): uniform in [0, min(max, base * 2**(n-1))].

    Full jitter (rather than equal or decorrelated jitter) spreads the retries of
    many clients that failed at the same moment most evenly over time.
    """

    __slots__ = ("base", "max", "rng")

    def __init__(self, base: float = 0.025, max: float = 0.25, rng: Callable[[], float] = random.random) -> None:
        if base < 0 or max < base:
            raise ValueError("backoff needs 0 <= base <= max")
        self.base = base
        self.max = max
        self.rng = rng

    def ceiling(self, retry: int) -> float:
        if retry > 62:  # 2**62 * base is past any cap; avoid huge floats
            return self.max
        return min(self.max, self.base * (1 << (retry - 1)))

    def delay(self, retry: int) -> float:
        return self.rng() * self.ceiling(retry)


def parse_retry_after(value: str | None, wall_now: float) -> float | None:
    """Seconds to wait from a Retry-After value (delay-seconds or an HTTP-date), or None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": an HTTP-date is GMT anyway
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - wall_now)
