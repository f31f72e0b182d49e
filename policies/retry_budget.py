"""RetryBudget: retries may add at most `ratio` of recent requests, plus a small floor.

Like Linkerd's budget: within a sliding window, retries are allowed while
`retries < ratio * requests + min_per_second * window`. With the default ratio
0.2 an upstream that fails every call sees at most about 1.2x its normal load
(plus the floor, which lets a low-traffic route still retry). Counts live in a
ring of buckets, so every operation is O(1).
"""

from __future__ import annotations

from typing import Any

__all__ = ["RetryBudget"]

_BUCKETS = 10


class RetryBudget:
    __slots__ = ("ratio", "min_per_second", "window", "_width", "_requests", "_retries",
                 "_head", "_slot", "_total_requests", "_total_retries")

    def __init__(self, ratio: float = 0.2, min_per_second: float = 10.0, window: float = 10.0) -> None:
        if ratio < 0 or min_per_second < 0 or window <= 0:
            raise ValueError("a retry budget needs ratio >= 0, min_per_second >= 0, window > 0")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self._width = window / _BUCKETS
        self._requests = [0] * _BUCKETS
        self._retries = [0] * _BUCKETS
        self._head: int | None = None  # index (in bucket widths since 0) of the newest bucket
        self._slot = 0  # where the head bucket is in the rings
        self._total_requests = 0
        self._total_retries = 0

    def _roll(self, now: float) -> int:
        index = int(now // self._width)
        head = self._head
        if head is None:
            self._head = index
        elif index > head:
            for i in range(head + 1, min(index, head + _BUCKETS) + 1):
                slot = i % _BUCKETS
                self._total_requests -= self._requests[slot]
                self._total_retries -= self._retries[slot]
                self._requests[slot] = 0
                self._retries[slot] = 0
            self._head = index
        self._slot = (self._head if self._head is not None else index) % _BUCKETS
        return self._slot

    def record_request(self, now: float) -> None:
        # every request lands here: within the head bucket there is nothing to roll
        slot = self._slot if int(now // self._width) == self._head else self._roll(now)
        self._requests[slot] += 1
        self._total_requests += 1

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget if there is room; False means: do not retry."""
        slot = self._roll(now)
        allowed = self.ratio * self._total_requests + self.min_per_second * self.window
        if self._total_retries + 1 > allowed:
            return False
        self._retries[slot] += 1
        self._total_retries += 1
        return True

    def snapshot(self, now: float) -> tuple[int, int]:
        self._roll(now)
        return self._total_requests, self._total_retries

    def describe(self, now: float) -> dict[str, Any]:
        requests, retries = self.snapshot(now)
        return {"requests": requests, "retries": retries,
                "allowed": self.ratio * requests + self.min_per_second * self.window}
