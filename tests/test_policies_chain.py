"""Order matters: the same policies composed differently behave as the README says."""

import pytest

from policies.base import compose
from policies.breaker_state import BreakerStateMachine
from policies.circuit_breaker import CircuitBreakerPolicy
from policies.errors import CircuitOpen, RateLimited
from policies.fallback import FallbackPolicy
from policies.rate_limit import RateLimitPolicy
from policies.retry import RetryPolicy
from policies.testing import FakeClock, ScriptedUpstream, make_ctx


def parts(clock):
    breaker = CircuitBreakerPolicy(BreakerStateMachine(consecutive_failures=3, open_for=30), clock=clock)
    retry = RetryPolicy(attempts=3, clock=clock, rng=lambda: 0.0)
    return breaker, retry


async def test_breaker_inside_retry_counts_every_attempt():
    clock = FakeClock()
    breaker, retry = parts(clock)
    upstream = ScriptedUpstream(clock, 503)
    chain = compose([retry, breaker], upstream)
    assert (await chain(make_ctx())).status == 503  # its three attempts trip the breaker
    with pytest.raises(CircuitOpen):  # the next request does not reach the upstream
        await chain(make_ctx())
    assert upstream.calls == 3


async def test_breaker_outside_retry_lets_retries_hammer_the_upstream():
    clock = FakeClock()
    breaker, retry = parts(clock)
    upstream = ScriptedUpstream(clock, 503)
    chain = compose([breaker, retry], upstream)
    for _ in range(3):
        assert (await chain(make_ctx())).status == 503
    assert upstream.calls == 9  # three requests of three attempts before it trips
    with pytest.raises(CircuitOpen):
        await chain(make_ctx())


async def test_rate_limit_inside_retry_spends_a_token_per_attempt():
    clock = FakeClock()
    upstream = ScriptedUpstream(clock, 503, 503, 200)
    limit = RateLimitPolicy(rate=1, burst=2, clock=clock)
    retry = RetryPolicy(attempts=3, clock=clock, rng=lambda: 0.0)
    with pytest.raises(RateLimited):  # the third attempt finds no token and is not retried
        await compose([retry, limit], upstream)(make_ctx())
    upstream = ScriptedUpstream(clock, 503, 503, 200)
    limit = RateLimitPolicy(rate=1, burst=2, clock=clock)
    assert (await compose([limit, retry], upstream)(make_ctx())).status == 200


async def test_fallback_outside_the_breaker_answers_while_it_is_open():
    clock = FakeClock()
    breaker, _ = parts(clock)
    fallback = FallbackPolicy(on=["circuit_open"], status=200, body="cached")
    upstream = ScriptedUpstream(clock, 503)
    chain = compose([fallback, breaker], upstream)
    statuses = [(await chain(make_ctx())).status for _ in range(5)]
    assert statuses == [503, 503, 503, 200, 200]
    assert upstream.calls == 3
