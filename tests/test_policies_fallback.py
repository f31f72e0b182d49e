import json

import pytest

from policies.errors import CircuitOpen, RateLimited, TimedOut, UpstreamUnavailable
from policies.events import FallbackServed
from policies.fallback import FallbackPolicy
from policies.testing import EventLog, FakeClock, ScriptedUpstream, make_ctx


async def test_serves_the_static_response_for_listed_kinds():
    clock = FakeClock()
    log = EventLog()
    policy = FallbackPolicy(on=["circuit_open", "timeout"], status=203, headers={"x-cached": "1"}, body="stale")
    for error, kind in ((CircuitOpen("x"), "circuit_open"), (TimedOut("x"), "timeout")):
        outcome = await policy(ScriptedUpstream(clock, error), make_ctx(bus=log.bus))
        assert (outcome.status, outcome.body) == (203, b"stale")
        assert outcome.headers == {"x-cached": "1", "x-fender-fallback": kind}  # (what it stands in for)
    assert [e.reason for e in log.of(FallbackServed)] == ["circuit_open", "timeout"]


async def test_a_configured_x_fender_fallback_header_does_not_go_out_twice():
    policy = FallbackPolicy(on=["timeout"], headers={"X-Fender-Fallback": "mine", "x-cached": "1"})
    outcome = await policy(ScriptedUpstream(FakeClock(), TimedOut("x")), make_ctx())
    assert outcome.headers == {"x-cached": "1", "x-fender-fallback": "timeout"}


async def test_unlisted_failures_pass_through():
    clock = FakeClock()
    policy = FallbackPolicy(on=["circuit_open"])
    with pytest.raises(RateLimited):
        await policy(ScriptedUpstream(clock, RateLimited("x")), make_ctx())
    with pytest.raises(UpstreamUnavailable):
        await policy(ScriptedUpstream(clock, UpstreamUnavailable("x")), make_ctx())
    assert (await policy(ScriptedUpstream(clock, 502), make_ctx())).status == 502


async def test_5xx_response_is_released_and_replaced():
    clock = FakeClock()
    upstream = ScriptedUpstream(clock, 500)
    outcome = await FallbackPolicy(on=["5xx"], status=200, body="ok")(upstream, make_ctx())
    assert (outcome.status, outcome.body, outcome.headers["x-fender-fallback"]) == (200, b"ok", "5xx")
    assert upstream.released == [500]
    assert (await FallbackPolicy(on=["5xx"])(ScriptedUpstream(clock, 404), make_ctx())).status == 404


async def test_structured_body_is_json():
    clock = FakeClock()
    policy = FallbackPolicy(on=["upstream_unavailable"], status=200, body={"items": [], "stale": True})
    outcome = await policy(ScriptedUpstream(clock, UpstreamUnavailable("x")), make_ctx())
    assert outcome.headers["Content-Type"] == "application/json"
    assert json.loads(outcome.body) == {"items": [], "stale": True}
    outcome.headers["x-fender-route"] = "r"  # the proxy adds headers; the next one is clean
    again = await policy(ScriptedUpstream(clock, UpstreamUnavailable("x")), make_ctx())
    assert "x-fender-route" not in again.headers


def test_rejects_unknown_kinds():
    with pytest.raises(ValueError):
        FallbackPolicy(on=["oops"])
