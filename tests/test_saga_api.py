"""`/v1/sagas` over HTTP: validation, idempotent create, wait, paging, cancel, retry, delete."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from config.saga_models import SagaTemplateModel
from saga.invoker import RouteResponse
from saga.model import iso
from saga.openapi import openapi_fragment
from tests.test_saga_coordinator import Env, reply, saga_body


@pytest.fixture
async def api(env: Env, aiohttp_client: Any) -> tuple[TestClient, Env]:
    env.templates["place-order"] = SagaTemplateModel.model_validate(
        {"steps": saga_body()["steps"], "deadline": "1m"}
    )
    return await env.client(aiohttp_client), env


async def test_create_answers_202_with_location_and_the_record(api: tuple[TestClient, Env]) -> None:
    client, env = api
    hold = asyncio.Event()

    async def held() -> RouteResponse:
        await hold.wait()
        return reply(200)

    env.participant.on("reserve:action", held)
    resp = await client.post("/v1/sagas", json=saga_body("order-42"))
    assert resp.status == 202
    assert resp.headers["Location"] == "/v1/sagas/order-42"
    record = await resp.json()
    assert record["id"] == "order-42" and record["status"] in ("pending", "running")
    assert record["total_steps"] == 3
    hold.set()
    resp = await client.get("/v1/sagas/order-42?wait=5")
    assert (await resp.json())["status"] == "completed"


async def test_wait_answers_200_when_the_saga_finishes_in_time(api: tuple[TestClient, Env]) -> None:
    client, _ = api
    resp = await client.post("/v1/sagas?wait=5", json=saga_body())
    assert resp.status == 200
    assert (await resp.json())["status"] == "completed"


async def test_create_without_id_generates_one(api: tuple[TestClient, Env]) -> None:
    client, _ = api
    body = saga_body()
    del body["id"]
    resp = await client.post("/v1/sagas?wait=5", json=body)
    record = await resp.json()
    assert len(record["id"]) == 32
    assert resp.headers["Location"] == f"/v1/sagas/{record['id']}"


async def test_create_from_a_template(api: tuple[TestClient, Env]) -> None:
    client, env = api
    resp = await client.post("/v1/sagas?wait=5", json={"id": "t", "template": "place-order", "input": {"a": 1}})
    record = await resp.json()
    assert record["status"] == "completed", record
    assert record["template"] == "place-order" and record["input"] == {"a": 1}
    assert record["deadline_at"] is not None
    assert env.participant.keys()[0] == "t:reserve:action"


async def test_idempotent_create(api: tuple[TestClient, Env]) -> None:
    client, env = api
    first = await client.post("/v1/sagas?wait=5", json=saga_body("same"))
    assert first.status == 200
    again = await client.post("/v1/sagas", json=saga_body("same"))
    assert again.status == 200
    assert (await again.json())["status"] == "completed"
    assert len(env.participant.calls) == 3  # nothing ran twice
    other = saga_body("same", input={"sku": "B2"})
    conflict = await client.post("/v1/sagas", json=other)
    assert conflict.status == 409
    assert (await conflict.json())["error"] == "saga_exists"


@pytest.mark.parametrize(
    ("mutate", "loc", "fragment"),
    [
        (lambda b: b["steps"][1]["action"].update(route="x"), "steps[1].action.route", "unknown route 'x'"),
        (lambda b: b["steps"][2].update(name="reserve"), "steps[2].name", "duplicate step name 'reserve'"),
        (lambda b: b["steps"][0]["action"].update(path="/a/{{input.sku"), "steps[0].action.path", "malformed"),
        (lambda b: b["steps"][0]["action"].update(body={"k": "{{secret.x}}"}), "steps[0].action.body", "unknown placeholder"),
        (lambda b: b["steps"][0].update(timeout="5 parsecs"), "steps[0].timeout", "invalid duration"),
        (lambda b: b.update(deadline="soon"), "deadline", "invalid duration"),
        # (a deadline past year 9999 once ran the saga, then broke its record and the listing)
        (lambda b: b.update(deadline="99999999h"), "deadline", "at most 365 days"),
        (lambda b: b.update(deadline=1e308), "deadline", "at most 365 days"),
        (lambda b: b.update(input={"x": json.loads("[" * 100 + "]" * 100)}), "", "nests deeper than 64 levels"),
        (lambda b: b["steps"][0]["action"].update(body={"k": "{{steps.ship.response.body.id}}"}),
         "steps[0].action.body.k", "later step 'ship'"),
        (lambda b: b["steps"][0].update(colour="red"), "steps[0].colour", "unknown key"),
        (lambda b: b.update(on_recovery="pray"), "on_recovery", "compensate"),
        (lambda b: b.update(template="nope"), "template", "unknown saga template 'nope'"),
        (lambda b: b.pop("steps"), "", "give either 'template'"),
        (lambda b: b.update(id="bad id/"), "id", "pattern"),
    ],
)
async def test_invalid_definitions_are_rejected_with_located_errors(
    api: tuple[TestClient, Env], mutate: Any, loc: str, fragment: str
) -> None:
    client, env = api
    body = saga_body()
    mutate(body)
    resp = await client.post("/v1/sagas", json=body)
    assert resp.status == 400
    data = await resp.json()
    assert data["error"] == "invalid_saga"
    assert any(e["loc"] == loc and fragment in e["msg"] for e in data["errors"]), data["errors"]
    assert env.participant.calls == []  # nothing ran
    assert (await client.get("/v1/sagas")).status == 200
    assert (await (await client.get("/v1/sagas")).json())["items"] == []


async def test_a_body_that_is_not_json_is_rejected(api: tuple[TestClient, Env]) -> None:
    client, _ = api
    resp = await client.post("/v1/sagas", data=b"{nope", headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_saga"


async def test_a_body_nested_past_the_json_decoder_is_rejected(api: tuple[TestClient, Env]) -> None:
    client, _ = api
    resp = await client.post("/v1/sagas", data=b"[" * 100_000 + b"]" * 100_000,
                             headers={"Content-Type": "application/json"})
    assert resp.status == 400  # the client's error, not 503 saga_store_unavailable
    assert (await resp.json())["error"] == "invalid_saga"


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1.5e400"])
async def test_a_body_with_nan_or_infinity_is_rejected(api: tuple[TestClient, Env], constant) -> None:
    # (Python's decoder takes them; the record would then be answered as invalid JSON)
    client, env = api
    body = json.dumps(saga_body("nan")).encode().replace(b'"input": {', b'"input": {"x": ' + constant + b", ", 1)
    resp = await client.post("/v1/sagas", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_saga"
    assert env.participant.calls == []


def test_a_participants_body_with_a_non_json_constant_is_recorded_as_text():
    from saga.coordinator import response_record

    record = response_record(RouteResponse(200, {"Content-Type": "application/json"}, b'{"x": NaN}'))
    assert record["body"] == '{"x": NaN}'
    json.loads(json.dumps(record), parse_constant=lambda c: pytest.fail(f"{c} in the record"))


def test_a_participants_body_with_a_number_past_float_range_is_recorded_as_text():
    # (1e999 is JSON, but Python's decoder makes it inf: the record was answered with a bare Infinity)
    from saga.coordinator import response_record

    record = response_record(RouteResponse(200, {"Content-Type": "application/json"}, b'{"x": 1e999}'))
    assert record["body"] == '{"x": 1e999}'
    json.loads(json.dumps(record), parse_constant=lambda c: pytest.fail(f"{c} in the record"))


def test_a_journaled_deadline_past_year_9999_still_shows():
    # (journals written before durations were bounded may hold one)
    assert iso(1e308) == "9999-12-31T23:59:59.999Z"
    assert iso(1795278278.145) == "2026-11-21T16:24:38.145Z"


async def test_listing_pages_with_a_cursor_and_filters_by_status(api: tuple[TestClient, Env]) -> None:
    client, env = api
    env.participant.on("ship:action", 500, 200)  # only the first saga fails
    for i in range(5):
        resp = await client.post("/v1/sagas?wait=5", json=saga_body(f"s{i}"))
        assert resp.status == 200
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        url = "/v1/sagas?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = await (await client.get(url)).json()
        seen += [item["id"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"s{i}" for i in range(5)]
    assert pages == 3
    compensated = await (await client.get("/v1/sagas?status=compensated")).json()
    assert [i["id"] for i in compensated["items"]] == ["s0"]
    both = await (await client.get("/v1/sagas?status=compensated,completed&limit=10")).json()
    assert len(both["items"]) == 5 and both["next_cursor"] is None
    assert (await client.get("/v1/sagas?status=weird")).status == 400
    assert (await client.get("/v1/sagas?limit=0")).status == 400
    assert (await client.get("/v1/sagas?cursor=@@@")).status == 400


async def test_get_and_delete(api: tuple[TestClient, Env]) -> None:
    client, env = api
    assert (await client.get("/v1/sagas/missing")).status == 404
    assert (await client.delete("/v1/sagas/missing")).status == 404
    hold = asyncio.Event()

    async def held() -> RouteResponse:
        await hold.wait()
        return reply(200)

    env.participant.on("reserve:action", held)
    await client.post("/v1/sagas", json=saga_body("busy"))
    resp = await client.delete("/v1/sagas/busy")
    assert resp.status == 409
    hold.set()
    assert (await (await client.get("/v1/sagas/busy?wait=5")).json())["status"] == "completed"
    assert (await client.delete("/v1/sagas/busy")).status == 204
    assert (await client.get("/v1/sagas/busy")).status == 404


async def test_cancel_over_http(api: tuple[TestClient, Env]) -> None:
    client, env = api
    hold = asyncio.Event()

    async def held() -> RouteResponse:
        await hold.wait()
        return reply(200)

    env.participant.on("charge:action", held)
    await client.post("/v1/sagas", json=saga_body("c"))
    for _ in range(200):
        if "c:charge:action" in env.participant.keys():
            break
        await asyncio.sleep(0.005)
    resp = await client.post("/v1/sagas/c/cancel?wait=5")
    assert resp.status == 200
    record = await resp.json()
    assert record["status"] == "compensated"
    assert record["error"]["kind"] == "cancelled"
    again = await client.post("/v1/sagas/c/cancel")
    assert again.status == 409
    assert (await client.post("/v1/sagas/none/cancel")).status == 404


async def test_retry_over_http(api: tuple[TestClient, Env]) -> None:
    client, env = api
    env.participant.on("ship:action", 500)
    env.participant.on("reserve:compensation", 503)
    record = await (await client.post("/v1/sagas?wait=5", json=saga_body("r"))).json()
    assert record["status"] == "failed"
    env.participant.on("reserve:compensation", 204)
    resp = await client.post("/v1/sagas/r/retry?wait=5")
    assert resp.status == 200
    assert (await resp.json())["status"] == "compensated"
    assert (await client.post("/v1/sagas/r/retry")).status == 409
    assert (await client.post("/v1/sagas/none/retry")).status == 404


def test_openapi_fragment_names_every_operation() -> None:
    doc = openapi_fragment()
    paths = doc["paths"]
    assert set(paths) == {"/v1/sagas", "/v1/sagas/{id}", "/v1/sagas/{id}/cancel", "/v1/sagas/{id}/retry"}
    assert set(paths["/v1/sagas"]) == {"get", "post"}
    assert set(paths["/v1/sagas/{id}"]) == {"get", "delete"}
    schemas = doc["components"]["schemas"]
    assert {"SagaRequest", "SagaRecord", "SagaPage", "SagaError"} <= set(schemas)
    assert "steps" in schemas["SagaRecord"]["properties"]


def test_openapi_fragment_refs_resolve_in_the_admin_document() -> None:
    from proxy.openapi import openapi_document

    doc = openapi_document()
    assert doc["paths"]["/v1/sagas"]["post"]["tags"] == ["sagas"]

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
            return own + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    schemas = doc["components"]["schemas"]
    missing = {r for r in refs(doc) if r.removeprefix("#/components/schemas/") not in schemas}
    assert missing == set()
    request = schemas["SagaRequestModel"]
    assert {"id", "template", "input", "steps", "deadline", "on_recovery"} <= set(request["properties"])


async def test_a_failing_journal_is_a_503_with_a_json_body(api: tuple[TestClient, Env]) -> None:
    client, env = api

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk I/O error")

    env.service.store.create = broken  # type: ignore[method-assign]
    resp = await client.post("/v1/sagas", json=saga_body("x"))
    assert resp.status == 503
    assert (await resp.json())["error"] == "saga_store_unavailable"


@pytest.mark.parametrize("password", ["pa#ss", "pa/ss", "pa?ss"])
async def test_a_store_that_cannot_open_never_shows_a_password_with_reserved_characters(password: str) -> None:
    # (asyncpg reads `app:pa` as a host and a port when the password is not percent-encoded, and
    # its error quotes the "port": the password's first part)
    from saga.service import SagaService
    from saga.store import StoreOpenFailed

    service = SagaService(f"postgresql://app:{password}@127.0.0.1:9/test", None, dict)  # type: ignore[arg-type]
    with pytest.raises(StoreOpenFailed) as failed:
        await service.start()
    message = str(failed.value)
    assert message.startswith("FENDER_SAGA_STORE postgresql://app:<redacted>@127.0.0.1:9/test: cannot open"), message
    assert password not in message and "'pa'" not in message and "ss@" not in message, message
