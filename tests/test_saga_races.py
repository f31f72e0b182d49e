"""Saga operations that race each other: concurrent retries and cancels, retry against
DELETE, and forged paging cursors. Each case once drove a saga twice, wrote rows
for a deleted saga, or answered a client's mistake with a 503.
"""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from saga.coordinator import SagaConflict
from saga.invoker import RouteResponse
from saga.store import SagaGone
from tests.conftest import require_service
from tests.test_saga_coordinator import Env, reply, saga_body, until
from tests.test_saga_postgres import DSN, a_saga


@pytest.fixture
async def api(env: Env, aiohttp_client: Any) -> tuple[TestClient, Env]:
    return await env.client(aiohttp_client), env


async def _parked(client: TestClient, env: Env, saga_id: str) -> None:
    """A saga whose compensation of `charge` failed ten times: `failed`, parked."""
    env.participant.on("ship:action", 500)
    env.participant.on("charge:compensation", 503)
    record = await (await client.post("/v1/sagas?wait=5", json=saga_body(saga_id))).json()
    assert record["status"] == "failed", record


def _step_rows(env: Env, saga_id: str) -> int:
    conn = sqlite3.connect(env.url.removeprefix("sqlite:///"))
    try:
        return int(conn.execute("SELECT count(*) FROM saga_steps WHERE saga_id = ?", (saga_id,)).fetchone()[0])
    finally:
        conn.close()


async def test_concurrent_retries_drive_the_saga_once(api: tuple[TestClient, Env]) -> None:
    client, env = api
    await _parked(client, env, "r")
    before = env.participant.keys().count("r:charge:compensation")
    hold = asyncio.Event()

    async def held() -> RouteResponse:
        await hold.wait()
        return reply(204)

    env.participant.on("charge:compensation", held)
    # hold every read of the journal until all twenty requests are inside retry(), so
    # they overlap however fast the first one would otherwise finish
    coordinator, store = env.service.coordinator, env.service.store
    retry, read = coordinator.retry, store.get
    entered, all_in = 0, asyncio.Event()

    async def counted(saga_id: str) -> Any:
        nonlocal entered
        entered += 1
        if entered == 20:
            all_in.set()
        return await retry(saga_id)

    async def gated(saga_id: str) -> Any:
        await all_in.wait()
        return await read(saga_id)

    coordinator.retry = counted  # type: ignore[method-assign]
    store.get = gated  # type: ignore[method-assign]
    answers = await asyncio.gather(*(client.post("/v1/sagas/r/retry") for _ in range(20)))
    coordinator.retry, store.get = retry, read  # type: ignore[method-assign]
    statuses = sorted(r.status for r in answers)
    assert statuses == [202] + [409] * 19
    assert {(await r.json())["error"] for r in answers if r.status == 409} == {"saga_conflict"}
    await until(lambda: "r:charge:compensation" in env.participant.keys()[-1:])
    hold.set()
    record = await (await client.get("/v1/sagas/r?wait=5")).json()
    assert record["status"] == "compensated"
    # one compensation at a time: charge's once more, then reserve's, nothing twice
    assert env.participant.keys().count("r:charge:compensation") == before + 1
    assert env.participant.keys().count("r:reserve:compensation") == 1


async def test_concurrent_retries_in_one_tick_start_one_driver(env: Env) -> None:
    env.participant.on("ship:action", 500)
    env.participant.on("charge:compensation", 503)
    assert (await env.run(saga_body("t")))["status"] == "failed"
    before = env.participant.keys().count("t:charge:compensation")
    env.participant.on("charge:compensation", 204)
    outcomes = await asyncio.gather(
        *(env.service.coordinator.retry("t") for _ in range(20)), return_exceptions=True
    )
    assert sum(1 for o in outcomes if isinstance(o, SagaConflict)) == 19
    await env.service.coordinator.wait("t", 5)
    final = await env.service.store.get("t")
    assert final is not None and final.status == "compensated"
    assert env.participant.keys().count("t:charge:compensation") == before + 1
    assert env.participant.keys().count("t:reserve:compensation") == 1


async def test_concurrent_cancels_of_an_undriven_saga_compensate_once(env: Env) -> None:
    # journaled as running but driven by nobody here (e.g. driving stopped on a journal error)
    saga = env.service.build(saga_body("c"))
    saga.status = "running"
    saga.steps[0].status = "succeeded"
    assert await env.service.store.create(saga) is None
    outcomes = await asyncio.gather(
        *(env.service.coordinator.cancel("c") for _ in range(20)), return_exceptions=True
    )
    assert sum(1 for o in outcomes if isinstance(o, SagaConflict)) == 19
    assert sum(1 for o in outcomes if not isinstance(o, BaseException) and o is not None) == 1
    await env.service.coordinator.wait("c", 5)
    final = await env.service.store.get("c")
    assert final is not None and final.status == "compensated"
    assert env.participant.keys() == ["c:reserve:compensation"]


