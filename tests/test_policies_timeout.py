import asyncio

import pytest

from policies.base import compose
from policies.clock import SYSTEM_CLOCK
from policies.errors import TimedOut
from policies.events import TimeoutFired
from policies.retry import RetryPolicy
from policies.testing import EventLog, FakeClock, Hang, ScriptedUpstream, make_ctx
from policies.timeout import TimeoutPolicy


async def test_slow_call_is_cancelled_at_the_budget_and_reported():
    clock = FakeClock()
    log = EventLog()
    upstream = ScriptedUpstream(clock, Hang(5))
    start = clock.now()
    with pytest.raises(TimedOut):
        await TimeoutPolicy(1.0, clock=clock)(upstream, make_ctx(bus=log.bus))
    assert clock.now() - start == pytest.approx(1.0)
    assert log.of(TimeoutFired) == [TimeoutFired(budget=1.0)]


async def test_fast_call_passes_and_deadline_is_set_only_during_the_call():
    clock = FakeClock()
    seen = []

    async def inner(ctx):
        seen.append(ctx.deadline)
        return await ScriptedUpstream(clock, Hang(0.2))(ctx)

    ctx = make_ctx()
    outcome = await TimeoutPolicy(1.0, clock=clock)(inner, ctx)
    assert outcome.status == 200
    assert seen == [pytest.approx(clock.now() - 0.2 + 1.0)]
    assert ctx.deadline is None


async def test_inner_timeout_never_widens_the_outer_deadline():
    clock = FakeClock()
    seen = []

    async def probe(ctx):
        seen.append(ctx.deadline)
        from policies.base import Outcome
        return Outcome(200, {})

    start = clock.now()
    await compose([TimeoutPolicy(1.0, clock=clock), TimeoutPolicy(5.0, clock=clock)], probe)(make_ctx())
    await compose([TimeoutPolicy(5.0, clock=clock), TimeoutPolicy(1.0, clock=clock)], probe)(make_ctx())
    assert seen == [start + 1.0, start + 1.0]


async def test_outer_timeout_fires_through_a_longer_inner_one():
    clock = FakeClock()
    log = EventLog()
    chain = compose([TimeoutPolicy(1.0, clock=clock), TimeoutPolicy(5.0, clock=clock)],
                    ScriptedUpstream(clock, Hang(10)))
    with pytest.raises(TimedOut):
        await chain(make_ctx(bus=log.bus))
    assert [e.budget for e in log.of(TimeoutFired)] == [1.0]


async def test_per_attempt_timeout_inside_retry_lets_the_retry_succeed():
    clock = FakeClock()
    upstream = ScriptedUpstream(clock, Hang(5), Hang(5), Hang(0.1))
    chain = compose(
        [TimeoutPolicy(10.0, clock=clock),
         RetryPolicy(attempts=3, on=["timeout"], clock=clock, rng=lambda: 0.0),
         TimeoutPolicy(1.0, clock=clock)],
        upstream,
    )
    ctx = make_ctx()
    outcome = await chain(ctx)
    assert outcome.status == 200
    assert ctx.attempts == 3


async def test_total_timeout_inside_retry_position_ends_the_request_instead():
    # the same policies in the other order: the 1s budget covers the whole request
    clock = FakeClock()
    upstream = ScriptedUpstream(clock, Hang(5), Hang(5), Hang(0.1))
    chain = compose(
        [TimeoutPolicy(1.0, clock=clock),
         RetryPolicy(attempts=3, on=["timeout"], clock=clock, rng=lambda: 0.0),
         TimeoutPolicy(10.0, clock=clock)],
        upstream,
    )
    ctx = make_ctx()
    with pytest.raises(TimedOut):
        await chain(ctx)
    assert ctx.attempts == 1


async def test_total_timeout_stops_backoff_that_would_pass_the_deadline():
    clock = FakeClock()
    upstream = ScriptedUpstream(clock, 503)
    retry = RetryPolicy(attempts=5, clock=clock, rng=lambda: 1.0)
    retry.backoff.base = retry.backoff.max = 0.4
    chain = compose([TimeoutPolicy(1.0, clock=clock), retry], upstream)
    outcome = await chain(make_ctx())
    # sleeps of 0.4 at t=0 and 0.4 at t=0.4; a third would end at 1.2 > 1.0
    assert outcome.status == 503
    assert upstream.calls == 3
    assert clock.sleeps == [0.4, 0.4]


async def test_works_on_the_real_clock():
    async def hang(ctx):
        await asyncio.sleep(5)

    with pytest.raises(TimedOut):
        await TimeoutPolicy(0.01, clock=SYSTEM_CLOCK)(hang, make_ctx())


def test_rejects_non_positive_budget():
    with pytest.raises(ValueError):
        TimeoutPolicy(0)


async def test_one_timer_serves_many_calls_and_only_slow_ones_time_out():
    clock = FakeClock()
    policy = TimeoutPolicy(1.0, clock=clock)
    results = {}

    async def run(i):
        try:
            await policy(ScriptedUpstream(clock, Hang(0.5 if i % 3 else 2.0)), make_ctx())
            results[i] = "ok"
        except TimedOut:
            results[i] = "timeout"

    # concurrent calls that entered at different times
    tasks = []
    for i in range(9):
        tasks.append(asyncio.create_task(run(i)))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert results == {i: ("ok" if i % 3 else "timeout") for i in range(9)}
    assert len(policy._deadlines) == 0


async def test_a_cancellation_from_outside_is_not_a_timeout():
    policy = TimeoutPolicy(10.0, clock=SYSTEM_CLOCK)

    async def hang(ctx):
        await asyncio.sleep(5)

    task = asyncio.create_task(policy(hang, make_ctx()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_real_clock_fires_after_a_quiet_period_and_after_fast_calls():
    from policies.base import Outcome

    policy = TimeoutPolicy(0.05, clock=SYSTEM_CLOCK)

    async def fast(ctx):
        return Outcome(200, {})

    async def hang(ctx):
        await asyncio.sleep(5)

    for _ in range(100):
        await policy(fast, make_ctx())
    loop = asyncio.get_running_loop()
    for _ in range(2):  # the timer armed by the fast calls must still catch a later slow one
        start = loop.time()
        with pytest.raises(TimedOut):
            await policy(hang, make_ctx())
        assert 0.04 <= loop.time() - start < 1.0


def test_a_policy_kept_across_event_loops_still_fires():
    policy = TimeoutPolicy(0.02, clock=SYSTEM_CLOCK)

    async def hang(ctx):
        await asyncio.sleep(5)

    async def fast(ctx):
        from policies.base import Outcome
        return Outcome(200, {})

    async def quick():  # leaves the policy's timer pending on a loop that then closes
        await policy(fast, make_ctx())

    async def slow():
        with pytest.raises(TimedOut):
            await asyncio.wait_for(policy(hang, make_ctx()), 2)

    asyncio.run(quick())
    asyncio.run(slow())
