"""A fused chain (policies.fused) behaves exactly like the same policies as nested layers.

Each case runs the same requests through two copies of one chain, each with its
own FakeClock: once composed (stretches of guards fused into one layer) and once
as plain nested `partial` layers. Everything observable must agree: outcomes,
errors, events in order, attempts, released responses, the clock, ctx.deadline.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import policies.fused
from policies.base import Call, Outcome, Policy, RequestContext, compose
from policies.breaker_state import BreakerStateMachine
from policies.bulkhead import BulkheadPolicy
from policies.circuit_breaker import CircuitBreakerPolicy
from policies.errors import FenderError, TimedOut, UpstreamReset, UpstreamUnavailable
from policies.events import TimeoutFired
from policies.fallback import FallbackPolicy
from policies.fused import FusedLayer, fused_layer
from policies.guard import DEFER
from policies.rate_limit import RateLimitPolicy
from policies.retry import RetryPolicy
from policies.testing import EventLog, FakeClock, Hang, ScriptedUpstream, make_ctx
from policies.timeout import TimeoutPolicy

Maker = Callable[[FakeClock], Policy]
MAX_GENERATED_DEFAULT = policies.fused.MAX_GENERATED

MAKERS: dict[str, Maker] = {
    "timeout-1s": lambda clock: TimeoutPolicy(1.0, clock=clock),
    "timeout-3s": lambda clock: TimeoutPolicy(3.0, clock=clock),
    "retry": lambda clock: RetryPolicy(attempts=3, on=["connect-failure", "reset", "timeout", "5xx"],
                                       clock=clock, rng=lambda: 0.5),
    "retry-429": lambda clock: RetryPolicy(attempts=2, on=[429], clock=clock, rng=lambda: 0.0),
    "breaker": lambda clock: CircuitBreakerPolicy(
        BreakerStateMachine(consecutive_failures=2, open_for=2.0), clock=clock),
    "rate_limit": lambda clock: RateLimitPolicy(rate=2, burst=3, clock=clock),
    "rate_limit-wait": lambda clock: RateLimitPolicy(rate=2, burst=1, wait=0.6, clock=clock),
    "rate_limit-shadow": lambda clock: RateLimitPolicy(rate=1, burst=1, shadow=True, clock=clock),
    "bulkhead": lambda clock: BulkheadPolicy(1, clock=clock),
    "fallback": lambda clock: FallbackPolicy(on=["circuit_open", "timeout", "5xx"], body="cached"),
    "fallback-limits": lambda clock: FallbackPolicy(on=["rate_limited", "upstream_reset"], status=203),
}

STEPS: list[object] = [
    200, 204, 503, 500, (429, {"retry-after": "1"}), (503, {"retry-after": "99"}),
    UpstreamUnavailable("refused"), UpstreamReset("reset"), Hang(0.5), Hang(2.0), Hang(5.0, 503),
]


def nested(policies: list[Policy], terminal: Call) -> Call:
    """The chain as it was before fusing: one coroutine layer per policy."""
    call = terminal
    for policy in reversed(policies):
        call = partial(policy, call)
    return call


async def play(names: list[str], script: list[object], requests: list[tuple[str, float]], fuse: bool) -> list[Any]:
    """What a client and the upstream see of the chain: outcomes, errors, events, attempts, time."""
    clock = FakeClock()
    log = EventLog()
    upstream = ScriptedUpstream(clock, *script)
    policies = [MAKERS[name](clock) for name in names]
    chain = compose(policies, upstream) if fuse else nested(policies, upstream)
    seen: list[Any] = []
    for method, pause in requests:
        clock.advance(pause)
        ctx = make_ctx(method, bus=log.bus)
        try:
            outcome = await chain(ctx)
            result: Any = ("outcome", outcome.status, outcome.body)
        except FenderError as exc:
            result = ("error", type(exc).__name__, exc.message, exc.retry_after)
        seen.append((result, ctx.attempts, ctx.deadline, clock.now(), len(log.events)))
    seen.append((log.events, upstream.calls, upstream.released, clock.sleeps))
    seen.append([getattr(p, "describe", lambda: None)() for p in policies])
    return seen


def run_both(names: list[str], script: list[object], requests: list[tuple[str, float]]) -> None:
    """Fused layers, generated and looping, against nested ones."""
    unfused = asyncio.run(play(names, script, requests, fuse=False))
    assert asyncio.run(play(names, script, requests, fuse=True)) == unfused
    generated = policies.fused.MAX_GENERATED
    policies.fused.MAX_GENERATED = 0  # every stretch takes the loop instead
    try:
        assert asyncio.run(play(names, script, requests, fuse=True)) == unfused
    finally:
        policies.fused.MAX_GENERATED = generated


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    names=st.lists(st.sampled_from(sorted(MAKERS)), min_size=1, max_size=6),
    script=st.lists(st.sampled_from(range(len(STEPS))), min_size=1, max_size=8),
    requests=st.lists(
        st.tuples(st.sampled_from(["GET", "POST"]), st.sampled_from([0.0, 0.1, 1.0, 3.0])),
        min_size=1, max_size=6,
    ),
)
def test_fused_chain_matches_nested_layers(names: list[str], script: list[int],
                                           requests: list[tuple[str, float]]) -> None:
    run_both(names, [STEPS[i] for i in script], requests)


FULL = ["rate_limit", "timeout-3s", "retry", "breaker", "timeout-1s"]


@pytest.mark.parametrize("script", [
    [200], [503], [503, 503, 200], [UpstreamUnavailable("x")], [UpstreamReset("x"), 200],
    [Hang(2.0)], [Hang(0.5), 200], [Hang(5.0)], [(429, {"retry-after": "1"})],
])
def test_the_full_chain_matches_nested_layers(script: list[object]) -> None:
    # five requests in a row: enough to trip the breaker, empty the bucket, then recover
    run_both(FULL, script, [("GET", 0.0)] * 5 + [("GET", 3.0)] * 2)


def test_the_full_chain_is_one_layer() -> None:
    clock = FakeClock()
    chain = compose([MAKERS[name](clock) for name in FULL], ScriptedUpstream(clock))
    layer = fused_layer(chain)
    assert layer is not None and len(layer.guards) == 5
    # unrolled: one block per guard whose exits do something (all but the rate limit's)
    assert "for " not in layer.source and layer.source.count("try:") == 4


def test_guards_on_different_clocks_are_not_fused() -> None:
    a, b = FakeClock(), FakeClock()
    chain = compose([TimeoutPolicy(1.0, clock=a), TimeoutPolicy(1.0, clock=b)], ScriptedUpstream(a))
    assert fused_layer(chain) is None
    fallback = FallbackPolicy()  # asks no clock: fuses with either
    chain = compose([fallback, TimeoutPolicy(1.0, clock=a), TimeoutPolicy(1.0, clock=b)], ScriptedUpstream(a))
    layer = fused_layer(chain)
    assert layer is not None and len(layer.guards) == 2


async def test_a_deferring_guard_runs_its_own_layer_around_the_rest() -> None:
    clock = FakeClock()
    limit = RateLimitPolicy(rate=1, burst=1, wait=2.0, clock=clock)
    assert limit.enter(make_ctx(), clock.now(), None) is DEFER
    upstream = ScriptedUpstream(clock, 200)
    chain = compose([TimeoutPolicy(5.0, clock=clock), limit, TimeoutPolicy(1.0, clock=clock)], upstream)
    ctx = make_ctx()
    assert (await chain(ctx)).status == 200
    assert (await chain(ctx)).status == 200  # waited a second for the token, inside the 5s budget
    assert clock.sleeps == [pytest.approx(1.0)]
    assert ctx.deadline is None


async def test_a_failing_subscriber_unwinds_like_nested_layers() -> None:
    for fuse in (True, False):
        clock = FakeClock()
        log = EventLog()

        def boom(event: object, ctx: RequestContext) -> None:
            raise RuntimeError(type(event).__name__)

        log.bus.subscribe(boom)
        breaker = CircuitBreakerPolicy(BreakerStateMachine(consecutive_failures=1), clock=clock)
        timeout = TimeoutPolicy(1.0, clock=clock)
        policies: list[Policy] = [timeout, breaker]
        upstream = ScriptedUpstream(clock, 503)
        chain = compose(policies, upstream) if fuse else nested(policies, upstream)
        ctx = make_ctx(bus=log.bus)
        with pytest.raises(RuntimeError, match="BreakerTransitioned"):
            await chain(ctx)
        assert ctx.deadline is None and len(timeout._deadlines) == 0
        assert breaker.state.value == "open"


async def test_fused_layer_needs_an_inner_call_per_guard() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError):
        FusedLayer([TimeoutPolicy(1.0, clock=clock)], [])


async def test_a_stretch_as_long_as_may_be_generated_runs() -> None:
    clock = FakeClock()
    bulkheads = [BulkheadPolicy(1, clock=clock) for _ in range(policies.fused.MAX_GENERATED + 1)]
    for count in (policies.fused.MAX_GENERATED, policies.fused.MAX_GENERATED + 1):
        upstream = ScriptedUpstream(clock, 200)
        chain = compose(bulkheads[:count], upstream)
        layer = fused_layer(chain)
        assert layer is not None and len(layer.guards) == count
        assert bool(layer.source) == (count <= policies.fused.MAX_GENERATED)
        assert (await chain(make_ctx())).status == 200
        assert all(bulkhead.in_flight == 0 for bulkhead in bulkheads)




async def test_a_task_given_with_the_request_is_the_one_a_timeout_cancels() -> None:
    clock = FakeClock()
    chain = compose([TimeoutPolicy(3.0, clock=clock), TimeoutPolicy(1.0, clock=clock)],
                    ScriptedUpstream(clock, Hang(2.0)))
    ctx = RequestContext("r", "GET", {}, task=asyncio.current_task())
    with pytest.raises(TimedOut):
        await chain(ctx)
    assert clock.now() == pytest.approx(1001.0)


# A timeout with a shorter one further in is entered without a timer of its own (policies.guard:
# Coverable); what it wraps and the shorter one does not (a retry's next attempts, a deferring
# guard's wait) must still be cut off at its deadline, as nested layers would.

@pytest.mark.parametrize("names", [
    ["timeout-3s", "retry", "timeout-1s"],  # the retry's next attempts await through `within`
    ["timeout-3s", "retry", "timeout-1s", "timeout-1s"],
    ["timeout-3s", "fallback-limits", "retry", "timeout-1s"],  # a retry further in: not covered
    ["rate_limit", "timeout-3s", "retry", "fallback-limits", "timeout-1s"],
])
def test_a_covered_timeout_still_cuts_off_the_retries_inside_it(names: list[str]) -> None:
    script: list[object] = [Hang(2.0)]
    run_both(names, script, [("GET", 0.0)])
    seen = asyncio.run(play(names, script, [("GET", 0.0)], fuse=True))
    (result, attempts, deadline, now, _), (events, *_) = seen[0], seen[1]
    # three attempts: cut at 1s, at about 2s, and by the 3s budget during the third
    assert result[:2] == ("error", "TimedOut") and attempts == 3 and deadline is None
    assert now == pytest.approx(1003.0) and events[-1] == TimeoutFired(budget=3.0)


class Pause:
    """A guard that always defers, and waits a second in its own layer (what rate limits and
    bulkheads do when they must wait, except that they also mind the deadline themselves)."""

    kind = "pause"
    needs_task = False
    settles = True
    defers = True
    resumes = False
    recovers = False

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def enter(self, ctx: RequestContext, now: float, task: object) -> object:
        return DEFER

    def exit(self, ctx: RequestContext, token: object, started: float, outcome: Outcome) -> Outcome:
        return outcome

    def exit_error(self, ctx: RequestContext, token: object, started: float, error: BaseException) -> Outcome:
        raise error

    async def __call__(self, call: Call, ctx: RequestContext) -> Outcome:
        await self.clock.sleep(1.0)
        return await call(ctx)


async def test_a_covered_timeout_still_cuts_off_a_deferring_guards_wait() -> None:
    clock = FakeClock()
    chain = compose([TimeoutPolicy(0.5, clock=clock), Pause(clock), TimeoutPolicy(0.1, clock=clock)],
                    ScriptedUpstream(clock, 200))
    layer = fused_layer(chain)
    assert layer is not None and len(layer.guards) == 3 and "within_0" in layer.source
    with pytest.raises(TimedOut, match="500ms"):
        await chain(make_ctx())
    assert clock.now() == pytest.approx(1000.5)


@pytest.mark.parametrize("fuse", [True, False])
async def test_calls_that_left_do_not_pile_up_in_a_timeouts_queue(fuse: bool) -> None:
    clock = FakeClock()
    policies: list[Policy] = [TimeoutPolicy(3.0, clock=clock), MAKERS["retry"](clock), TimeoutPolicy(1.0, clock=clock)]
    upstream = ScriptedUpstream(clock, *[200] * 50)
    chain = compose(policies, upstream) if fuse else nested(policies, upstream)
    for _ in range(50):
        assert (await chain(make_ctx())).status == 200
        clock.advance(0.01)
    # each call drops the entries of those that left before it (memory stays flat under load)
    queue = policies[2]._deadlines  # type: ignore[attr-defined]
    assert len(queue._entries) == 1 and len(queue) == 0


def test_a_fallback_between_two_timeouts_keeps_the_outer_ones_timer() -> None:
    # were the loop late past both deadlines, the fallback would answer for the inner timeout
    # where the outer one, as a layer of its own, fails the call
    clock = FakeClock()
    chain = compose([TimeoutPolicy(3.0, clock=clock), FallbackPolicy(on=["timeout"]), TimeoutPolicy(1.0, clock=clock)],
                    ScriptedUpstream(clock))
    layer = fused_layer(chain)
    assert layer is not None and "within" not in layer.source and "queue_0._arm" in layer.source


class SlowToUnwind:
    """An upstream that takes 5 s to finish once cancelled (an await in its clean-up)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    async def __call__(self, ctx: RequestContext) -> Outcome:
        try:
            await self.clock.sleep(10)
        except asyncio.CancelledError:
            await self.clock.sleep(5)
            raise
        return Outcome(200, {})


