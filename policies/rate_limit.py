"""RateLimitPolicy: a token bucket per key, in front of the call.

Keys: `route` (one bucket for this policy instance: per route when inline,
shared by every route that names it), `header:<name>` (one per header value;
requests without the header share one bucket) and `client_ip`. `wait` lets a
request take a token that is not there yet and wait for it, up to that long
and never past `ctx.deadline`. `shadow` counts and reports rejections but lets
every request through. Refusals raise `RateLimited` with what the IETF RateLimit
header fields need (`ratelimit_headers`, draft-ietf-httpapi-ratelimit-headers-10).
"""

from __future__ import annotations

import math
from asyncio import Task
from typing import Any, Literal, NoReturn

from policies.base import Call, Outcome, RequestContext
from policies.clock import SYSTEM_CLOCK, Clock
from policies.errors import RateLimited
from policies.events import RateLimitBackendError, RateLimitHit
from policies.guard import DEFER, Inline
from policies.token_bucket import BucketStore, Decision, LocalBucketStore, TokenBucket

__all__ = ["RateLimitPolicy", "ratelimit_headers", "RATELIMIT_DRAFT"]

RATELIMIT_DRAFT = "draft-ietf-httpapi-ratelimit-headers-10"


class RateLimitPolicy:
    __slots__ = ("name", "rate", "burst", "key", "wait", "shadow", "on_backend_error", "clock",
                 "_header", "_local", "_store", "_route_bucket", "_hit", "_shadow_hit",
                 "_backend_error", "_prefix", "_immediate", "defers")

    kind = "rate_limit"
    needs_task = False
    settles = False
    resumes = False
    recovers = False

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        key: str = "route",
        wait: float = 0.0,
        shadow: bool = False,
        store: BucketStore | None = None,
        on_backend_error: Literal["allow", "deny"] = "allow",
        max_keys: int = 10_000,
        name: str = "rate_limit",
        scope: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """`scope` names the buckets in a shared store (defaults to `name`); it must be unique per policy."""
        if rate <= 0:
            raise ValueError("rate must be greater than zero")
        self.name = name
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        if key != "route" and key != "client_ip" and not key.startswith("header:"):
            raise ValueError("key is 'route', 'client_ip' or 'header:<name>'")
        self.key = key
        self._header = key[len("header:"):].lower() if key.startswith("header:") else None
        self.wait = wait
        self.shadow = shadow
        self.on_backend_error = on_backend_error
        self.clock = clock
        # a store given explicitly is a shared backend; None means buckets in this process
        self._store = store
        self._local = LocalBucketStore(max_keys) if store is None else None
        self._route_bucket = (
            TokenBucket(self.rate, self.burst, clock.now()) if store is None and key == "route" else None
        )
        self._prefix = f"{scope or name}:"
        self._hit = RateLimitHit(name, False)
        self._shadow_hit = RateLimitHit(name, True)
        self._backend_error = RateLimitBackendError(name)
        # a bucket in this process, and no waiting for a token: decided without an await
        self._immediate = store is None and (wait <= 0 or shadow)
        self.defers = not self._immediate

    def _key_of(self, ctx: RequestContext) -> str:
        if self._header is not None:
            return ctx.headers.get(self._header) or ""
        if self.key == "client_ip":
            return ctx.client_ip or ""
        return ""

    # -- as a guard (policies.guard): a local bucket answers at once, unless the request may wait

    def enter(self, ctx: RequestContext, now: float, task: Task[Any] | None) -> object:
        if not self._immediate:
            return DEFER  # waiting for a token, or asking the shared store, is the async path's
        bucket = self._route_bucket
        if bucket is None:
            assert self._local is not None
            bucket = self._local.bucket(self._key_of(ctx), self.rate, self.burst, now)
        if bucket.take(now) < 0.0:
            self._refused(ctx, bucket, now)
        return None

    def inline(self) -> Inline:
        """`enter` with the route's one bucket: `TokenBucket.take` when a token is there after the refill."""
        bucket = self._route_bucket
        if not self._immediate or bucket is None:
            return Inline()
        names = {"bucket": bucket, "refused": self._refused, "rate": bucket.rate, "burst": bucket.burst}
        return Inline(names=names, enter="""
            tokens = bucket.tokens + (now - bucket.stamp) * rate
            if tokens > burst:
                tokens = burst
            if tokens >= 1.0 and now >= bucket.stamp:
                bucket.tokens = tokens - 1.0
                bucket.stamp = now
            elif bucket.take(now) < 0.0:
                refused(ctx, bucket, now)
            """)

    def exit(self, ctx: RequestContext, token: object, started: float, outcome: Outcome) -> Outcome:
        return outcome

    def exit_error(self, ctx: RequestContext, token: object, started: float, error: BaseException) -> NoReturn:
        try:
            raise error
        finally:
            del error  # (the traceback holds this frame: see Guard.exit_error)

    def _refused(self, ctx: RequestContext, bucket: TokenBucket, now: float) -> None:
        """No token: raises RateLimited, or in shadow mode reports and lets the request through."""
        if self.shadow:
            ctx.emit(self._shadow_hit)
            return
        ctx.emit(self._hit)
        retry_after = bucket.retry_after(now)
        raise self._refusal(retry_after, max(0, int(bucket.tokens)))

    async def __call__(self, call: Call, ctx: RequestContext) -> Outcome:
        now = self.clock.now()
        if self._immediate:
            self.enter(ctx, now, None)
            return await call(ctx)
        max_wait = 0.0
        if self.wait > 0 and not self.shadow:
            max_wait = self.wait
            if ctx.deadline is not None and ctx.deadline - now < max_wait:
                max_wait = max(0.0, ctx.deadline - now)
        if self._local is None:
            return await self._remote(call, ctx, now, max_wait)
        bucket = self._route_bucket
        if bucket is None:
            bucket = self._local.bucket(self._key_of(ctx), self.rate, self.burst, now)
        wait = bucket.take(now, max_wait)
        if wait == 0.0:  # the common case: no await before the call
            return await call(ctx)
        if wait > 0.0:
            try:
                await self.clock.sleep(wait)
            except BaseException:
                bucket.give_back()  # the token reserved for this request was never used
                raise
            return await call(ctx)
        self._refused(ctx, bucket, now)
        return await call(ctx)

    async def _remote(self, call: Call, ctx: RequestContext, now: float, max_wait: float) -> Outcome:
        store = self._store
        assert store is not None
        key = self._prefix + self._key_of(ctx)
        try:
            decision: Decision = await store.acquire(key, self.rate, self.burst, now, max_wait)
        except Exception:  # any backend failure: the configured side wins, the request is not lost
            ctx.emit(self._backend_error)
            if self.on_backend_error == "allow" or self.shadow:
                return await call(ctx)
            raise self._refusal(1.0 / self.rate, 0) from None
        if decision.allowed:
            if decision.wait > 0:
                try:
                    await self.clock.sleep(decision.wait)
                except BaseException:
                    store.give_back(key, self.rate, self.burst)  # as the local path: the booking was never used
                    raise
            return await call(ctx)
        if self.shadow:
            ctx.emit(self._shadow_hit)
            return await call(ctx)
        ctx.emit(self._hit)
        raise self._refusal(decision.wait, decision.remaining)

    def _refusal(self, retry_after: float, remaining: int) -> RateLimited:
        return RateLimited(
            f"rate limit {self.name} exceeded",
            retry_after=retry_after,
            limit=int(self.burst),
            remaining=remaining,
            reset=retry_after,
            window=self.burst / self.rate,
            policy=self.name,
        )

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "kind": self.kind, "name": self.name, "rate": self.rate, "burst": self.burst,
            "key": self.key, "shadow": self.shadow,
            "backend": "local" if self._local is not None else "remote",
        }
        if self._route_bucket is not None:
            info["tokens"] = round(self._route_bucket.refill(self.clock.now()), 3)
        elif self._local is not None:
            info["keys"] = len(self._local)
        return info


def ratelimit_headers(error: RateLimited) -> dict[str, str]:
    """The `RateLimit-Policy` and `RateLimit` fields of draft-ietf-httpapi-ratelimit-headers-10.

    Quota `q` is the burst, window `w` the seconds a full burst takes to refill,
    `r` the whole tokens left and `t` the seconds until the next one.
    """
    policy = error.policy.replace("\\", "").replace('"', "") or "default"
    window = max(1, math.ceil(error.window))
    reset = max(0, math.ceil(error.reset))
    return {
        "RateLimit-Policy": f'"{policy}";q={error.limit};w={window}',
        "RateLimit": f'"{policy}";r={error.remaining};t={reset}',
    }
