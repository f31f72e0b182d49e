from email.utils import formatdate

import pytest

from policies.backoff import FullJitterBackoff, parse_retry_after
from policies.errors import CircuitOpen, TimedOut, UpstreamReset, UpstreamUnavailable
from policies.events import RetryAfterTooLong, RetryBudgetExhausted, RetryScheduled
from policies.retry import RetryPolicy
from policies.retry_budget import RetryBudget
from policies.testing import EventLog, FakeClock, ScriptedUpstream, make_ctx


def retry(clock, **kw):
    kw.setdefault("rng", lambda: 0.0)
    return RetryPolicy(clock=clock, **kw)


async def test_gateway_errors_are_retried_until_success_and_dropped_responses_released():
    clock = FakeClock()
    log = EventLog()
    upstream = ScriptedUpstream(clock, 503, 502, 200)
    ctx = make_ctx(bus=log.bus)
    outcome = await retry(clock)(upstream, ctx)
    assert outcome.status == 200
    assert ctx.attempts == 3
    assert upstream.released == [503, 502]
    assert [(e.reason, e.attempt) for e in log.of(RetryScheduled)] == [("gateway-error", 2), ("gateway-error", 3)]


async def test_exhausted_retries_return_the_last_response_unreleased():
    clock = FakeClock()
    upstream = ScriptedUpstream(clock, 503)
    outcome = await retry(clock, attempts=3)(upstream, make_ctx())
    assert outcome.status == 503
    assert upstream.calls == 3
    assert upstream.released == [503, 503]


@pytest.mark.parametrize("error", [UpstreamUnavailable("x"), UpstreamReset("x")])
async def test_exhausted_retries_on_failure_reraise_the_last_error(error):
    clock = FakeClock()
    upstream = ScriptedUpstream(clock, error)
    with pytest.raises(type(error)):
        await retry(clock, attempts=4)(upstream, make_ctx())
    assert upstream.calls == 4


@pytest.mark.parametrize(
    ("on", "step", "calls"),
    [
        (None, 500, 1),  # 500 is not a gateway error
        (["5xx"], 500, 3),
        ([429], 429, 3),
        (None, 429, 1),
        (["gateway-error"], UpstreamUnavailable("x"), 1),
        (["connect-failure"], UpstreamReset("x"), 1),
        (["reset"], UpstreamReset("x"), 3),
        (None, TimedOut("x"), 1),
        (["timeout"], TimedOut("x"), 3),
        (["5xx", "timeout"], CircuitOpen("x"), 1),
    ],
)
async def test_only_listed_conditions_are_retried(on, step, calls):
    clock = FakeClock()
    upstream = ScriptedUpstream(clock, step)
    policy = retry(clock) if on is None else retry(clock, on=on)
    try:
        await policy(upstream, make_ctx())
    except Exception:
        pass
    assert upstream.calls == calls


async def test_non_idempotent_methods_are_not_retried_without_an_idempotency_key():
    clock = FakeClock()
    upstream = ScriptedUpstream(clock, 503)
    await retry(clock)(upstream, make_ctx("POST"))
    assert upstream.calls == 1
    upstream = ScriptedUpstream(clock, 503)
    await retry(clock)(upstream, make_ctx("POST", {"idempotency-key": "k1"}))
    assert upstream.calls == 3


async def test_a_streamed_body_is_not_retried():
    clock = FakeClock()
    upstream = ScriptedUpstream(clock, 503)
    await retry(clock)(upstream, make_ctx(replayable=False))
    assert upstream.calls == 1

    async def streams(ctx):  # the body turned out to be larger than max_body
        ctx.replayable = False
        return await upstream(ctx)

    upstream.calls = 0
    await retry(clock)(streams, make_ctx())
    assert upstream.calls == 1


async def test_full_jitter_backoff_grows_exponentially_up_to_the_cap():
    clock = FakeClock()
    upstream = ScriptedUpstream(clock, 503)
    await retry(clock, attempts=7, rng=lambda: 1.0)(upstream, make_ctx())
    assert clock.sleeps == pytest.approx([0.025, 0.05, 0.1, 0.2, 0.25, 0.25])
    clock = FakeClock()
    await retry(clock, attempts=3, rng=lambda: 0.5)(ScriptedUpstream(clock, 503), make_ctx())
    assert clock.sleeps == pytest.approx([0.0125, 0.025])


