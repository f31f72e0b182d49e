"""The admin API of SPEC section 7: config, reload, routes, breakers, OpenAPI, and its guard."""

from __future__ import annotations

import asyncio
import sys
import types
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.admin_api import auth_middleware, is_loopback
from proxy.openapi import openapi_document


async def upstream_app(aiohttp_server: Any, hold: asyncio.Event | None = None,
                       held: asyncio.Event | None = None) -> Any:
    async def ok(request: web.Request) -> web.Response:
        if request.path == "/hold" and hold is not None and held is not None:
            held.set()
            await hold.wait()
        return web.Response(text="ok")

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500, text="boom")

    app = web.Application()
    app.router.add_get("/fail", fail)
    app.router.add_route("*", "/{tail:.*}", ok)
    return await aiohttp_server(app)


def config(port: int, *, extra_route: str = "", fallback_auth: str = "Bearer s3cr3t-token") -> str:
    return f"""
version: 1
policies:
  shared-breaker:
    circuit_breaker: {{consecutive_failures: 2, open_for: 60s}}
routes:
  - name: api
    match: {{host: api, headers: {{x-api-key: "k3y-value"}}}}
    upstream: http://127.0.0.1:{port}
    chain:
      - rate_limit: {{rate: 1/m, burst: 5}}
      - bulkhead: {{max_concurrent: 4}}
      - shared-breaker
  - name: other
    match: {{host: other}}
    upstream: http://127.0.0.1:{port}
    chain:
      - circuit_breaker: {{consecutive_failures: 1, open_for: 60s}}
      - fallback: {{on: [5xx], status: 503, headers: {{authorization: "{fallback_auth}", x-kind: fallback}}}}
  - name: creds
    match: {{host: creds}}
    upstream: http://user:hunter2@127.0.0.1:{port}
{extra_route}
"""


async def test_get_config_shows_hash_source_and_redacted_config(
    start_fender: Any, aiohttp_server: Any, http: aiohttp.ClientSession
) -> None:
    up = await upstream_app(aiohttp_server)
    fender = await start_fender(config(up.port), assemble=True)
    async with http.get(f"{fender.admin_url}/config") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["hash"] == fender.app.runtime.hash
    assert body["source"] == str(fender.config_path)
    assert body["loaded_at"] > 0
    assert body["last_reload"]["ok"] is True and body["last_reload"]["errors"] == []
    text = str(body["config"])
    for secret in ("hunter2", "s3cr3t-token", "k3y-value"):
        assert secret not in text
    api = body["config"]["routes"][0]
    creds = body["config"]["routes"][2]
    assert creds["upstream"] == f"http://user:<redacted>@127.0.0.1:{up.port}"
    # what is not secret stays readable
    assert body["config"]["routes"][1]["chain"][1]["fallback"]["headers"]["x-kind"] == "fallback"
    assert api["chain"][0] == {"rate_limit": {"rate": "1/m", "burst": 5}}


async def test_post_reload_answers_ok_or_located_errors_and_keeps_last_good(
    start_fender: Any, aiohttp_server: Any, http: aiohttp.ClientSession
) -> None:
    up = await upstream_app(aiohttp_server)
    fender = await start_fender(config(up.port), assemble=True)
    seen: list[str] = []
    fender.app.reload_listeners.append(lambda result: seen.append(result.result))
    old_hash = fender.app.runtime.hash

    async with http.post(f"{fender.admin_url}/config/reload") as resp:
        assert resp.status == 200
        assert await resp.json() == {"ok": True, "hash": old_hash, "result": "unchanged"}

    fender.config_path.write_text(config(up.port, extra_route="""
  - name: added
    upstream: http://127.0.0.1:1
"""))
    async with http.post(f"{fender.admin_url}/config/reload") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["ok"] is True and body["hash"] != old_hash
    good_hash = body["hash"]
    assert "added" in fender.app.runtime.routes

    fender.config_path.write_text(config(up.port, extra_route="""
  - name: api
    upstream: http://127.0.0.1:1
    chain: [no-such-policy]
"""))
    async with http.post(f"{fender.admin_url}/config/reload") as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["ok"] is False
    locs = {e["loc"] for e in body["errors"]}
    assert {"routes[3].name", "routes[3].chain[0]"} <= locs
    assert all(e["msg"] for e in body["errors"])
    assert fender.app.runtime.hash == good_hash

    async with http.get(f"{fender.admin_url}/config") as resp:
        view = await resp.json()
    assert view["hash"] == good_hash
    assert view["last_reload"]["ok"] is False
    assert view["last_reload"]["errors"] == body["errors"]
    assert [r["name"] for r in view["config"]["routes"]] == ["api", "other", "creds", "added"]
    assert seen == ["unchanged", "success", "failure"]

    # the good config still serves
    async with http.get(f"{fender.proxy_url}/x", headers={"Host": "other"}) as resp:
        assert resp.status == 200


