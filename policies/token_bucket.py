"""The token bucket (pure arithmetic) and the store interface that keeps buckets by key.

A bucket holds up to `burst` tokens and refills at `rate` per second. A call
takes one token; with `max_wait > 0` it may take a token that is not there yet
(the balance goes negative) and wait until it would have been, which is how
`rate_limit.wait` queues without a queue.

`BucketStore` is what a shared backend (Redis) implements; `LocalBucketStore`
keeps buckets in process, with a bounded number of keys.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

__all__ = ["TokenBucket", "Decision", "BucketStore", "BucketStoreError", "LocalBucketStore"]


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("a token bucket needs rate > 0 and burst > 0")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def refill(self, now: float) -> float:
        if now > self.stamp:
            tokens = self.tokens + (now - self.stamp) * self.rate
            self.tokens = tokens if tokens < self.burst else self.burst
            self.stamp = now
        return self.tokens

    def take(self, now: float, max_wait: float = 0.0) -> float:
        """Take one token. Returns the wait before using it (0.0: now), or -1.0 if refused."""
        # (RateLimitPolicy.inline has the case of a token there after the refill: keep the two alike)
        tokens = self.tokens
        if now > self.stamp:  # refill(now), inline: this runs on every request
            tokens += (now - self.stamp) * self.rate
            if tokens > self.burst:
                tokens = self.burst
            self.tokens = tokens
            self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        wait = (1.0 - tokens) / self.rate
        if wait <= max_wait:
            self.tokens = tokens - 1.0
            return wait
        return -1.0

    def give_back(self) -> None:
        self.tokens = min(self.burst, self.tokens + 1.0)

    def retry_after(self, now: float) -> float:
        """Seconds until a token is free."""
        tokens = self.refill(now)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def reset_after(self, now: float) -> float:
        """Seconds until the bucket is full again."""
        tokens = self.refill(now)
        return max(0.0, (self.burst - tokens) / self.rate)


@dataclass(frozen=True, slots=True)
class Decision:
    """What a store answers for one acquire."""

    allowed: bool
    wait: float  # allowed: seconds to wait before going ahead; refused: seconds until a token is free
    remaining: int  # whole tokens left after this call
    reset: float  # seconds until the bucket is full again


class BucketStoreError(Exception):
    """The store could not answer (e.g. Redis unreachable); `on_backend_error` decides."""


class BucketStore(Protocol):
    async def acquire(
        self, key: str, rate: float, burst: float, now: float, max_wait: float = 0.0
    ) -> Decision: ...

    def give_back(self, key: str, rate: float, burst: float) -> None:
        """Return a token `acquire` booked for a wait that ended unused (never above burst, never raises)."""


class LocalBucketStore:
    """Buckets in this process, at most `max_keys` of them (least recently used go first).

    Forgetting a bucket only hands its key a fresh burst, so the bound costs
    little accuracy and keeps memory flat whatever clients send.
    """

    __slots__ = ("max_keys", "_buckets")

    def __init__(self, max_keys: int = 10_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def bucket(self, key: str, rate: float, burst: float, now: float) -> TokenBucket:
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.max_keys:
                buckets.popitem(last=False)
            bucket = buckets[key] = TokenBucket(rate, burst, now)
        else:
            buckets.move_to_end(key)
        return bucket

    def peek(self, key: str) -> TokenBucket | None:
        return self._buckets.get(key)

    async def acquire(
        self, key: str, rate: float, burst: float, now: float, max_wait: float = 0.0
    ) -> Decision:
        bucket = self.bucket(key, rate, burst, now)
        wait = bucket.take(now, max_wait)
        if wait < 0:
            return Decision(False, bucket.retry_after(now), max(0, int(bucket.tokens)), bucket.reset_after(now))
        return Decision(True, wait, max(0, int(bucket.tokens)), bucket.reset_after(now))

    def give_back(self, key: str, rate: float, burst: float) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.give_back()
