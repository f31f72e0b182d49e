"""RedisBucketStore: token buckets shared by every replica, kept in Redis.

One hash per bucket (`<key_prefix><scope>:<key>`, fields `t` tokens and `s`
stamp) changed by one Lua script, so a take is atomic however many replicas
ask at once. The script reads the time with `TIME` on the Redis server, so the
replicas' clocks never enter the arithmetic. A key expires once its bucket
would be full again (an absent key is a full bucket), so idle keys cost nothing.
A request that booked a future token (`wait`) and went away before using it hands
the token back with a second script, never past `burst`, as the local buckets do.

When Redis does not answer, `acquire` raises `BucketStoreError` and the policy's
`on_backend_error` decides. The store must not make a request slow while Redis is
down: sockets time out quickly, redis-py does not retry, and after a failure a
small circuit answers at once for `retry_interval` seconds without touching
Redis, then lets one probe through. redis-py reconnects on that probe, so the
shared limit comes back by itself when Redis does. The warning log is limited to
one line per `log_interval`; each refused acquire is also an event for metrics.

redis-py is imported only when a store is built from a URL: nothing else in
`policies/` needs it installed.

Acquires made in the same event-loop iteration (requests arriving together) go to
Redis as one pipeline: one round trip and one parse for the batch, which halves
the CPU each request spends on Redis under load.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from policies.clock import SYSTEM_CLOCK, Clock
from policies.token_bucket import BucketStoreError, Decision

__all__ = ["RedisBucketStore", "TOKEN_BUCKET_LUA", "GIVE_BACK_LUA", "DEFAULT_KEY_PREFIX", "url_problem"]

log = logging.getLogger("fender.rate_limit")

DEFAULT_KEY_PREFIX = "fender:rl:"
MAX_KEY_LENGTH = 200  # longer client keys (header values) are hashed

# Both scripts: KEYS[1] bucket, ARGV[1] rate, ARGV[2] burst; `tokens` refilled to the
# server's `now` (an absent key is a full bucket); `save()` stores them until full again.
_REFILL_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 't', 's')
local tokens = tonumber(state[1])
local stamp = tonumber(state[2])
if tokens == nil or stamp == nil then
  tokens = burst
  stamp = now
elseif now > stamp then
  tokens = math.min(burst, tokens + (now - stamp) * rate)
  stamp = now
end
local function save()
  redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 's', string.format('%.6f', stamp))
  redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
end
"""

# ARGV[3] max_wait. Returns {allowed 0|1, wait, remaining whole tokens, seconds until full};
# floats as strings because Redis truncates Lua numbers to integers in replies.
TOKEN_BUCKET_LUA = _REFILL_LUA + """
local max_wait = tonumber(ARGV[3])
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
  if wait <= max_wait then
    tokens = tokens - 1
    allowed = 1
  end
end
local reset = (burst - tokens) / rate
if allowed == 1 then save() end
local remaining = 0
if tokens > 0 then remaining = math.floor(tokens) end
return {allowed, string.format('%.6f', wait), remaining, string.format('%.6f', reset)}
"""

# One booked token back, never past burst (a full or absent bucket is left alone).
GIVE_BACK_LUA = _REFILL_LUA + """
if tokens < burst then
  tokens = math.min(burst, tokens + 1)
  save()
end
return 0
"""


def url_problem(url: str) -> str | None:
    """Why `RedisBucketStore.from_url` cannot use `url`, or None (checked early by config.settings).

    redis-py parses it as it will at start, without connecting.
    """
    try:
        from redis.connection import parse_url
    except ImportError:
        return "redis-py is not installed: pip install 'fender[redis]'"
    try:
        parse_url(url)  # type: ignore[no-untyped-call]
        return None
    except Exception as exc:  # ValueError mostly: a scheme, port or query value redis-py refuses
        problem = str(exc).rstrip(".")
    from config.redact import mask_url_password

    problem = mask_url_password(problem, url)  # (never the password, nor a piece of it a parser quoted)
    return f"{problem}: use redis://[:password@]host:port/db, rediss://... or unix:///path"


_Pending = tuple[str, float, float, float, "asyncio.Future[Any]"]


