"""Sagas through real routes: an in-process Fender (admin API + chains) and an aiohttp upstream.

What the participant saw, in order and with which Idempotency-Key, is the assertion.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from config.settings import Settings
from proxy.app import FenderApp
from saga.wiring import install

STEPS = ("reserve", "charge", "ship")


class Shop:
    """One upstream playing three participants. `fail` maps "METHOD /step" to a status."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str, str]] = []  # (method, path, idempotency key, saga id)
        self.fail: dict[str, int] = {}
        self.slow: dict[str, float] = {}

    async def handle(self, request: web.Request) -> web.Response:
        key = f"{request.method} {request.path.rsplit('/', 1)[0] if request.method == 'DELETE' else request.path}"
        self.seen.append(
            (request.method, request.path, request.headers.get("Idempotency-Key", ""),
             request.headers.get("x-fender-saga-id", ""))
        )
        if key in self.slow:
            await asyncio.sleep(self.slow[key])
        if key in self.fail:
            return web.json_response({"error": "nope"}, status=self.fail[key])
        body = await request.json() if request.can_read_body else None
        return web.json_response({"id": f"{request.path.strip('/')}-1", "got": body}, status=201)

    def keys(self) -> list[str]:
        return [s[2] for s in self.seen]


CONFIG = """
version: 1
routes:
  - name: inventory
    match: {{host: inventory}}
    upstream: {url}
    chain: [{{timeout: 5s}}]
  - name: payments
    match: {{host: payments}}
    upstream: {url}
    chain: [{{timeout: 5s}}, {{retry: {{attempts: 2}}}}]
  - name: shipping
    match: {{host: shipping}}
    upstream: {url}
"""
ROUTES = {"reserve": "inventory", "charge": "payments", "ship": "shipping"}


def body(saga_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": saga_id,
        "input": {"sku": "A1", "amount": 10},
        "steps": [
            {
                "name": name,
                "action": {"route": ROUTES[name], "method": "POST", "path": f"/{name}",
                           "body": {"sku": "{{input.sku}}", "amount": "{{input.amount}}"}},
                "compensation": {"route": ROUTES[name], "method": "DELETE", "path": f"/{name}/{{{{saga.id}}}}"},
                "timeout": "2s",
            }
            for name in STEPS
        ],
        "compensation_retry": {"attempts": 3, "base": "10ms", "max": "20ms"},
        **extra,
    }


@pytest.fixture
async def shop_fender(aiohttp_server: Any, tmp_path: Path) -> AsyncIterator[tuple[Shop, str, aiohttp.ClientSession]]:
    shop = Shop()
    upstream = web.Application()
    upstream.router.add_route("*", "/{tail:.*}", shop.handle)
    server = await aiohttp_server(upstream)
    path = tmp_path / "fender.yaml"
    path.write_text(CONFIG.format(url=f"http://127.0.0.1:{server.port}"))
    settings = Settings(
        config=str(path), proxy_addr="127.0.0.1:0", admin_addr="127.0.0.1:0", metrics_addr="127.0.0.1:0",
        data_dir=str(tmp_path / "data"), access_log=False,
    )
    fender = FenderApp(settings)
    fender.load_initial()
    install(fender)  # only the saga part, as `proxy.assemble` does
    await fender.start()
    host, port = fender.addresses["admin"]
    session = aiohttp.ClientSession()
    try:
        yield shop, f"http://{host}:{port}", session
    finally:
        await session.close()
        await fender.stop()


async def post(session: aiohttp.ClientSession, url: str, data: Any = None) -> tuple[int, Any]:
    async with session.post(url, json=data) as resp:
        return resp.status, await resp.json()


async def test_success_through_real_routes(shop_fender: tuple[Shop, str, aiohttp.ClientSession]) -> None:
    shop, admin, session = shop_fender
    status, record = await post(session, f"{admin}/v1/sagas?wait=10", body("ok"))
    assert status == 200 and record["status"] == "completed", record
    assert shop.seen == [
        ("POST", "/reserve", "ok:reserve:action", "ok"),
        ("POST", "/charge", "ok:charge:action", "ok"),
        ("POST", "/ship", "ok:ship:action", "ok"),
    ]
    assert record["steps"][0]["response"]["body"] == {"id": "reserve-1", "got": {"sku": "A1", "amount": 10}}