async def test_a_retry_that_loses_to_delete_sends_nothing_and_writes_nothing(api: tuple[TestClient, Env]) -> None:
    client, env = api
    await _parked(client, env, "d")
    sent = len(env.participant.calls)
    store = env.service.store
    read = store.get

    async def get_then_deleted(saga_id: str) -> Any:
        found = await read(saga_id)
        assert await store.delete(saga_id) == "deleted"  # a DELETE lands between read and write
        return found

    store.get = get_then_deleted  # type: ignore[method-assign]
    resp = await client.post("/v1/sagas/d/retry")
    store.get = read  # type: ignore[method-assign]
    assert resp.status == 404
    await asyncio.sleep(0.05)  # a wrongly spawned driver would call out now
    assert len(env.participant.calls) == sent
    assert not env.service.coordinator.busy("d")
    assert _step_rows(env, "d") == 0
    assert (await client.get("/v1/sagas/d")).status == 404


async def test_delete_while_a_retry_is_starting_is_a_conflict(api: tuple[TestClient, Env]) -> None:
    client, env = api
    await _parked(client, env, "x")
    env.participant.on("charge:compensation", 204)
    store = env.service.store
    read = store.get
    reading, go_on = asyncio.Event(), asyncio.Event()

    async def slow_get(saga_id: str) -> Any:
        reading.set()
        await go_on.wait()
        return await read(saga_id)

    store.get = slow_get  # type: ignore[method-assign]
    retry = asyncio.ensure_future(client.post("/v1/sagas/x/retry?wait=5"))
    await reading.wait()
    deleted = await client.delete("/v1/sagas/x")
    go_on.set()
    done = await retry
    store.get = read  # type: ignore[method-assign]
    assert deleted.status == 409
    assert done.status == 200 and (await done.json())["status"] == "compensated"
    assert (await client.delete("/v1/sagas/x")).status == 204
    assert _step_rows(env, "x") == 0


async def test_save_of_a_deleted_saga_is_refused_without_writing_steps(env: Env) -> None:
    record = await env.run(saga_body("g"))
    assert record["status"] == "completed"
    saga = await env.service.store.get("g")
    assert saga is not None
    assert await env.service.store.delete("g") == "deleted"
    with pytest.raises(SagaGone):
        await env.service.store.save(saga, [0, 1, 2])
    assert _step_rows(env, "g") == 0


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "czk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5",  # s99999999999999999999999: beyond 64 bits
        _cursor(f"s{2**63}"),
        _cursor("s-1"),
        _cursor("s 5"),
        _cursor("s\u0663"),  # ARABIC-INDIC DIGIT THREE: int() takes it
        _cursor("s1_0"),
        _cursor("s"),
        _cursor("x5"),
        "@@@",
        "%FF",
    ],
)
async def test_a_forged_cursor_is_a_located_400(api: tuple[TestClient, Env], cursor: str) -> None:
    client, _ = api
    resp = await client.get("/v1/sagas", params={"cursor": cursor})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"] == "invalid_cursor"
    assert [e["loc"] for e in body["errors"]] == ["cursor"]


async def test_a_returned_cursor_still_pages(api: tuple[TestClient, Env]) -> None:
    client, _ = api
    for i in range(3):
        await client.post("/v1/sagas?wait=5", json=saga_body(f"p{i}"))
    first = await (await client.get("/v1/sagas?limit=2")).json()
    assert first["next_cursor"] is not None
    rest = await (await client.get("/v1/sagas", params={"limit": "2", "cursor": first["next_cursor"]})).json()
    assert [i["id"] for i in first["items"] + rest["items"]] == ["p0", "p1", "p2"]


@pytest.mark.parametrize(
    ("steps", "errors"),
    [
        ([{}], [("steps[0].name", "Field required"), ("steps[0].action", "Field required")]),
        (["x"], [("steps[0]", "valid dictionary")]),
        ([], [("steps", "at least one step")]),
    ],
)
async def test_an_invalid_step_is_reported_once_where_it_is(
    api: tuple[TestClient, Env], steps: list[Any], errors: list[tuple[str, str]]
) -> None:
    client, _ = api
    resp = await client.post("/v1/sagas", json={"id": "v", "steps": steps})
    assert resp.status == 400
    got = (await resp.json())["errors"]
    assert [e["loc"] for e in got] == [loc for loc, _ in errors]
    assert all(fragment in e["msg"] for e, (_, fragment) in zip(got, errors, strict=True))


@pytest.fixture
async def pg_store() -> AsyncIterator[Any]:
    require_service("postgresql", "127.0.0.1", 5432)
    import asyncpg

    from saga.postgres_store import PostgresSagaStore

    name = f"fender_test_{uuid.uuid4().hex[:10]}"
    store = PostgresSagaStore(DSN, schema=name)
    await store.open()
    try:
        yield store
    finally:
        await store.close()
        conn = await asyncpg.connect(DSN)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        finally:
            await conn.close()


async def test_postgres_refuses_writes_for_a_deleted_saga_as_gone(pg_store: Any) -> None:
    saga = a_saga("p1")
    assert await pg_store.create(saga) is None
    saga.status = "failed"  # terminal: the lease is released, so a retry must claim it again
    await pg_store.save(saga, [0])
    assert await pg_store.delete("p1") == "deleted"
    saga.status = "compensating"
    with pytest.raises(SagaGone):  # not "driven by another replica": there is nothing to drive
        await pg_store.save(saga, [0])
    assert await pg_store.get("p1") is None


async def test_postgres_rejects_a_forged_cursor(pg_store: Any) -> None:
    with pytest.raises(ValueError, match="cursor"):
        await pg_store.page(None, 10, "czk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5")