class RedisBucketStore:
    """A `BucketStore` on redis-py asyncio. Build it with `from_url`; `stop()` closes it."""

    __slots__ = (
        "client", "key_prefix", "retry_interval", "log_interval", "clock", "_script", "_give_back", "_no_script",
        "_pending", "_sending", "_open_until", "_probing", "_errors", "_last_log", "_unavailable",
    )

    def __init__(
        self,
        client: Any,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        retry_interval: float = 1.0,
        log_interval: float = 10.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """`client` is a `redis.asyncio.Redis` (anything with `register_script` and `aclose`)."""
        self.client = client
        self.key_prefix = key_prefix
        self.retry_interval = retry_interval
        self.log_interval = log_interval
        self.clock = clock
        from redis.exceptions import NoScriptError

        self._script = client.register_script(TOKEN_BUCKET_LUA)
        self._give_back = client.register_script(GIVE_BACK_LUA)
        self._no_script = NoScriptError
        self._pending: list[_Pending] = []  # acquires of this loop iteration, sent together
        self._sending: set[asyncio.Task[None]] = set()
        self._open_until = 0.0  # > 0: the circuit is open (Redis failed) until then
        self._probing = False
        self._errors = 0  # failures not logged yet
        self._last_log = float("-inf")
        self._unavailable = BucketStoreError("redis rate limit backend unavailable (retrying shortly)")

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = 0.25,
        retry_interval: float = 1.0,
        log_interval: float = 10.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> RedisBucketStore:
        """`redis://[:password@]host:port/db` (or `rediss://`, `unix://`).

        Fender's own query parameter `key_prefix` (default `fender:rl:`) is taken out;
        redis-py's (`socket_timeout`, ...) win over the short defaults set here.
        """
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefix = next((v for k, v in query if k == "key_prefix"), DEFAULT_KEY_PREFIX)
        rest = urlencode([(k, v) for k, v in query if k != "key_prefix"])
        client = Redis.from_url(
            urlunsplit(parts._replace(query=rest)),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # one try: on_backend_error answers, the circuit waits
            health_check_interval=0,
        )
        return cls(client, key_prefix=prefix, retry_interval=retry_interval, log_interval=log_interval, clock=clock)

    @property
    def available(self) -> bool:
        """False while the circuit is open after a failure."""
        return self._open_until == 0.0

    def redis_key(self, key: str) -> str:
        if len(key) > MAX_KEY_LENGTH:
            scope, _, rest = key.partition(":")
            key = f"{scope}:#{hashlib.sha256(rest.encode()).hexdigest()}"
        return self.key_prefix + key

    async def acquire(
        self, key: str, rate: float, burst: float, now: float, max_wait: float = 0.0
    ) -> Decision:
        """`now` (the replica's clock) is ignored: the Redis server's time counts."""
        if self._open_until:
            if self._probing or self.clock.now() < self._open_until:
                self._failed(None)
                # one error for every request while the circuit is open: a raise adds its frames to
                # the traceback it already has, so without the last one it would hold the frames
                # (and the request contexts) of every request refused since Redis went away
                raise self._unavailable.with_traceback(None)
            self._probing = True  # this request probes; the others keep failing fast meanwhile
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        pending = self._pending
        pending.append((self.redis_key(key), rate, burst, max_wait, future))
        if len(pending) == 1:
            loop.call_soon(self._flush)  # after every request that runs in this loop iteration
        try:
            allowed, wait, remaining, reset = await future
            decision = Decision(allowed == 1, float(wait), int(remaining), float(reset))
        except Exception as exc:  # connection refused, timeout, READONLY, bad reply: all mean "no answer"
            self._failed(exc)
            raise BucketStoreError(f"redis rate limit backend: {exc!r}") from exc
        finally:
            self._probing = False
        if self._open_until:
            self._recovered()
        return decision

    def give_back(self, key: str, rate: float, burst: float) -> None:
        """Return a booked token its waiter never used. Sent in the background: it never waits or raises."""
        if self._open_until:
            return  # Redis is failing: the booking is lost, and the circuit keeps us off Redis
        task = asyncio.ensure_future(self._send_give_back(self.redis_key(key), rate, burst))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send_give_back(self, key: str, rate: float, burst: float) -> None:
        try:
            await self._give_back(keys=[key], args=[rate, burst])
        except Exception as exc:  # the token stays booked; acquires will report the outage
            log.debug("redis rate limit backend: give-back failed (%r)", exc)

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        """One round trip for a whole batch: a single EVALSHA, or a pipeline of them."""
        try:
            replies = await self._eval(batch)
            if any(isinstance(r, self._no_script) for r in replies):  # Redis restarted or flushed its scripts
                self._script.sha = await self.client.script_load(TOKEN_BUCKET_LUA)
                replies = await self._eval(batch)
        except Exception as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (*_, future), reply in zip(batch, replies, strict=True):
            if not future.done():
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    async def _eval(self, batch: list[_Pending]) -> list[Any]:
        sha = self._script.sha
        if len(batch) == 1:
            key, rate, burst, max_wait, _ = batch[0]
            try:
                return [await self.client.evalsha(sha, 1, key, rate, burst, max_wait)]
            except self._no_script as exc:
                return [exc]
        pipe = self.client.pipeline(transaction=False)
        for key, rate, burst, max_wait, _ in batch:
            pipe.evalsha(sha, 1, key, rate, burst, max_wait)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    def _failed(self, exc: BaseException | None) -> None:
        now = self.clock.now()
        if exc is not None:
            self._open_until = now + self.retry_interval
        self._errors += 1
        if now - self._last_log >= self.log_interval:
            log.warning(
                "redis rate limit backend unavailable: %d request(s) decided by on_backend_error since the last"
                " report; next try in %.1fs%s",
                self._errors, max(0.0, self._open_until - now), f" ({exc!r})" if exc is not None else "",
            )
            self._last_log = now
            self._errors = 0

    def _recovered(self) -> None:
        self._open_until = 0.0
        log.warning(
            "redis rate limit backend reachable again; shared limits apply (%d more request(s) were decided by"
            " on_backend_error)", self._errors,
        )
        self._errors = 0
        self._last_log = float("-inf")

    async def start(self) -> None:
        """Nothing to do: the first acquire connects (a service hook for the app)."""

    async def stop(self) -> None:
        for task in list(self._sending):
            task.cancel()
        await asyncio.gather(*self._sending, return_exceptions=True)
        await self.client.aclose()
