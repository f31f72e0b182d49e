import asyncio

import pytest

from policies.base import Outcome, compose
from policies.bulkhead import BulkheadPolicy
from policies.errors import BulkheadFull, TimedOut
from policies.events import BulkheadQueued, BulkheadRejected
from policies.testing import EventLog, FakeClock, make_ctx
from policies.timeout import TimeoutPolicy


class Gated:
    """An upstream whose calls finish only when the test opens their gate, in order."""

    def __init__(self):
        self.gates = []
        self.started = []

    async def __call__(self, ctx):
        gate = asyncio.Event()
        self.gates.append(gate)
        self.started.append(ctx.route)
        await gate.wait()
        return Outcome(200, {})


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def test_rejects_beyond_max_concurrent_without_a_queue():
    clock = FakeClock()
    log = EventLog()
    policy = BulkheadPolicy(2, clock=clock, name="bh")
    upstream = Gated()
    running = [asyncio.create_task(policy(upstream, make_ctx())) for _ in range(2)]
    await settle()
    with pytest.raises(BulkheadFull):
        await policy(upstream, make_ctx(bus=log.bus))
    assert log.of(BulkheadRejected) == [BulkheadRejected("bh")]
    assert policy.describe()["in_flight"] == 2
    for gate in upstream.gates:
        gate.set()
    await asyncio.gather(*running)
    assert policy.in_flight == 0


async def test_queued_requests_run_in_order_as_slots_free():
    clock = FakeClock()
    log = EventLog()
    policy = BulkheadPolicy(1, max_queue=2, queue_timeout=5, clock=clock)
    upstream = Gated()
    tasks = [asyncio.create_task(policy(upstream, make_ctx(route=f"r{i}", bus=log.bus))) for i in range(3)]
    await settle()
    assert upstream.started == ["r0"]
    assert policy.queued == 2 and len(log.of(BulkheadQueued)) == 2
    with pytest.raises(BulkheadFull):  # the queue is full too
        await policy(upstream, make_ctx())
    upstream.gates[0].set()
    await settle()
    assert upstream.started == ["r0", "r1"]
    upstream.gates[1].set()
    await settle()
    upstream.gates[2].set()
    assert [o.status for o in await asyncio.gather(*tasks)] == [200, 200, 200]
    assert (policy.in_flight, policy.queued) == (0, 0)


async def test_queue_timeout_gives_up_and_leaves_the_counts_right():
    clock = FakeClock()
    policy = BulkheadPolicy(1, max_queue=1, queue_timeout=2, clock=clock)
    upstream = Gated()
    first = asyncio.create_task(policy(upstream, make_ctx()))
    waiter = asyncio.create_task(policy(upstream, make_ctx()))
    await settle()
    clock.advance(1.9)
    await settle()
    assert not waiter.done()
    clock.advance(0.1)
    with pytest.raises(BulkheadFull):
        await waiter
    assert (policy.in_flight, policy.queued) == (1, 0)
    upstream.gates[0].set()
    await first
    assert policy.in_flight == 0


async def test_queue_wait_is_bounded_by_the_total_timeout():
    clock = FakeClock()
    policy = BulkheadPolicy(1, max_queue=1, queue_timeout=0, clock=clock)  # 0: no own limit
    upstream = Gated()
    first = asyncio.create_task(policy(upstream, make_ctx()))
    await settle()
    chain = compose([TimeoutPolicy(3, clock=clock), policy], upstream)
    waiter = asyncio.create_task(chain(make_ctx()))
    await settle()
    clock.advance(3)
    with pytest.raises(TimedOut):
        await waiter
    assert policy.queued == 0
    upstream.gates[0].set()
    await first
    assert (policy.in_flight, policy.queued) == (0, 0)


async def test_a_failing_call_frees_its_slot():
    clock = FakeClock()
    policy = BulkheadPolicy(1, clock=clock)

    async def boom(ctx):
        raise RuntimeError("x")

    for _ in range(3):
        with pytest.raises(RuntimeError):
            await policy(boom, make_ctx())
    assert policy.in_flight == 0


async def test_a_cancelled_waiter_leaves_the_queue():
    clock = FakeClock()
    policy = BulkheadPolicy(1, max_queue=1, queue_timeout=10, clock=clock)
    upstream = Gated()
    first = asyncio.create_task(policy(upstream, make_ctx()))
    waiter = asyncio.create_task(policy(upstream, make_ctx()))
    await settle()
    waiter.cancel()
    await settle()
    assert policy.queued == 0
    upstream.gates[0].set()
    await first
    assert policy.in_flight == 0
