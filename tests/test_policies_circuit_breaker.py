import asyncio

import pytest

from policies.base import Outcome
from policies.breaker_state import BreakerState, BreakerStateMachine, CountWindow, TimeWindow
from policies.circuit_breaker import CircuitBreakerPolicy, expand_statuses
from policies.errors import BulkheadFull, CircuitOpen, TimedOut, UpstreamReset, UpstreamUnavailable
from policies.events import BreakerRejected, BreakerTransitioned
from policies.testing import EventLog, FakeClock, ScriptedUpstream, make_ctx

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def fail(machine, now=0.0, n=1, duration=0.0):
    for _ in range(n):
        assert machine.try_acquire(now)
        machine.on_error(duration, now)


def succeed(machine, now=0.0, n=1, duration=0.0):
    for _ in range(n):
        assert machine.try_acquire(now)
        machine.on_success(duration, now)


# -- the state machine ---------------------------------------------------------


def test_consecutive_failures_trip_and_a_success_resets_the_streak():
    m = BreakerStateMachine(consecutive_failures=3, open_for=30)
    fail(m, n=2)
    succeed(m)
    fail(m, n=2)
    assert m.state is CLOSED
    fail(m)
    assert m.state is OPEN
    assert not m.try_acquire(29.9)
    assert m.remaining_open(10.0) == pytest.approx(20.0)


def test_half_open_probe_success_closes():
    m = BreakerStateMachine(consecutive_failures=1, open_for=30)
    fail(m)
    assert m.try_acquire(30.0)
    assert m.state is HALF_OPEN
    assert not m.try_acquire(30.0)  # only one probe at a time by default
    m.on_success(0.0, 30.0)
    assert m.state is CLOSED
    assert m.try_acquire(30.0)


def test_open_for_doubles_on_each_failed_probe_up_to_max_and_resets_on_close():
    m = BreakerStateMachine(consecutive_failures=1, open_for=10, max_open_for=35)
    fail(m, now=0.0)
    now, seen = 0.0, []
    for _ in range(4):
        now = m.open_until
        assert m.try_acquire(now)
        m.on_error(0.0, now)
        seen.append(m.open_until - now)
    assert seen == [20, 35, 35, 35]
    now = m.open_until
    succeed(m, now)
    assert m.state is CLOSED
    fail(m, now)
    assert m.open_until - now == 10


def test_half_open_calls_needs_that_many_successes():
    m = BreakerStateMachine(consecutive_failures=1, open_for=5, half_open_calls=3)
    fail(m)
    assert [m.try_acquire(5.0) for _ in range(4)] == [True, True, True, False]
    m.on_success(0.0, 5.0)
    m.on_success(0.0, 5.0)
    assert m.state is HALF_OPEN
    m.on_success(0.0, 5.0)
    assert m.state is CLOSED


def test_results_of_calls_admitted_before_a_transition_are_ignored():
    m = BreakerStateMachine(consecutive_failures=1, open_for=5)
    assert m.try_acquire(0.0)
    old = m.generation
    fail(m)  # another call trips the breaker
    m.on_success(0.0, 6.0, old)  # the old call's late success must not close it
    assert m.state is OPEN
    assert m.try_acquire(6.0) and m.state is HALF_OPEN
    m.on_error(0.0, 6.0, old)  # nor may its late failure fail the probe
    assert m.state is HALF_OPEN


def test_failure_rate_over_a_count_window_waits_for_min_calls():
    m = BreakerStateMachine(consecutive_failures=None, failure_rate=0.5, window=CountWindow(10), min_calls=6)
    fail(m, n=5)
    assert m.state is CLOSED  # 5 calls < min_calls
    succeed(m)
    assert m.state is OPEN  # 5 of 6 failed


def test_count_window_forgets_the_oldest_calls():
    m = BreakerStateMachine(consecutive_failures=None, failure_rate=0.5, window=CountWindow(4), min_calls=4)
    fail(m)
    succeed(m, n=3)  # 1 of 4
    fail(m)  # window: s s s f -> 1 of 4 (the first failure slid out)
    assert m.state is CLOSED
    assert m.window.failures == 1 and m.window.calls == 4
    fail(m)  # s s f f -> 2 of 4 = 50%
    assert m.state is OPEN


def test_min_calls_larger_than_a_count_window_is_capped_to_it():
    m = BreakerStateMachine(consecutive_failures=None, failure_rate=1.0, window=CountWindow(3), min_calls=20)
    fail(m, n=3)
    assert m.state is OPEN


def test_time_window_drops_failures_older_than_the_window():
    m = BreakerStateMachine(consecutive_failures=None, failure_rate=0.5, window=TimeWindow(10), min_calls=4)
    fail(m, now=0.0, n=3)
    succeed(m, now=5.0, n=1)
    assert m.state is OPEN  # 3 of 4
    m.reset(5.0)
    fail(m, now=0.0 + 20, n=3)
    succeed(m, now=31.0, n=3)  # the failures at t=20 left the window at t=30
    assert m.state is CLOSED
    assert (m.window.calls, m.window.failures) == (3, 0)


def test_slow_call_rate_trips_even_when_every_call_succeeds():
    m = BreakerStateMachine(
        consecutive_failures=None, failure_rate=0.5, window=CountWindow(10), min_calls=4,
        slow_call_duration=1.0, slow_call_rate=0.75,
    )
    succeed(m, n=2, duration=2.0)
    succeed(m, n=1, duration=0.1)
    succeed(m, n=1, duration=1.5)
    assert m.state is OPEN  # 3 of 4 slow = 75%, no failure at all