async def test_routes_show_chains_with_live_state(
    start_fender: Any, aiohttp_server: Any, http: aiohttp.ClientSession
) -> None:
    hold, held = asyncio.Event(), asyncio.Event()
    up = await upstream_app(aiohttp_server, hold, held)
    fender = await start_fender(config(up.port), assemble=True)
    api_headers = {"Host": "api", "x-api-key": "k3y-value"}
    for _ in range(2):
        async with http.get(f"{fender.proxy_url}/x", headers=api_headers) as resp:
            assert resp.status == 200
    async with http.get(f"{fender.proxy_url}/fail", headers={"Host": "other"}) as resp:
        assert resp.status == 503  # the fallback answered; the breaker counted the 500

    async def held_request() -> int:
        async with http.get(f"{fender.proxy_url}/hold", headers=api_headers) as resp:
            return resp.status

    task = asyncio.create_task(held_request())
    await asyncio.wait_for(held.wait(), 5)
    async with http.get(f"{fender.admin_url}/routes") as resp:
        assert resp.status == 200
        body = await resp.json()
    hold.set()
    assert await task == 200
    routes = {r["name"]: r for r in body["routes"]}
    assert list(routes) == ["api", "other", "creds"]
    api = routes["api"]
    assert [p["kind"] for p in api["chain"]] == ["rate_limit", "bulkhead", "circuit_breaker"]
    limit, bulkhead, breaker = api["chain"]
    assert 1.9 < limit["tokens"] <= 2.1  # burst 5, three spent, refill of 1/m is negligible
    assert bulkhead["in_flight"] == 1 and api["in_flight"] == 1 and body["in_flight"] == 1
    assert breaker["state"] == "closed" and breaker["shared"] is True
    assert breaker["breaker"] == "shared-breaker"
    assert api["match"]["headers"]["x-api-key"] == "<redacted>"
    assert "hunter2" not in routes["creds"]["upstream"]
    other_breaker = routes["other"]["chain"][0]
    assert other_breaker["state"] == "open" and other_breaker["breaker"] == "other.circuit_breaker"
    assert routes["other"]["in_flight"] == 0


async def test_breaker_reset_closes_it_and_unknown_names_are_404(
    start_fender: Any, aiohttp_server: Any, http: aiohttp.ClientSession
) -> None:
    up = await upstream_app(aiohttp_server)
    fender = await start_fender(config(up.port), assemble=True)
    transitions: list[tuple[str, str, str]] = []

    def on_event(event: Any, ctx: Any) -> None:
        if event.name == "circuit_breaker_transition":
            transitions.append((ctx.route, event.from_state, event.to_state))

    fender.app.bus.subscribe(on_event)
    api_headers = {"Host": "api", "x-api-key": "k3y-value"}
    for _ in range(2):
        async with http.get(f"{fender.proxy_url}/fail", headers=api_headers) as resp:
            assert resp.status == 500
    async with http.get(f"{fender.proxy_url}/x", headers=api_headers) as resp:
        assert resp.status == 503 and resp.headers["x-fender-error"] == "circuit_open"

    async with http.get(f"{fender.admin_url}/breakers") as resp:
        names = {b["name"]: b for b in (await resp.json())["breakers"]}
    assert names["shared-breaker"]["state"] == "open"
    assert names["shared-breaker"]["routes"] == ["api"]
    assert names["other.circuit_breaker"]["state"] == "closed"

    async with http.post(f"{fender.admin_url}/breakers/shared-breaker/reset") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["state"] == "closed" and body["name"] == "shared-breaker"
    assert ("api", "open", "closed") in transitions
    async with http.get(f"{fender.proxy_url}/x", headers=api_headers) as resp:
        assert resp.status == 200

    async with http.post(f"{fender.admin_url}/breakers/nope/reset") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "not_found"
    async with http.post(f"{fender.admin_url}/breakers/other.circuit_breaker/reset") as resp:
        assert resp.status == 200
    # a route's only breaker answers to the route's name too, and the answer names it properly
    for route, breaker in (("other", "other.circuit_breaker"), ("api", "shared-breaker")):
        async with http.post(f"{fender.admin_url}/breakers/{route}/reset") as resp:
            assert resp.status == 200 and (await resp.json())["name"] == breaker
    async with http.post(f"{fender.admin_url}/breakers/creds/reset") as resp:
        assert resp.status == 404  # (a route with no breaker)


