"""`rate_limit.backend: redis`: buckets shared across replicas, Redis failures, recovery.

Needs the real Redis on 127.0.0.1:6379 (skipped locally without it, a failure under
FENDER_REQUIRE_SERVICES=1); the failure tests run a private `redis-server` on a
free port so they can kill it. Every test uses its own key prefix.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.procs import free_port
from policies.rate_limit import RateLimitPolicy
from policies.redis_bucket import RedisBucketStore
from policies.testing import FakeClock, ScriptedUpstream, StalledClock, make_ctx
from policies.token_bucket import BucketStoreError
from tests.conftest import REQUIRE_SERVICES, require_service
from tests.support.processes import FenderProcess, Upstream

SHARED = "redis://127.0.0.1:6379/0"


@pytest.fixture
def prefix() -> Iterator[str]:
    name = f"fender-test:{uuid.uuid4().hex[:10]}:"
    yield name
    import redis

    client = redis.Redis.from_url(SHARED)
    try:
        keys = list(client.scan_iter(match=name + "*"))
        if keys:
            client.delete(*keys)
    except redis.RedisError:
        pass
    finally:
        client.close()


@pytest.fixture
def shared_redis() -> str:
    require_service("redis", "127.0.0.1", 6379)
    return SHARED


class PrivateRedis:
    """A throwaway redis-server on a free port that a test may kill and start again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if REQUIRE_SERVICES:
                pytest.fail("redis-server is not installed and FENDER_REQUIRE_SERVICES=1")
            pytest.skip("redis-server is not installed")
        self.proc = subprocess.Popen(
            [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        import socket

        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise TimeoutError("private redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.kill()


# -- the store against the shared Redis ---------------------------------------------------


async def test_two_stores_share_one_bucket_whatever_their_clocks(shared_redis: str, prefix: str) -> None:
    one = RedisBucketStore.from_url(f"{shared_redis}?key_prefix={prefix}")
    two = RedisBucketStore.from_url(f"{shared_redis}?key_prefix={prefix}")
    try:
        # replicas whose clocks disagree by hours: only Redis' TIME counts
        results = await asyncio.gather(
            *(one.acquire("route.rl:", 1.0, 5, now=0.0) for _ in range(10)),
            *(two.acquire("route.rl:", 1.0, 5, now=86_400.0) for _ in range(10)),
        )
        assert sum(d.allowed for d in results) == 5
        refused = [d for d in results if not d.allowed]
        assert all(0.0 < d.wait <= 1.0 for d in refused)  # Retry-After: about one token at 1/s
        ttl = await one.client.pttl(prefix + "route.rl:")
        assert 0 < ttl <= 6_000  # gone once the bucket would be full again (5 tokens at 1/s, + 1s)
    finally:
        await one.stop()
        await two.stop()


async def test_wait_takes_a_future_token_and_refusal_leaves_the_bucket_alone(shared_redis: str, prefix: str) -> None:
    store = RedisBucketStore.from_url(f"{shared_redis}?key_prefix={prefix}")
    try:
        first = await store.acquire("w:", 10.0, 1, 0.0, max_wait=0.5)
        second = await store.acquire("w:", 10.0, 1, 0.0, max_wait=0.5)
        assert first.allowed and first.wait == 0.0
        assert second.allowed and 0.05 < second.wait <= 0.1  # queued for the next token
        third = await store.acquire("w:", 10.0, 1, 0.0)  # no waiting allowed: refused
        assert not third.allowed and third.remaining == 0
        long_key = "w:" + "x" * 1000  # client-chosen header values are hashed, not stored verbatim
        assert (await store.acquire(long_key, 10.0, 1, 0.0)).allowed
        assert len(store.redis_key(long_key)) < 120
    finally:
        await store.stop()


async def _stored_tokens(store: RedisBucketStore, key: str, expected: float) -> float:
    """The bucket's stored balance once it reaches `expected` (give-backs land in the background)."""
    deadline = time.monotonic() + 2
    while True:
        tokens = float(await store.client.hget(store.redis_key(key), "t"))
        if tokens >= expected - 0.2 or time.monotonic() > deadline:
            return tokens
        await asyncio.sleep(0.01)


async def test_waiters_that_go_away_give_their_booked_tokens_back(shared_redis: str, prefix: str) -> None:
    clock = FakeClock()
    store = RedisBucketStore.from_url(f"{shared_redis}?key_prefix={prefix}")
    policy = RateLimitPolicy(1.0, 1.0, wait=5.0, store=store, scope="wr", clock=clock)
    upstream = ScriptedUpstream(clock)
    try:
        await policy(upstream, make_ctx())  # takes the only token
        for _ in range(4):  # each books the next token, and its client goes away after 0.2s
            with pytest.raises(TimeoutError):
                async with clock.timeout(0.2):
                    await policy(upstream, make_ctx())
        assert upstream.calls == 1
        # the four bookings are back: the next request waits about a second, not five
        assert -0.2 < await _stored_tokens(store, "wr:", 0.0) <= 0.2
        nxt = await store.acquire("wr:", 1.0, 1.0, 0.0, max_wait=5.0)
        assert nxt.allowed and nxt.wait <= 1.0
    finally:
        await store.stop()


async def test_a_give_back_never_fills_past_burst_nor_creates_a_bucket(shared_redis: str, prefix: str) -> None:
    store = RedisBucketStore.from_url(f"{shared_redis}?key_prefix={prefix}")
    try:
        store.give_back("absent:", 1.0, 3.0)
        assert (await store.acquire("b:", 1.0, 3.0, 0.0)).remaining == 2
        for _ in range(3):
            store.give_back("b:", 1.0, 3.0)
        assert await _stored_tokens(store, "b:", 3.0) == 3.0
        assert await store.client.exists(store.redis_key("absent:")) == 0
    finally:
        await store.stop()


# -- failures and recovery ------------------------------------------------------------------


async def test_store_fails_fast_while_redis_is_down_and_recovers(
    private_redis: PrivateRedis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    store = RedisBucketStore.from_url(f"{private_redis.url}?key_prefix={prefix}", retry_interval=1.0, clock=clock)
    try:
        assert (await store.acquire("k:", 100.0, 10, 0.0)).allowed
        private_redis.kill()
        caplog.set_level(logging.WARNING, "fender.rate_limit")
        started = time.perf_counter()
        for _ in range(200):
            with pytest.raises(BucketStoreError):
                await store.acquire("k:", 100.0, 10, 0.0)
        assert time.perf_counter() - started < 1.0  # the circuit answers without trying Redis each time
        assert not store.available
        assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1  # not one per request

        private_redis.start()
        with pytest.raises(BucketStoreError):  # still inside retry_interval: not tried yet
            await store.acquire("k:", 100.0, 10, 0.0)
        clock.advance(1.1)
        assert (await store.acquire("k:", 100.0, 10, 0.0)).allowed  # the probe reconnects
        assert store.available
        assert any("reachable again" in r.getMessage() for r in caplog.records)
    finally:
        await store.stop()


async def test_failing_fast_keeps_no_traceback_of_the_requests_before() -> None:
    # (no Redis needed: a free port refuses, and the circuit opens)
    store = RedisBucketStore.from_url(f"redis://127.0.0.1:{free_port()}", clock=FakeClock())
    try:
        for _ in range(50):
            with pytest.raises(BucketStoreError):
                await store.acquire("k:", 100.0, 10, 0.0)
        assert not store.available
        frames, tb = 0, store._unavailable.__traceback__
        while tb is not None:
            frames, tb = frames + 1, tb.tb_next
        assert frames <= 3  # the last refusal's, not two for each of the 49 before it
    finally:
        await store.stop()


async def test_a_give_back_while_redis_is_down_does_not_raise(private_redis: PrivateRedis, prefix: str) -> None:
    clock = StalledClock()
    store = RedisBucketStore.from_url(f"{private_redis.url}?key_prefix={prefix}", clock=clock)
    policy = RateLimitPolicy(1.0, 1.0, wait=5.0, store=store, clock=clock)
    upstream = ScriptedUpstream(clock)
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    try:
        await policy(upstream, make_ctx())
        waiter = asyncio.ensure_future(policy(upstream, make_ctx()))
        while not clock.sleeps:  # booked, and waiting
            await asyncio.sleep(0.01)
        private_redis.kill()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):  # the cancellation, not a Redis error
            await waiter
        await asyncio.sleep(0.3)  # the give-back fails in the background, quietly
        assert unhandled == []
    finally:
        await store.stop()
        loop.set_exception_handler(None)


ALLOW_DENY = """
version: 1
routes:
  - name: allow
    match: {{host: allow}}
    upstream: {up}
    chain:
      - rate_limit: {{rate: 1/s, burst: 2, backend: redis, on_backend_error: allow}}
  - name: deny
    match: {{host: deny}}
    upstream: {up}
    chain:
      - rate_limit: {{rate: 1/s, burst: 2, backend: redis, on_backend_error: deny}}
"""


async def _statuses(http: aiohttp.ClientSession, url: str, host: str, n: int) -> list[int]:
    out = []
    for _ in range(n):
        async with http.get(url + "/x", headers={"Host": host}) as resp:
            await resp.read()
            out.append(resp.status)
    return out


async def test_fender_follows_on_backend_error_and_resumes_limits(
    private_redis: PrivateRedis, prefix: str, start_fender: Any, aiohttp_server: Any, http: aiohttp.ClientSession
) -> None:
    from aiohttp import web

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    upstream_app = web.Application()
    upstream_app.router.add_get("/x", ok)
    upstream = await aiohttp_server(upstream_app)
    fender = await start_fender(
        ALLOW_DENY.format(up=str(upstream.make_url("")).rstrip("/")),
        redis_url=f"{private_redis.url}?key_prefix={prefix}",
        assemble=True,  # with telemetry: the backend errors are counted
    )
    # Redis up: the shared limit holds (burst 2, then 429)
    assert await _statuses(http, fender.proxy_url, "allow", 4) == [200, 200, 429, 429]
    assert await _statuses(http, fender.proxy_url, "deny", 4) == [200, 200, 429, 429]

    private_redis.kill()
    started = time.perf_counter()
    assert await _statuses(http, fender.proxy_url, "allow", 10) == [200] * 10  # fail open
    denied = await _statuses(http, fender.proxy_url, "deny", 10)
    assert denied == [429] * 10  # fail closed
    assert time.perf_counter() - started < 2.0  # a dead Redis does not make each request slow
    async with http.get(fender.metrics_url + "/metrics") as resp:
        metrics = await resp.text()
    for route in ("allow", "deny"):
        assert f'fender_rate_limit_backend_errors_total{{policy="rate_limit",route="{route}"}} 10.0' in metrics

    private_redis.start()  # empty: the buckets start full again
    await asyncio.sleep(1.1)  # past the store's retry interval (wall time: a real process)
    deadline = time.monotonic() + 5
    while True:
        got = await _statuses(http, fender.proxy_url, "allow", 4)
        if got == [200, 200, 429, 429] or time.monotonic() > deadline:
            break
        await asyncio.sleep(1.0)  # the probe may have landed on an old bucket; let it refill
    assert got == [200, 200, 429, 429]  # limited again without a restart


# -- two replicas ---------------------------------------------------------------------------

SHARED_LIMIT = """
version: 1
routes:
  - name: api
    match: {{host: api}}
    upstream: {up}
    chain:
      - rate_limit: {{rate: {rate}/s, burst: {burst}, backend: redis}}
"""


def test_two_fender_processes_share_one_limit(shared_redis: str, prefix: str, tmp_path: Path) -> None:
    rate, burst, seconds = 40, 5, 2.5
    upstream = Upstream()
    path = tmp_path / "fender.yaml"
    path.write_text(SHARED_LIMIT.format(up=upstream.url, rate=rate, burst=burst))
    env = {"FENDER_REDIS_URL": f"{shared_redis}?key_prefix={prefix}"}
    replicas = [FenderProcess(path, tmp_path / f"data{i}", **env) for i in range(2)]
    try:
        counts, elapsed = asyncio.run(_hammer([r.proxy for r in replicas], seconds))
    finally:
        for replica in replicas:
            replica.stop()
        upstream.stop()
    admitted = sum(c[200] for c in counts)
    expected = burst + rate * elapsed
    assert all(c[200] > rate * elapsed * 0.2 for c in counts), counts  # both replicas admitted some
    assert all(c[429] > 0 for c in counts), counts  # and both were limited
    assert abs(admitted - expected) <= 0.1 * expected, (admitted, expected, counts)  # N/s together, not 2N


async def _hammer(proxies: list[str], seconds: float) -> tuple[list[dict[int, int]], float]:
    counts: list[dict[int, int]] = [{200: 0, 429: 0} for _ in proxies]
    async with aiohttp.ClientSession() as http:
        started = time.monotonic()
        stop_at = started + seconds

        async def worker(index: int) -> None:
            while time.monotonic() < stop_at:
                async with http.get(proxies[index] + "/echo", headers={"Host": "api"}) as resp:
                    await resp.read()
                    counts[index][resp.status] = counts[index].get(resp.status, 0) + 1

        await asyncio.gather(*(worker(i % len(proxies)) for i in range(8)))
        elapsed = time.monotonic() - started
    return counts, elapsed
