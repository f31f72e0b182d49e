"""The policies through the real data plane, against in-process upstreams that misbehave."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from bench.procs import free_port
from tests.support.raw_server import raw_server


class Flaky:
    """An upstream whose paths misbehave on purpose; it counts what reaches it."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.bodies: list[bytes] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        n = self.hits[path] = self.hits.get(path, 0) + 1
        self.bodies.append(await request.read())
        if path.startswith("/flap"):  # 503, 200, 503, 200, ... per path
            return web.Response(status=503 if n % 2 else 200, text=f"flap {n}")
        if path == "/retry-after-long":
            return web.Response(status=503, headers={"Retry-After": "120"}, text="later")
        if path == "/hang-once":
            if n == 1:
                await asyncio.sleep(5)
            return web.Response(text="ok")
        if path == "/hang":
            await asyncio.sleep(5)
        if path == "/fail":
            return web.Response(status=500, text="broken")
        if path == "/dribble":  # the head comes at once, the body slowly
            response = web.StreamResponse()
            await response.prepare(request)
            for _ in range(3):
                await response.write(b"x")
                await asyncio.sleep(0.1)
            await response.write_eof()
            return response
        return web.Response(text="ok")


CONFIG = """
version: 1
policies:
  shared-breaker:
    circuit_breaker: {{consecutive_failures: 2, open_for: 30s}}
routes:
  - name: retried
    match: {{host: retried}}
    upstream: {up}
    chain:
      - timeout: 3s
      - retry: {{attempts: 3, on: [connect-failure, reset, gateway-error, timeout], backoff: {{base: 1ms, max: 5ms}}}}
      - timeout: 200ms
  - name: guarded
    match: {{host: guarded}}
    upstream: {up}
    chain:
      - retry: {{attempts: 2, backoff: {{base: 1ms, max: 1ms}}}}
      - shared-breaker
  - name: limited
    match: {{host: limited}}
    upstream: {up}
    chain:
      - rate_limit: {{rate: 1/m, burst: 2}}
  - name: narrow
    match: {{host: narrow}}
    upstream: {up}
    chain:
      - bulkhead: {{max_concurrent: 1}}
      - timeout: 1s
  - name: cushioned
    match: {{host: cushioned}}
    upstream: {up}
    chain:
      - fallback: {{on: [upstream_unavailable, 5xx], status: 200, body: {{items: [], stale: true}}}}
      - retry: {{attempts: 2, backoff: {{base: 1ms, max: 1ms}}}}
  - name: down
    match: {{host: down}}
    upstream: http://127.0.0.1:{dead}
    chain:
      - retry: {{attempts: 3, backoff: {{base: 1ms, max: 1ms}}}}
"""


async def setup(aiohttp_server, start_fender):
    flaky = Flaky()
    server = await aiohttp_server(flaky.app())
    fender = await start_fender(CONFIG.format(up=f"http://127.0.0.1:{server.port}", dead=free_port()))
    return flaky, fender


async def get(http, fender, host, path, **kw):
    method = kw.pop("method", "GET")
    headers = {"Host": host, **kw.pop("headers", {})}
    async with http.request(method, fender.proxy_url + path, headers=headers, **kw) as resp:
        return resp.status, resp.headers, await resp.read()


async def test_a_flapping_upstream_is_retried_to_success(aiohttp_server, start_fender, http):
    flaky, fender = await setup(aiohttp_server, start_fender)
    status, headers, body = await get(http, fender, "retried", "/flap")
    assert (status, body) == (200, b"flap 2")
    assert headers["x-fender-attempts"] == "2"


async def test_post_is_retried_only_with_an_idempotency_key_and_its_body_replayed(aiohttp_server, start_fender, http):
    flaky, fender = await setup(aiohttp_server, start_fender)
    status, headers, _ = await get(http, fender, "retried", "/flap", method="POST", data=b"pay 10")
    assert (status, headers["x-fender-attempts"]) == (503, "1")
    status, headers, _ = await get(http, fender, "retried", "/flap-2", method="POST", data=b"pay 20",
                                   headers={"Idempotency-Key": "k-1"})
    assert (status, headers["x-fender-attempts"]) == (200, "2")
    assert flaky.bodies[-2:] == [b"pay 20", b"pay 20"]