async def test_openapi_document_describes_the_admin_api(
    start_fender: Any, aiohttp_server: Any, http: aiohttp.ClientSession
) -> None:
    up = await upstream_app(aiohttp_server)
    fender = await start_fender(config(up.port), assemble=True)
    async with http.get(f"{fender.admin_url}/openapi.json") as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["openapi"].startswith("3.")
    for path in ("/config", "/config/reload", "/routes", "/breakers/{name}/reset", "/openapi.json",
                 "/v1/sagas", "/v1/sagas/{id}"):
        assert path in doc["paths"]
    reload_responses = doc["paths"]["/config/reload"]["post"]["responses"]
    assert {"200", "400", "401", "403"} <= set(reload_responses)
    # every $ref resolves
    refs = set(_refs(doc))
    assert refs and all(ref.rsplit("/", 1)[1] in doc["components"]["schemas"] for ref in refs)


def _refs(node: Any) -> Any:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_openapi_merges_the_saga_fragment(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("saga.openapi")
    fake.fragment = lambda: {  # type: ignore[attr-defined]
        "paths": {"/v1/sagas": {"post": {"summary": "start a saga", "responses": {"202": {"description": "x"}}}},
                  "/config": {"put": {"summary": "not a real call", "responses": {}}}},
        "components": {"schemas": {"Saga": {"type": "object"}}},
        "tags": [{"name": "sagas"}],
    }
    monkeypatch.setitem(sys.modules, "saga.openapi", fake)
    doc = openapi_document()
    assert doc["paths"]["/v1/sagas"]["post"]["summary"] == "start a saga"
    assert "get" in doc["paths"]["/config"] and "put" in doc["paths"]["/config"]
    assert "Saga" in doc["components"]["schemas"] and "ConfigIssue" in doc["components"]["schemas"]
    assert {"name": "sagas"} in doc["tags"]


# -- the guard --------------------------------------------------------------------------


def test_is_loopback() -> None:
    for address in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(address), address
    outside: list[str | None] = ["10.0.0.1", "192.168.1.2", "::ffff:10.0.0.1", "fe80::1", "", None, "localhost"]
    for remote in outside:
        assert not is_loopback(remote), remote


async def guarded_client(aiohttp_client: Any, token: str | None, peer: str) -> Any:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"done": True})

    app = web.Application(middlewares=[auth_middleware(token, peer=lambda request: peer)])
    app.router.add_route("*", "/thing", handler)
    return await aiohttp_client(app)


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_remote_mutation_without_configured_token_is_403(aiohttp_client: Any, method: str) -> None:
    client = await guarded_client(aiohttp_client, None, "10.1.2.3")
    resp = await client.request(method, "/thing", headers={"Authorization": "Bearer anything"})
    assert resp.status == 403
    assert (await resp.json())["error"] == "forbidden"


async def test_remote_mutation_needs_the_right_bearer_token(aiohttp_client: Any) -> None:
    client = await guarded_client(aiohttp_client, "correct-horse", "203.0.113.7")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic correct-horse"},
                    {"Authorization": "Bearer correct-hors"}, {"Authorization": "Bearer correct-horse2"}):
        resp = await client.post("/thing", headers=headers)
        assert resp.status == 401, headers
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    resp = await client.post("/thing", headers={"Authorization": "Bearer correct-horse"})
    assert resp.status == 200
    resp = await client.post("/thing", headers={"Authorization": "bearer correct-horse"})
    assert resp.status == 200


async def test_remote_reads_and_loopback_mutations_need_no_token(aiohttp_client: Any) -> None:
    remote = await guarded_client(aiohttp_client, "tok", "198.51.100.1")
    assert (await remote.get("/thing")).status == 200
    local = await guarded_client(aiohttp_client, None, "127.0.0.1")
    assert (await local.post("/thing")).status == 200


async def test_real_admin_listener_trusts_loopback_peers(
    start_fender: Any, aiohttp_server: Any, http: aiohttp.ClientSession
) -> None:
    up = await upstream_app(aiohttp_server)
    fender = await start_fender(config(up.port), assemble=True, admin_token="t0ken")
    async with http.post(f"{fender.admin_url}/config/reload") as resp:
        assert resp.status == 200
