import pytest

from policies.errors import RateLimited
from policies.events import RateLimitBackendError, RateLimitHit
from policies.rate_limit import RateLimitPolicy, ratelimit_headers
from policies.testing import EventLog, FakeClock, ScriptedUpstream, StalledClock, make_ctx
from policies.token_bucket import Decision, LocalBucketStore, TokenBucket

# -- the bucket ----------------------------------------------------------------


def test_bucket_starts_full_and_refills_at_rate_up_to_burst():
    bucket = TokenBucket(rate=2.0, burst=4.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(5)] == [0.0, 0.0, 0.0, 0.0, -1.0]
    assert bucket.retry_after(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0.0  # one token back after 1/rate
    assert bucket.refill(100.0) == 4.0  # never above burst
    assert bucket.reset_after(100.0) == 0.0


def test_bucket_lends_a_future_token_within_max_wait():
    bucket = TokenBucket(rate=10.0, burst=1.0, now=0.0)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0, max_wait=0.5) == pytest.approx(0.1)
    assert bucket.take(0.0, max_wait=0.5) == pytest.approx(0.2)
    assert bucket.take(0.0, max_wait=0.15) == -1.0  # would wait 0.3
    assert bucket.tokens == pytest.approx(-2.0)


def test_local_store_keeps_at_most_max_keys_least_recently_used_first():
    store = LocalBucketStore(max_keys=2)
    a = store.bucket("a", 1, 1, 0.0)
    store.bucket("b", 1, 1, 0.0)
    store.bucket("a", 1, 1, 0.0)  # a is now the most recent
    store.bucket("c", 1, 1, 0.0)
    assert len(store) == 2
    assert store.peek("a") is a and store.peek("b") is None


async def test_local_store_acquire_answers_a_decision():
    store = LocalBucketStore()
    assert await store.acquire("k", 1.0, 2.0, 0.0) == Decision(True, 0.0, 1, 1.0)
    await store.acquire("k", 1.0, 2.0, 0.0)
    refused = await store.acquire("k", 1.0, 2.0, 0.0)
    assert not refused.allowed and refused.wait == pytest.approx(1.0) and refused.remaining == 0


# -- the policy ----------------------------------------------------------------


async def test_burst_then_refusal_with_what_the_headers_need():
    clock = FakeClock()
    log = EventLog()
    policy = RateLimitPolicy(rate=1.0, burst=5, name="api", clock=clock)
    upstream = ScriptedUpstream(clock)
    for _ in range(5):
        await policy(upstream, make_ctx())
    with pytest.raises(RateLimited) as info:
        await policy(upstream, make_ctx(bus=log.bus))
    err = info.value
    assert upstream.calls == 5
    assert (err.limit, err.remaining, err.policy) == (5, 0, "api")
    assert err.retry_after == pytest.approx(1.0)
    assert err.window == pytest.approx(5.0)
    assert log.of(RateLimitHit) == [RateLimitHit("api", False)]
    clock.advance(0.5)
    with pytest.raises(RateLimited) as info:
        await policy(upstream, make_ctx())
    assert info.value.retry_after == pytest.approx(0.5)
    clock.advance(0.5)
    await policy(upstream, make_ctx())
    assert upstream.calls == 6
    assert clock.sleeps == []  # admitting never waits


def test_default_burst_is_one_second_of_rate():
    assert RateLimitPolicy(rate=50).burst == 50
    assert RateLimitPolicy(rate=0.1).burst == 1


async def test_header_key_gives_each_value_its_own_bucket():
    clock = FakeClock()
    policy = RateLimitPolicy(rate=1, burst=1, key="header:X-Tenant", clock=clock)
    upstream = ScriptedUpstream(clock)
    await policy(upstream, make_ctx(headers={"x-tenant": "a"}))
    await policy(upstream, make_ctx(headers={"x-tenant": "b"}))
    await policy(upstream, make_ctx())  # no header: one shared bucket
    with pytest.raises(RateLimited):
        await policy(upstream, make_ctx(headers={"x-tenant": "a"}))
    with pytest.raises(RateLimited):
        await policy(upstream, make_ctx())


async def test_client_ip_key_and_bounded_memory():
    clock = FakeClock()
    policy = RateLimitPolicy(rate=1, burst=1, key="client_ip", max_keys=100, clock=clock)
    upstream = ScriptedUpstream(clock)
    for i in range(1000):
        await policy(upstream, make_ctx(client_ip=f"10.0.{i // 256}.{i % 256}"))
    assert upstream.calls == 1000
    assert policy.describe()["keys"] == 100
    with pytest.raises(RateLimited):  # a recent client's empty bucket is remembered
        await policy(upstream, make_ctx(client_ip="10.0.3.231"))
    await policy(upstream, make_ctx(client_ip="10.0.0.0"))  # a forgotten one starts afresh