async def test_a_covered_timeout_reports_itself_when_its_time_ran_out_too() -> None:
    clock = FakeClock()
    log = EventLog()
    chain = compose([TimeoutPolicy(3.0, clock=clock), MAKERS["retry"](clock), TimeoutPolicy(1.0, clock=clock)],
                    SlowToUnwind(clock))
    with pytest.raises(TimedOut, match="3s"):  # not the 1s attempt timeout's error
        await chain(make_ctx(bus=log.bus))
    # (as nested layers would, except that the 3 s timer would have cut the clean-up short)
    assert log.events[-1] == TimeoutFired(budget=3.0) and clock.now() == pytest.approx(1006.0)


async def test_numbers_that_repr_does_not_spell_as_literals_still_work() -> None:
    clock = FakeClock()
    chain = compose([RateLimitPolicy(10, float("inf"), clock=clock), TimeoutPolicy(float("inf"), clock=clock),
                     TimeoutPolicy(1.0, clock=clock)], ScriptedUpstream(clock, 200))
    assert fused_layer(chain) is not None
    assert (await chain(make_ctx())).status == 200


@pytest.mark.parametrize("generated", [MAX_GENERATED_DEFAULT, 0])
def test_a_dropped_chain_is_freed_without_the_cycle_collector(generated: int) -> None:
    # Fender freezes what it built at start-up out of the collector's reach (proxy.cli): the
    # chains it built then must be freed by reference counting when a reload drops them
    clock = FakeClock()

    async def terminal(ctx: RequestContext) -> Outcome:
        return Outcome(200, {})

    alive = weakref.ref(terminal)
    policies.fused.MAX_GENERATED = generated
    try:
        chain = compose([MAKERS[name](clock) for name in FULL], terminal)
    finally:
        policies.fused.MAX_GENERATED = MAX_GENERATED_DEFAULT
    layer = fused_layer(chain)
    assert layer is not None and bool(layer.source) == bool(generated)
    del terminal, layer
    gc.disable()
    try:
        del chain
        assert alive() is None
    finally:
        gc.enable()


