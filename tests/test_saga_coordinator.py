"""The saga coordinator against a scripted in-process participant, on a fake clock.

The journal is the real SQLite store in a temporary directory; time is a FakeClock,
so step timeouts, deadlines and compensation backoff run without waiting.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from config.saga_models import SagaTemplateModel
from policies.errors import CircuitOpen, UpstreamReset, UpstreamUnavailable
from policies.testing import FakeClock
from saga.invoker import RouteResponse
from saga.observer import NullSagaObserver
from saga.service import SagaService

STEPS = ("reserve", "charge", "ship")
ROUTES = {"reserve": "inventory", "charge": "payments", "ship": "shipping"}

Behaviour = int | BaseException | Callable[[], Awaitable[RouteResponse]]


def reply(status: int, body: Any = None, headers: Mapping[str, str] | None = None) -> RouteResponse:
    data = b"" if body is None else json.dumps(body).encode()
    return RouteResponse(status, {"Content-Type": "application/json", **(headers or {})}, data)


class Participant:
    """A RouteInvoker that records every call and answers from a per-"step:phase" script.

    A script is a list of behaviours used in order; the last one repeats. A behaviour
    is a status (answered with a JSON body `{"id": "<step>-1"}`), an exception to raise,
    or an async callable producing the response.
    """

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[dict[str, Any]] = []
        self.script: dict[str, list[Behaviour]] = {}
        self.routes = set(ROUTES.values())

    def on(self, key: str, *behaviours: Behaviour) -> None:
        self.script[key] = list(behaviours)

    def has_route(self, name: str) -> bool:
        return name in self.routes

    async def invoke(
        self, route: str, method: str, path: str, headers: Mapping[str, str], body: bytes | None
    ) -> RouteResponse:
        key = headers["Idempotency-Key"]
        self.calls.append(
            {"route": route, "method": method, "path": path, "key": key,
             "saga": headers["x-fender-saga-id"], "headers": dict(headers),
             "body": json.loads(body) if body else None}
        )
        step_phase = key.split(":", 1)[1]
        queue = self.script.get(step_phase) or [200]
        behaviour = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(behaviour, int):
            return reply(behaviour, {"id": f"{step_phase.split(':')[0]}-1"}, {"X-Order": "o-9"})
        if isinstance(behaviour, BaseException):
            raise behaviour
        return await behaviour()

    def keys(self) -> list[str]:
        return [c["key"] for c in self.calls]


def saga_body(saga_id: str = "s1", **extra: Any) -> dict[str, Any]:
    steps = [
        {
            "name": name,
            "action": {"route": ROUTES[name], "method": "POST", "path": f"/{name}", "body": {"saga": "{{saga.id}}"}},
            "compensation": {"route": ROUTES[name], "method": "DELETE", "path": f"/{name}/{{{{saga.id}}}}"},
            "timeout": "5s",
        }
        for name in STEPS
    ]
    return {"id": saga_id, "input": {"sku": "A1", "amount": 10}, "steps": steps, **extra}


def expected(saga_id: str, *parts: str) -> list[str]:
    return [f"{saga_id}:{p}" for p in parts]


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.url = f"sqlite:///{tmp_path}/sagas.db"
        self.clock = FakeClock()
        self.participant = Participant(self.clock)
        self.templates: dict[str, SagaTemplateModel] = {}
        self.service = self.new_service()

    def new_service(self, participant: Participant | None = None, observer: Any = None) -> SagaService:
        return SagaService(
            self.url, participant or self.participant, lambda: self.templates, clock=self.clock,
            observer=observer or NullSagaObserver(),
        )

    async def run(self, body: dict[str, Any]) -> dict[str, Any]:
        saga, _ = await self.service.create(body)
        await self.service.coordinator.wait(saga.id, 10)
        current = await self.service.coordinator.get(saga.id)
        assert current is not None
        return current.record()

    async def client(self, aiohttp_client: Any) -> TestClient:
        """The saga API of this service, over HTTP (pytest-aiohttp's `aiohttp_client`)."""
        app = web.Application()
        app.add_routes(self.service.routes())
        return await aiohttp_client(app)  # type: ignore[no-any-return]


# the `env` fixture (an Env, started) is in tests/conftest.py, for every saga test module


async def until(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


async def test_success_runs_every_step_in_order_with_idempotency_keys(env: Env) -> None:
    record = await env.run(saga_body())
    assert record["status"] == "completed"
    assert record["error"] is None
    assert record["steps_executed"] == record["total_steps"] == 3
    assert [s["status"] for s in record["steps"]] == ["succeeded"] * 3
    assert env.participant.keys() == expected("s1", "reserve:action", "charge:action", "ship:action")
    assert all(c["saga"] == "s1" for c in env.participant.calls)
    assert env.participant.calls[0]["body"] == {"saga": "s1"}
    step = record["steps"][0]
    assert step["response"] == {
        "status": 200, "headers": {"content-type": "application/json", "x-order": "o-9"}, "body": {"id": "reserve-1"}
    }
    assert step["attempts"] == 1 and step["compensation"] is None and step["error"] is None
    assert step["started_at"].endswith("Z") and step["finished_at"] is not None
    assert set(record) == {
        "id", "status", "template", "input", "created_at", "updated_at", "deadline_at",
        "steps_executed", "total_steps", "error", "steps",
    }


@pytest.mark.parametrize("fail_at", [0, 1, 2])
async def test_failure_compensates_the_succeeded_steps_in_reverse(env: Env, fail_at: int) -> None:
    env.participant.on(f"{STEPS[fail_at]}:action", 500)
    record = await env.run(saga_body())
    actions = [f"{s}:action" for s in STEPS[: fail_at + 1]]
    compensations = [f"{s}:compensation" for s in reversed(STEPS[:fail_at])]
    assert env.participant.keys() == expected("s1", *actions, *compensations)
    assert [c["path"] for c in env.participant.calls[fail_at + 1:]] == [f"/{s}/s1" for s in reversed(STEPS[:fail_at])]
    assert record["status"] == "compensated"
    assert record["error"] == {"step": STEPS[fail_at], "kind": "status", "message": "status 500 is not a success for this step"}
    statuses = [s["status"] for s in record["steps"]]
    assert statuses == ["compensated"] * fail_at + ["failed"] + ["skipped"] * (2 - fail_at)
    assert record["steps"][fail_at]["response"]["status"] == 500
    assert record["steps_executed"] == fail_at + 1


async def test_step_timeout_compensates_that_step_too(env: Env) -> None:
    async def slow() -> RouteResponse:
        await env.clock.sleep(60)
        return reply(200)

    env.participant.on("charge:action", slow)
    record = await env.run(saga_body())
    assert env.participant.keys() == expected(
        "s1", "reserve:action", "charge:action", "charge:compensation", "reserve:compensation"
    )
    assert record["status"] == "compensated"
    charge = record["steps"][1]
    assert charge["status"] == "compensated"
    assert charge["error"] == {"kind": "timeout", "message": "no response within 5s"}
    assert record["error"]["kind"] == "timeout"


async def test_a_broken_connection_is_compensated_but_a_refused_one_is_not(env: Env) -> None:
    env.participant.on("charge:action", UpstreamReset("reset after sending"))
    record = await env.run(saga_body("reset"))
    assert env.participant.keys()[-2:] == expected("reset", "charge:compensation", "reserve:compensation")
    assert record["steps"][1]["error"]["kind"] == "upstream_reset"

    env.participant.calls.clear()
    env.participant.on("charge:action", UpstreamUnavailable("connection refused"))
    record = await env.run(saga_body("refused"))
    assert env.participant.keys() == expected("refused", "reserve:action", "charge:action", "reserve:compensation")
    assert record["steps"][1]["status"] == "failed"

    env.participant.calls.clear()
    env.participant.on("charge:action", CircuitOpen("open"))
    record = await env.run(saga_body("open"))
    assert env.participant.keys() == expected("open", "reserve:action", "charge:action", "reserve:compensation")
    assert record["error"]["kind"] == "circuit_open"


async def test_compensation_accepts_404_and_410(env: Env) -> None:
    env.participant.on("ship:action", 500)
    env.participant.on("charge:compensation", 404)
    env.participant.on("reserve:compensation", 410)
    record = await env.run(saga_body())
    assert record["status"] == "compensated"
    assert [s["compensation"]["response"]["status"] for s in record["steps"][:2]] == [410, 404]


async def test_a_failing_compensation_parks_the_saga_and_retry_finishes_it(env: Env) -> None:
    env.participant.on("ship:action", 500)
    env.participant.on("charge:compensation", 503)
    record = await env.run(saga_body())
    assert record["status"] == "failed"
    assert record["error"]["step"] == "charge"
    assert record["error"]["kind"] == "compensation_failed"
    assert "10 attempt(s): status: status 503" in record["error"]["message"]
    charge = record["steps"][1]
    assert charge["status"] == "compensation_failed"
    assert charge["compensation"]["attempts"] == 10
    assert charge["compensation"]["status"] == "failed"
    # strictly one at a time in reverse: reserve's compensation waits behind charge's
    assert record["steps"][0]["status"] == "succeeded"
    assert "s1:reserve:compensation" not in env.participant.keys()
    # nine backoffs between ten attempts, each within the exponential cap (base 100ms, max 30s)
    backoffs = env.clock.sleeps
    assert len(backoffs) == 9
    assert all(0 <= d <= min(30.0, 0.1 * 2 ** i) for i, d in enumerate(backoffs))

    env.participant.on("charge:compensation", 200)
    saga = await env.service.coordinator.retry("s1")
    assert saga is not None
    await env.service.coordinator.wait("s1", 10)
    final = await env.service.coordinator.get("s1")
    assert final is not None
    record = final.record()
    assert record["status"] == "compensated"
    assert record["error"]["kind"] == "status" and record["error"]["step"] == "ship"  # the original cause
    assert record["steps"][1]["compensation"]["attempts"] == 11
    assert env.participant.keys()[-2:] == expected("s1", "charge:compensation", "reserve:compensation")


async def test_per_step_compensation_retry_overrides_the_saga_default(env: Env) -> None:
    body = saga_body(compensation_retry={"attempts": 5, "base": "10ms", "max": "1s"})
    body["steps"][0]["compensation_retry"] = {"attempts": 2}
    env.participant.on("charge:action", 500)
    env.participant.on("reserve:compensation", 500)
    record = await env.run(body)
    assert record["status"] == "failed"
    assert record["steps"][0]["compensation"]["attempts"] == 2


async def test_cancel_compensates_the_step_in_flight(env: Env) -> None:
    release = asyncio.Event()

    async def hang() -> RouteResponse:
        await release.wait()
        return reply(200)

    env.participant.on("charge:action", hang)
    saga, _ = await env.service.create(saga_body())
    await until(lambda: "s1:charge:action" in env.participant.keys())
    cancelled = await env.service.coordinator.cancel("s1")
    assert cancelled is not None and cancelled.status in ("compensating", "compensated")
    await env.service.coordinator.wait("s1", 10)
    final = await env.service.coordinator.get("s1")
    assert final is not None
    record = final.record()
    assert record["status"] == "compensated"
    assert record["error"]["kind"] == "cancelled"
    assert env.participant.keys() == expected(
        "s1", "reserve:action", "charge:action", "charge:compensation", "reserve:compensation"
    )
    assert record["steps"][2]["status"] == "skipped"


async def test_cancel_of_a_finished_saga_is_a_conflict(env: Env) -> None:
    from saga.coordinator import SagaConflict

    await env.run(saga_body())
    with pytest.raises(SagaConflict):
        await env.service.coordinator.cancel("s1")


async def test_deadline_stops_the_saga_and_compensates(env: Env) -> None:
    async def slow() -> RouteResponse:
        await env.clock.sleep(20)
        return reply(200)

    env.participant.on("charge:action", slow)
    body = saga_body(deadline="8s")
    for step in body["steps"]:
        step["timeout"] = "30s"
    record = await env.run(body)
    assert record["status"] == "compensated"
    assert record["error"]["kind"] == "deadline_exceeded"
    assert record["steps"][1]["status"] == "compensated"
    assert record["steps"][1]["error"]["message"] == "no response within 8s"
    assert record["deadline_at"] is not None
    assert env.participant.keys()[-2:] == expected("s1", "charge:compensation", "reserve:compensation")


async def test_templates_carry_input_and_earlier_responses_and_keep_json_types(env: Env) -> None:
    async def created() -> RouteResponse:
        return reply(201, {"id": "r/7", "items": [{"n": 3}]}, {"Location": "/r/7"})

    env.participant.on("reserve:action", created)
    body = {
        "id": "t1",
        "input": {"sku": "A1", "amount": 10, "tags": ["x"]},
        "steps": [
            {"name": "reserve", "action": {"route": "inventory", "path": "/r", "body": {"sku": "{{input.sku}}"}}},
            {
                "name": "charge",
                "action": {
                    "route": "payments",
                    "path": "/pay/{{steps.reserve.response.body.id}}",
                    "headers": {"x-loc": "{{steps.reserve.response.headers.location}}"},
                    "body": {
                        "amount": "{{input.amount}}", "tags": "{{input.tags}}",
                        "n": "{{steps.reserve.response.body.items.0.n}}",
                        "status": "{{steps.reserve.response.status}}",
                        "text": "order {{saga.id}} of {{input.amount}}",
                    },
                },
            },
        ],
    }
    record = await env.run(body)
    assert record["status"] == "completed"
    charge = env.participant.calls[1]
    assert charge["path"] == "/pay/r%2F7"  # data cannot add path segments
    assert charge["headers"]["x-loc"] == "/r/7"
    assert charge["body"] == {"amount": 10, "tags": ["x"], "n": 3, "status": 201, "text": "order t1 of 10"}


async def test_an_unresolved_placeholder_fails_the_step_without_calling(env: Env) -> None:
    body = saga_body()
    body["steps"][1]["action"]["body"] = {"x": "{{input.missing}}"}
    record = await env.run(body)
    assert record["status"] == "compensated"
    assert record["steps"][1]["status"] == "failed"
    assert record["steps"][1]["error"]["kind"] == "template_error"
    assert "input.missing" in record["steps"][1]["error"]["message"]
    assert env.participant.keys() == expected("s1", "reserve:action", "reserve:compensation")


async def test_a_compensation_needing_a_missing_response_parks_with_template_error(env: Env) -> None:
    body = saga_body()
    body["steps"][1]["compensation"]["path"] = "/refunds/{{steps.charge.response.body.id}}"
    env.participant.on("charge:action", UpstreamReset("broke"))
    record = await env.run(body)
    assert record["status"] == "failed"
    assert record["error"]["step"] == "charge"
    assert record["error"]["kind"] == "template_error"  # (SPEC 8), not compensation_failed
    assert "steps.charge.response.body.id" in record["error"]["message"]
    charge = record["steps"][1]
    assert charge["status"] == "compensation_failed" and charge["compensation"]["attempts"] == 0


async def test_observer_sees_start_steps_and_finish(env: Env) -> None:
    events: list[tuple[Any, ...]] = []

    class Recorder(NullSagaObserver):
        def saga_started(self, saga_id: str) -> None:
            events.append(("started", saga_id))

        def call_started(self, saga_id: str, step: str, phase: Any, headers: Any) -> None:
            headers["traceparent"] = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"

        def step_finished(self, saga_id: str, step: str, phase: Any, duration: float, outcome: str) -> None:
            events.append(("step", step, phase, outcome))

        def saga_finished(self, saga_id: str, status: str) -> None:
            events.append(("finished", status))

    env.service.set_observer(Recorder())
    env.participant.on("charge:action", 500)
    await env.run(saga_body())
    assert events == [
        ("started", "s1"), ("step", "reserve", "action", "ok"), ("step", "charge", "action", "status"),
        ("step", "reserve", "compensation", "ok"), ("finished", "compensated"),
    ]
    assert all(c["headers"]["traceparent"].startswith("00-111") for c in env.participant.calls)


async def _interrupt_at_charge(env: Env, body: dict[str, Any]) -> None:
    """Start a saga, and stop the service while the charge call is in flight (a crash, to the journal)."""
    never = asyncio.Event()

    async def hang() -> RouteResponse:
        await never.wait()
        raise AssertionError("unreachable")

    env.participant.on("charge:action", hang)
    await env.service.create(body)
    await until(lambda: "s1:charge:action" in env.participant.keys())
    await env.service.stop()


async def test_recovery_compensates_the_step_in_flight_by_default(env: Env) -> None:
    await _interrupt_at_charge(env, saga_body())
    after = Participant(env.clock)
    env.service = env.new_service(after)
    await env.service.start()
    await env.service.coordinator.wait("s1", 10)
    record = (await env.service.store.get("s1")).record()  # type: ignore[union-attr]
    assert record["status"] == "compensated"
    assert record["error"]["kind"] == "interrupted"
    assert after.keys() == expected("s1", "charge:compensation", "reserve:compensation")
    assert [s["status"] for s in record["steps"]] == ["compensated", "compensated", "skipped"]


async def test_recovery_resume_resends_with_the_same_key_and_continues(env: Env) -> None:
    await _interrupt_at_charge(env, saga_body(on_recovery="resume"))
    after = Participant(env.clock)
    env.service = env.new_service(after)
    await env.service.start()
    await env.service.coordinator.wait("s1", 10)
    record = (await env.service.store.get("s1")).record()  # type: ignore[union-attr]
    assert record["status"] == "completed"
    assert after.keys() == expected("s1", "charge:action", "ship:action")
    assert record["steps"][1]["attempts"] == 2


async def test_recovery_resumes_a_parked_compensation_only_on_retry(env: Env) -> None:
    env.participant.on("charge:action", 500)
    env.participant.on("reserve:compensation", 503)
    record = await env.run(saga_body())
    assert record["status"] == "failed"
    await env.service.stop()
    after = Participant(env.clock)
    env.service = env.new_service(after)
    await env.service.start()
    assert after.calls == []  # failed is terminal: parked until someone retries
    await env.service.coordinator.retry("s1")
    await env.service.coordinator.wait("s1", 10)
    final = await env.service.coordinator.get("s1")
    assert final is not None and final.status == "compensated"


async def test_resume_overtaken_by_the_deadline_compensates_the_step_left_in_flight(env: Env) -> None:
    await _interrupt_at_charge(env, saga_body(on_recovery="resume", deadline="100s"))
    env.clock.advance(200)  # Fender stayed down past the saga's deadline
    after = Participant(env.clock)
    env.service = env.new_service(after)
    await env.service.start()
    await env.service.coordinator.wait("s1", 10)
    record = (await env.service.store.get("s1")).record()  # type: ignore[union-attr]
    assert record["status"] == "compensated"
    assert record["error"]["kind"] == "deadline_exceeded"
    assert after.keys() == expected("s1", "charge:compensation", "reserve:compensation")
    assert record["steps"][1]["error"]["kind"] == "interrupted"
    assert [s["status"] for s in record["steps"]] == ["compensated", "compensated", "skipped"]


async def test_observer_is_told_when_driving_stops_without_a_terminal_status(env: Env) -> None:
    events: list[tuple[str, str]] = []

    class Recorder(NullSagaObserver):
        def saga_started(self, saga_id: str) -> None:
            events.append(("started", saga_id))

        def saga_finished(self, saga_id: str, status: str) -> None:
            events.append(("finished", status))

        def saga_stopped(self, saga_id: str) -> None:
            events.append(("stopped", saga_id))

    env.service.set_observer(Recorder())
    await _interrupt_at_charge(env, saga_body())
    assert events == [("started", "s1"), ("stopped", "s1")]


async def test_wait_reads_the_store_while_another_replica_drives_the_saga(env: Env) -> None:
    release = asyncio.Event()

    async def held() -> RouteResponse:
        await release.wait()
        return reply(200, {"id": "charge-1"})

    env.participant.on("charge:action", held)
    await env.service.create(saga_body())
    await until(lambda: "s1:charge:action" in env.participant.keys())
    other = env.new_service()  # a second replica on the same journal; it does not drive s1
    await other.store.open()
    reads = 0
    get = other.store.get

    async def reading(saga_id: str) -> Any:
        nonlocal reads
        reads += 1
        if reads == 3:  # the driving replica finishes meanwhile
            release.set()
            await env.service.coordinator.wait(saga_id, 5)
        return await get(saga_id)

    other.store.get = reading  # type: ignore[method-assign]
    try:
        await other.coordinator.wait("s1", 5)
        assert reads == 3  # it kept reading until the saga was terminal, then returned
        saga = await other.coordinator.get("s1")
        assert saga is not None and saga.status == "completed"
    finally:
        await other.store.close()


async def test_a_compensation_resumed_after_a_restart_keeps_the_attempts_it_already_used(env: Env) -> None:
    never = asyncio.Event()

    async def hang() -> RouteResponse:
        await never.wait()
        raise AssertionError("unreachable")

    env.participant.on("charge:action", 500)
    env.participant.on("reserve:compensation", 503, 503, hang)
    await env.service.create(saga_body(compensation_retry={"attempts": 5, "base": "10ms", "max": "1s"}))
    await until(lambda: env.participant.keys().count("s1:reserve:compensation") == 3)
    await env.service.stop()  # a crash during the third attempt
    after = Participant(env.clock)
    after.on("reserve:compensation", 503)
    env.service = env.new_service(after)
    await env.service.start()
    await env.service.coordinator.wait("s1", 10)
    record = (await env.service.store.get("s1")).record()  # type: ignore[union-attr]
    assert record["status"] == "failed"
    assert after.keys() == expected("s1", "reserve:compensation", "reserve:compensation")  # 4th and 5th
    assert record["steps"][0]["compensation"]["attempts"] == 5
    assert "after 5 attempt(s)" in record["error"]["message"]