async def test_wait_queues_for_a_token_up_to_the_bound():
    clock = FakeClock()
    policy = RateLimitPolicy(rate=10, burst=1, wait=0.25, clock=clock)
    upstream = ScriptedUpstream(clock)
    await policy(upstream, make_ctx())
    await policy(upstream, make_ctx())
    assert clock.sleeps == [pytest.approx(0.1)]
    # the bucket is now at 0 after the sleep; three callers at once would need 0.1, 0.2, 0.3
    assert policy._route_bucket.take(clock.now(), 0.25) == pytest.approx(0.1)
    assert policy._route_bucket.take(clock.now(), 0.25) == pytest.approx(0.2)
    with pytest.raises(RateLimited):
        await policy(upstream, make_ctx())


async def test_wait_never_passes_the_deadline():
    clock = FakeClock()
    policy = RateLimitPolicy(rate=1, burst=1, wait=5, clock=clock)
    upstream = ScriptedUpstream(clock)
    await policy(upstream, make_ctx())
    ctx = make_ctx()
    ctx.deadline = clock.now() + 0.5
    with pytest.raises(RateLimited):
        await policy(upstream, ctx)
    assert clock.sleeps == []


async def test_shadow_counts_but_lets_everything_through():
    clock = FakeClock()
    log = EventLog()
    policy = RateLimitPolicy(rate=1, burst=2, shadow=True, wait=1, clock=clock)
    upstream = ScriptedUpstream(clock)
    for _ in range(5):
        await policy(upstream, make_ctx(bus=log.bus))
    assert upstream.calls == 5
    assert log.of(RateLimitHit) == [RateLimitHit("rate_limit", True)] * 3
    assert clock.sleeps == []


class BrokenStore:
    async def acquire(self, key, rate, burst, now, max_wait=0.0):
        raise ConnectionError("redis down")


class RecordingStore(LocalBucketStore):
    def __init__(self):
        super().__init__()
        self.keys = []

    async def acquire(self, key, rate, burst, now, max_wait=0.0):
        self.keys.append(key)
        return await super().acquire(key, rate, burst, now, max_wait)


@pytest.mark.parametrize(("mode", "passes"), [("allow", True), ("deny", False)])
async def test_backend_error_follows_on_backend_error(mode, passes):
    clock = FakeClock()
    log = EventLog()
    policy = RateLimitPolicy(rate=1, store=BrokenStore(), on_backend_error=mode, clock=clock)
    upstream = ScriptedUpstream(clock)
    try:
        await policy(upstream, make_ctx(bus=log.bus))
    except RateLimited:
        pass
    assert (upstream.calls == 1) is passes
    assert log.of(RateLimitBackendError) == [RateLimitBackendError("rate_limit")]


async def test_a_shared_store_gets_scoped_keys_and_enforces():
    clock = FakeClock()
    store = RecordingStore()
    policy = RateLimitPolicy(rate=1, burst=1, key="header:x-user", store=store, scope="orders.rate_limit",
                             clock=clock)
    upstream = ScriptedUpstream(clock)
    await policy(upstream, make_ctx(headers={"x-user": "u1"}))
    with pytest.raises(RateLimited) as info:
        await policy(upstream, make_ctx(headers={"x-user": "u1"}))
    assert store.keys == ["orders.rate_limit:u1"] * 2
    assert info.value.retry_after == pytest.approx(1.0)


def test_ratelimit_header_fields():
    err = RateLimited(retry_after=0.3, limit=100, remaining=0, reset=0.3, window=10.0, policy="api")
    assert ratelimit_headers(err) == {
        "RateLimit-Policy": '"api";q=100;w=10',
        "RateLimit": '"api";r=0;t=1',
    }


def test_rejects_a_bad_key():
    with pytest.raises(ValueError):
        RateLimitPolicy(rate=1, key="cookie")


async def test_a_waiter_that_gives_up_returns_its_reserved_token():
    import asyncio

    clock = StalledClock()  # the waiter never wakes: it is cancelled instead
    policy = RateLimitPolicy(1.0, 1.0, wait=5.0, clock=clock)
    upstream = ScriptedUpstream(clock, 200)
    await policy(upstream, make_ctx())  # takes the only token
    waiter = asyncio.ensure_future(policy(upstream, make_ctx()))  # reserves the next one
    await asyncio.sleep(0)
    assert policy.describe()["tokens"] < 0
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert policy.describe()["tokens"] == 0.0  # the next caller waits one second, not two
