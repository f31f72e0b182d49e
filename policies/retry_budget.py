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
    __slots__ = ("ratio", "min_per_second", "window", "_width", "_requests", "_retries", "_head",
                 "_old_requests", "_old_retries", "requests", "retries", "head_ends")

    def __init__(self, ratio: float = 0.2, min_per_second: float = 10.0, window: float = 10.0) -> None:
        if ratio < 0 or min_per_second < 0 or window <= 0:
            raise ValueError("a retry budget needs ratio >= 0, min_per_second >= 0, window > 0")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self._width = window / _BUCKETS
        # the buckets before the newest, by index % _BUCKETS, and their sums
        self._requests = [0] * _BUCKETS
        self._retries = [0] * _BUCKETS
        self._old_requests = 0
        self._old_retries = 0
        # the newest bucket: its index (in bucket widths since 0), its counts, and when it ends.
        # Plain attributes, because every request counts here: the retry's fused layer does
        # `requests += 1` itself while `now < head_ends` (RetryPolicy.inline)
        self._head: int | None = None
        self.requests = 0
        self.retries = 0
        self.head_ends = float("-inf")

    def _roll(self, now: float) -> None:
        """Make the bucket of `now` the newest, dropping those that left the window."""
        index = int(now // self._width)
        head = self._head
        if head is not None and index <= head:
            return  # (`now` at a bucket's very end, by float rounding)
        if head is not None:
            slot = head % _BUCKETS  # the newest bucket joins the older ones
            self._requests[slot], self._retries[slot] = self.requests, self.retries
            self._old_requests += self.requests
            self._old_retries += self.retries
            for i in range(head + 1, min(index, head + _BUCKETS) + 1):  # slots the new buckets reuse
                slot = i % _BUCKETS
                self._old_requests -= self._requests[slot]
                self._old_retries -= self._retries[slot]
                self._requests[slot] = self._retries[slot] = 0
        self._head = index
        self.requests = self.retries = 0
        self.head_ends = (index + 1) * self._width

    def record_request(self, now: float) -> None:
        if now >= self.head_ends:
            self._roll(now)
        self.requests += 1

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget if there is room; False means: do not retry."""
        requests, retries = self.snapshot(now)
        allowed = self.ratio * requests + self.min_per_second * self.window
        if retries + 1 > allowed:
            return False
        self.retries += 1
        return True

    def snapshot(self, now: float) -> tuple[int, int]:
        """Requests and retries within the window that ends at `now`."""
        if now >= self.head_ends:
            self._roll(now)
        return self._old_requests + self.requests, self._old_retries + self.retries

    def describe(self, now: float) -> dict[str, Any]:
        requests, retries = self.snapshot(now)
        return {"requests": requests, "retries": retries,
                "allowed": self.ratio * requests + self.min_per_second * self.window}