def test_backoff_draws_stay_within_zero_and_the_ceiling():
    import random

    backoff = FullJitterBackoff(0.1, 1.0, random.Random(7).random)
    for retry_no in range(1, 20):
        ceiling = min(1.0, 0.1 * 2 ** (retry_no - 1))
        assert all(0 <= backoff.delay(retry_no) <= ceiling for _ in range(50))


async def test_retry_after_seconds_replaces_the_backoff():
    clock = FakeClock()
    upstream = ScriptedUpstream(clock, (503, {"Retry-After": "2"}), 200)
    outcome = await retry(clock)(upstream, make_ctx())
    assert outcome.status == 200
    assert clock.sleeps == [2.0]


async def test_retry_after_http_date_is_honoured():
    clock = FakeClock()
    date = formatdate(clock.wall() + 3, usegmt=True)
    upstream = ScriptedUpstream(clock, (429, {"retry-after": date}), 200)
    await retry(clock, on=[429])(upstream, make_ctx())
    assert clock.sleeps == [pytest.approx(3.0, abs=1.0)]


async def test_retry_after_beyond_max_returns_the_response_at_once():
    clock = FakeClock()
    log = EventLog()
    upstream = ScriptedUpstream(clock, (503, {"Retry-After": "30"}), 200)
    outcome = await retry(clock, retry_after_max=10.0)(upstream, make_ctx(bus=log.bus))
    assert outcome.status == 503
    assert upstream.calls == 1
    assert upstream.released == []
    assert log.of(RetryAfterTooLong) == [RetryAfterTooLong(30.0)]


async def test_retry_after_is_ignored_when_not_honoured():
    clock = FakeClock()
    upstream = ScriptedUpstream(clock, (503, {"Retry-After": "30"}), 200)
    outcome = await retry(clock, honor_retry_after=False)(upstream, make_ctx())
    assert outcome.status == 200
    assert clock.sleeps == []  # the jittered backoff drew 0


def test_parse_retry_after():
    assert parse_retry_after("7", 0.0) == 7.0
    assert parse_retry_after(formatdate(1000.0, usegmt=True), 990.0) == pytest.approx(10.0)
    assert parse_retry_after(formatdate(1000.0, usegmt=True), 2000.0) == 0.0
    assert parse_retry_after("soon", 0.0) is None
    assert parse_retry_after(None, 0.0) is None


async def test_no_retry_past_the_deadline():
    clock = FakeClock()
    upstream = ScriptedUpstream(clock, (503, {"Retry-After": "2"}), 200)
    ctx = make_ctx()
    ctx.deadline = clock.now() + 1.0
    outcome = await retry(clock)(upstream, ctx)
    assert outcome.status == 503
    assert upstream.calls == 1


async def test_budget_keeps_a_failing_upstream_at_about_1_2x_its_load():
    clock = FakeClock()
    log = EventLog()
    policy = retry(clock, attempts=3, budget=RetryBudget(ratio=0.2, min_per_second=0, window=10))
    upstream = ScriptedUpstream(clock, 503)
    for _ in range(1000):  # 100 requests per second for 10 s, every one failing
        await policy(upstream, make_ctx(bus=log.bus))
        clock.advance(0.01)
    assert 1000 < upstream.calls <= 1200
    assert log.of(RetryBudgetExhausted)
    # a healthy upstream never needs the budget
    upstream = ScriptedUpstream(clock, 200)
    for _ in range(100):
        await policy(upstream, make_ctx())
    assert upstream.calls == 100


async def test_budget_floor_lets_a_quiet_route_retry():
    clock = FakeClock()
    policy = retry(clock, attempts=2, budget=RetryBudget(ratio=0.2, min_per_second=1, window=10))
    upstream = ScriptedUpstream(clock, 503)
    for _ in range(5):
        await policy(upstream, make_ctx())
    assert upstream.calls == 10  # 5 retries: below the floor of 1/s over 10 s


def test_budget_forgets_old_traffic():
    budget = RetryBudget(ratio=0.5, min_per_second=0, window=10)
    for _ in range(10):
        budget.record_request(0.0)
    assert sum(budget.try_spend(0.0) for _ in range(10)) == 5
    assert budget.snapshot(5.0) == (10, 5)
    assert budget.snapshot(20.0) == (0, 0)
    assert budget.try_spend(20.0) is False


async def test_single_attempt_is_a_plain_pass_through():
    clock = FakeClock()
    upstream = ScriptedUpstream(clock, 503)
    await retry(clock, attempts=1)(upstream, make_ctx())
    assert upstream.calls == 1