@pytest.mark.parametrize("fail_at", [0, 1, 2])
async def test_failure_at_each_position_compensates_in_reverse(
    shop_fender: tuple[Shop, str, aiohttp.ClientSession], fail_at: int
) -> None:
    shop, admin, session = shop_fender
    shop.fail[f"POST /{STEPS[fail_at]}"] = 422
    status, record = await post(session, f"{admin}/v1/sagas?wait=10", body("f"))
    assert record["status"] == "compensated", record
    expected = [("POST", f"/{s}", f"f:{s}:action", "f") for s in STEPS[: fail_at + 1]]
    expected += [("DELETE", f"/{s}/f", f"f:{s}:compensation", "f") for s in reversed(STEPS[:fail_at])]
    assert shop.seen == expected


async def test_step_timeout_through_a_route_compensates_that_step(
    shop_fender: tuple[Shop, str, aiohttp.ClientSession],
) -> None:
    shop, admin, session = shop_fender
    shop.slow["POST /charge"] = 1.0
    saga = body("t")
    saga["steps"][1]["timeout"] = "150ms"
    status, record = await post(session, f"{admin}/v1/sagas?wait=10", saga)
    assert record["status"] == "compensated", record
    assert record["steps"][1]["error"]["kind"] == "timeout"
    assert shop.keys() == ["t:reserve:action", "t:charge:action", "t:charge:compensation", "t:reserve:compensation"]


async def test_parked_compensation_then_retry_when_the_participant_recovers(
    shop_fender: tuple[Shop, str, aiohttp.ClientSession],
) -> None:
    shop, admin, session = shop_fender
    shop.fail["POST /ship"] = 500
    shop.fail["DELETE /charge"] = 503
    status, record = await post(session, f"{admin}/v1/sagas?wait=10", body("p"))
    assert record["status"] == "failed", record
    assert record["steps"][1]["compensation"]["attempts"] == 3
    assert "p:reserve:compensation" not in shop.keys()
    del shop.fail["DELETE /charge"]
    status, record = await post(session, f"{admin}/v1/sagas/p/retry?wait=10")
    assert status == 200 and record["status"] == "compensated", record
    assert shop.keys()[-2:] == ["p:charge:compensation", "p:reserve:compensation"]
    # the payments route's own retry (attempts: 2, 503 is a gateway error) ran inside each of
    # the 3 saga attempts, then the retried one succeeded: 7 calls, all under the same key
    assert shop.keys().count("p:charge:compensation") == 7


async def test_cancel_and_deadline_through_real_routes(shop_fender: tuple[Shop, str, aiohttp.ClientSession]) -> None:
    shop, admin, session = shop_fender
    shop.slow["POST /charge"] = 5.0
    status, record = await post(session, f"{admin}/v1/sagas", body("c"))
    assert status == 202
    for _ in range(400):
        if "c:charge:action" in shop.keys():
            break
        await asyncio.sleep(0.005)
    status, record = await post(session, f"{admin}/v1/sagas/c/cancel?wait=10")
    assert status == 200 and record["status"] == "compensated" and record["error"]["kind"] == "cancelled"

    saga = body("d", deadline="300ms")
    status, record = await post(session, f"{admin}/v1/sagas?wait=10", saga)
    assert record["status"] == "compensated", record
    assert record["error"]["kind"] == "deadline_exceeded"
    assert shop.keys()[-2:] == ["d:charge:compensation", "d:reserve:compensation"]


async def test_unknown_route_is_a_located_400(shop_fender: tuple[Shop, str, aiohttp.ClientSession]) -> None:
    shop, admin, session = shop_fender
    saga = body("u")
    saga["steps"][1]["action"]["route"] = "x"
    status, data = await post(session, f"{admin}/v1/sagas", saga)
    assert status == 400
    assert {"loc": "steps[1].action.route", "msg": "unknown route 'x'"} in data["errors"]
    assert shop.seen == []