def test_a_timeout_kept_across_event_loops_still_fires_after_a_covered_call() -> None:
    outer, inner = TimeoutPolicy(0.2), TimeoutPolicy(0.01)
    calls = 0

    async def reset_then_ok(ctx: RequestContext) -> Outcome:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise UpstreamReset("x")
        return Outcome(200, {})

    async def hang(ctx: RequestContext) -> Outcome:
        await asyncio.sleep(2)
        return Outcome(200, {})

    async def first_loop() -> None:  # leaves the outer timeout's queue timer armed on this loop
        assert (await partial(outer, ScriptedUpstream(FakeClock(), 200))(make_ctx())).status == 200

    async def second_loop() -> None:
        chain = compose([outer, RetryPolicy(attempts=2, on=["reset"], rng=lambda: 0.0), inner], reset_then_ok)
        assert (await chain(make_ctx())).status == 200 and calls == 2  # the second attempt ran in `within`
        with pytest.raises(TimedOut):
            await asyncio.wait_for(partial(outer, hang)(make_ctx()), 1.5)

    asyncio.run(first_loop())
    asyncio.run(second_loop())


def test_the_full_chain_matches_nested_layers_on_the_real_clock() -> None:
    # the event loop's timers rather than FakeClock's (the generated lines have a branch for each)
    async def play_real(fuse: bool) -> list[Any]:
        log = EventLog()
        steps = iter([Hang(5.0), 503, Hang(5.0), Hang(5.0), 200])

        async def upstream(ctx: RequestContext) -> Outcome:
            ctx.attempts += 1
            step = next(steps)
            if isinstance(step, Hang):
                await asyncio.sleep(step.seconds)
                return Outcome(200, {})
            return Outcome(step, {})  # type: ignore[arg-type]

        made: list[Policy] = [
            TimeoutPolicy(1.0), RetryPolicy(attempts=3, on=["timeout", "5xx"], rng=lambda: 0.0),
            CircuitBreakerPolicy(BreakerStateMachine(consecutive_failures=5)), TimeoutPolicy(0.05),
        ]
        chain = compose(made, upstream) if fuse else nested(made, upstream)
        seen: list[Any] = []
        for _ in range(2):
            ctx = make_ctx(bus=log.bus)
            ctx.task = asyncio.current_task()
            try:
                seen.append((await chain(ctx)).status)
            except FenderError as exc:
                seen.append(exc.message)
            seen.append((ctx.attempts, ctx.deadline))
        return [*seen, log.events]

    fused = asyncio.run(play_real(True))
    assert fused == asyncio.run(play_real(False))
    # first request: cut at 50 ms, a 503, cut again; second: cut, then the 200
    assert fused[:4] == ["no response within 50ms", (3, None), 200, (2, None)]
