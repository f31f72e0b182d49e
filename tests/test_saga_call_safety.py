"""Saga calls cannot smuggle requests, and always carry a Host."""

from __future__ import annotations

from aiohttp import web


async def recording_upstream(aiohttp_server):
    seen: list[web.Request] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request)
        await request.read()
        return web.json_response({"id": "r1"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = await aiohttp_server(app)
    return server, seen


async def test_control_characters_from_input_fail_the_step_not_the_upstream(aiohttp_server, start_fender, http):
    server, seen = await recording_upstream(aiohttp_server)
    fender = await start_fender(
        f"routes: [{{name: inv, match: {{host: inv}}, upstream: 'http://127.0.0.1:{server.port}'}}]",
        assemble=True,
    )
    saga = {
        "input": {"sku": "A1\r\nX-Injected: yes"},
        "steps": [{"name": "reserve", "action": {"route": "inv", "method": "POST", "path": "/r",
                                                  "headers": {"x-sku": "{{input.sku}}"}}}],
    }
    async with http.post(fender.admin_url + "/v1/sagas?wait=5", json=saga) as resp:
        record = await resp.json()
    assert record["status"] in ("failed", "compensated")
    assert record["error"]["kind"] == "template_error"
    assert seen == []


async def test_preserve_host_route_gets_the_upstream_host_from_sagas(aiohttp_server, start_fender, http):
    server, seen = await recording_upstream(aiohttp_server)
    fender = await start_fender(
        f"routes: [{{name: inv, upstream: 'http://127.0.0.1:{server.port}', preserve_host: true}}]",
        assemble=True,
    )
    saga = {"steps": [{"name": "reserve", "action": {"route": "inv", "method": "POST", "path": "/r"}}]}
    async with http.post(fender.admin_url + "/v1/sagas?wait=5", json=saga) as resp:
        record = await resp.json()
    assert record["status"] == "completed", record
    assert seen[0].headers["Host"] == f"127.0.0.1:{server.port}"