async def test_per_attempt_timeout_then_a_fast_retry(aiohttp_server, start_fender, http):
    flaky, fender = await setup(aiohttp_server, start_fender)
    status, headers, body = await get(http, fender, "retried", "/hang-once")
    assert (status, body, headers["x-fender-attempts"]) == (200, b"ok", "2")


async def test_a_hanging_upstream_ends_in_504_after_all_attempts(aiohttp_server, start_fender, http):
    flaky, fender = await setup(aiohttp_server, start_fender)
    status, headers, body = await get(http, fender, "retried", "/hang")
    assert (status, headers["x-fender-error"], headers["x-fender-attempts"]) == (504, "timeout", "3")
    assert json.loads(body)["error"] == "timeout"


async def test_a_long_retry_after_returns_the_response_at_once(aiohttp_server, start_fender, http):
    flaky, fender = await setup(aiohttp_server, start_fender)
    status, headers, body = await get(http, fender, "retried", "/retry-after-long")
    assert (status, body, headers["Retry-After"]) == (503, b"later", "120")
    assert flaky.hits["/retry-after-long"] == 1


async def test_a_slow_body_is_not_a_timeout_once_the_head_arrived(aiohttp_server, start_fender, http):
    flaky, fender = await setup(aiohttp_server, start_fender)
    status, _, body = await get(http, fender, "retried", "/dribble")
    assert (status, body) == (200, b"xxx")


async def test_the_breaker_opens_and_stops_calling_the_upstream(aiohttp_server, start_fender, http):
    flaky, fender = await setup(aiohttp_server, start_fender)
    status, _, body = await get(http, fender, "guarded", "/fail")  # 500 is not retried by default
    assert (status, body) == (500, b"broken")
    await get(http, fender, "guarded", "/fail")
    status, headers, body = await get(http, fender, "guarded", "/fail")
    assert (status, headers["x-fender-error"]) == (503, "circuit_open")
    assert 1 <= int(headers["Retry-After"]) <= 30
    assert flaky.hits["/fail"] == 2


async def test_rate_limit_answers_429_with_ratelimit_fields(aiohttp_server, start_fender, http):
    flaky, fender = await setup(aiohttp_server, start_fender)
    for _ in range(2):
        assert (await get(http, fender, "limited", "/"))[0] == 200
    status, headers, _ = await get(http, fender, "limited", "/")
    assert (status, headers["x-fender-error"]) == (429, "rate_limited")
    assert 50 <= int(headers["Retry-After"]) <= 60
    assert headers["RateLimit-Policy"] == '"rate_limit";q=2;w=120'
    assert headers["RateLimit"].startswith('"rate_limit";r=0;t=')
    assert flaky.hits["/"] == 2


async def test_bulkhead_rejects_the_second_concurrent_call(aiohttp_server, start_fender, http):
    flaky, fender = await setup(aiohttp_server, start_fender)
    first = asyncio.create_task(get(http, fender, "narrow", "/hang"))
    await asyncio.sleep(0.2)
    status, headers, _ = await get(http, fender, "narrow", "/")
    assert (status, headers["x-fender-error"]) == (503, "bulkhead_full")
    assert (await first)[0] == 504


async def test_fallback_serves_json_when_the_upstream_fails(aiohttp_server, start_fender, http):
    flaky, fender = await setup(aiohttp_server, start_fender)
    status, headers, body = await get(http, fender, "cushioned", "/fail")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == {"items": [], "stale": True}


async def test_connection_refused_is_retried_then_502(aiohttp_server, start_fender, http):
    _, fender = await setup(aiohttp_server, start_fender)
    status, headers, _ = await get(http, fender, "down", "/")
    assert (status, headers["x-fender-error"], headers["x-fender-attempts"]) == (502, "upstream_unavailable", "3")


async def test_a_reset_is_retried(start_fender, http):
    resets = 0

    async def slam_once(reader, writer):
        nonlocal resets
        await reader.readuntil(b"\r\n\r\n")
        if resets == 0:
            resets += 1
            writer.transport.abort()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server, port = await raw_server(slam_once)
    fender = await start_fender(f"""
        routes:
          - name: resetting
            upstream: http://127.0.0.1:{port}
            chain: [{{retry: {{backoff: {{base: 1ms, max: 1ms}}}}}}]
    """)
    status, headers, body = await get(http, fender, "x", "/")
    assert (status, body, headers["x-fender-attempts"]) == (200, b"ok", "2")
    server.close()