def test_slow_call_rate_threshold():
    m = BreakerStateMachine(
        consecutive_failures=None, failure_rate=1.0, window=CountWindow(10), min_calls=4,
        slow_call_duration=1.0, slow_call_rate=0.75,
    )
    succeed(m, n=2, duration=2.0)
    succeed(m, n=2, duration=0.1)
    assert m.state is CLOSED  # 2 of 4 slow
    succeed(m, n=2, duration=2.0)
    assert m.state is CLOSED  # 4 of 6
    succeed(m, n=2, duration=2.0)
    assert m.state is OPEN  # 6 of 8 = 75%


def test_reset_forces_closed():
    m = BreakerStateMachine(consecutive_failures=1, open_for=30)
    fail(m)
    m.reset(1.0)
    assert m.state is CLOSED and m.try_acquire(1.0)


# -- the policy ----------------------------------------------------------------


def breaker(clock, **kw):
    statuses = kw.pop("failure_statuses", ("5xx",))
    return CircuitBreakerPolicy(
        BreakerStateMachine(**kw), failure_statuses=statuses, name="b", clock=clock
    )


async def test_open_breaker_rejects_without_calling_the_upstream():
    clock = FakeClock()
    log = EventLog()
    policy = breaker(clock, consecutive_failures=2, open_for=30)
    upstream = ScriptedUpstream(clock, 500)
    for _ in range(2):
        assert (await policy(upstream, make_ctx(bus=log.bus))).status == 500
    clock.advance(10)
    with pytest.raises(CircuitOpen) as info:
        await policy(upstream, make_ctx(bus=log.bus))
    assert upstream.calls == 2
    assert info.value.retry_after == pytest.approx(20.0)
    assert log.of(BreakerRejected) == [BreakerRejected("b")]
    assert [(e.from_state, e.to_state) for e in log.of(BreakerTransitioned)] == [("closed", "open")]


async def test_probe_after_open_for_closes_on_success_with_events():
    clock = FakeClock()
    log = EventLog()
    policy = breaker(clock, consecutive_failures=1, open_for=5)
    await policy(ScriptedUpstream(clock, 503), make_ctx(bus=log.bus))
    clock.advance(5)
    assert (await policy(ScriptedUpstream(clock, 200), make_ctx(bus=log.bus))).status == 200
    assert [(e.from_state, e.to_state) for e in log.of(BreakerTransitioned)] == [
        ("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert policy.describe()["state"] == "closed"


@pytest.mark.parametrize(
    ("statuses", "step", "counts"),
    [
        (("5xx",), 500, True),
        (("5xx",), 404, False),
        (("5xx",), 429, False),
        ((503,), 500, False),
        ((503, "4xx"), 429, True),
        (("5xx",), UpstreamUnavailable("x"), True),
        (("5xx",), UpstreamReset("x"), True),
        ((503,), TimedOut("x"), True),
        (("5xx",), BulkheadFull("x"), False),
    ],
)
async def test_what_counts_as_a_failure(statuses, step, counts):
    clock = FakeClock()
    policy = breaker(clock, consecutive_failures=1, failure_statuses=statuses)
    try:
        await policy(ScriptedUpstream(clock, step), make_ctx())
    except Exception:
        pass
    assert (policy.state is OPEN) is counts


async def test_cancelled_probe_gives_its_permit_back():
    clock = FakeClock()
    policy = breaker(clock, consecutive_failures=1, open_for=5)
    await policy(ScriptedUpstream(clock, 503), make_ctx())
    clock.advance(5)
    gate = asyncio.Event()

    async def hang(ctx):
        await gate.wait()

    task = asyncio.create_task(policy(hang, make_ctx()))
    await asyncio.sleep(0)
    assert policy.state is HALF_OPEN
    with pytest.raises(CircuitOpen):  # the probe is out
        await policy(hang, make_ctx())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await policy(ScriptedUpstream(clock, 200), make_ctx())).status == 200
    assert policy.state is CLOSED


async def test_reset_closes_an_open_breaker():
    clock = FakeClock()
    policy = breaker(clock, consecutive_failures=1)
    await policy(ScriptedUpstream(clock, 503), make_ctx())
    assert policy.describe()["state"] == "open"
    policy.reset()
    assert (await policy(ScriptedUpstream(clock, 200), make_ctx())).status == 200


def test_expand_statuses():
    assert expand_statuses([503, "429"]) == {503, 429}
    assert len(expand_statuses(["5xx"])) == 100
    with pytest.raises(ValueError):
        expand_statuses(["bad"])


async def test_a_timeout_outside_the_breaker_counts_as_a_failure():
    from policies.base import compose
    from policies.testing import Hang
    from policies.timeout import TimeoutPolicy

    clock = FakeClock()
    policy = breaker(clock, consecutive_failures=2)
    chain = compose([TimeoutPolicy(1.0, clock=clock), policy], ScriptedUpstream(clock, Hang(5)))
    for _ in range(2):
        with pytest.raises(TimedOut):
            await chain(make_ctx())
    assert policy.state is OPEN


async def test_one_trip_is_one_transition_however_many_calls_were_in_flight():
    clock = FakeClock()
    log = EventLog()
    policy = breaker(clock, consecutive_failures=1, open_for=30)
    release = asyncio.Event()

    async def slow_500(ctx):
        await release.wait()
        return Outcome(500, {})

    calls = [asyncio.ensure_future(policy(slow_500, make_ctx(bus=log.bus))) for _ in range(5)]
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(*calls)
    transitions = [e for e in log.events if isinstance(e, BreakerTransitioned)]
    assert [(t.from_state, t.to_state) for t in transitions] == [("closed", "open")]
