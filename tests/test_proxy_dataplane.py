"""The data plane against in-process upstreams: routing, headers, errors, bodies."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from bench.procs import free_port
from tests.support.raw_server import raw_server


class Recorder:
    """An upstream that records what it received and answers from a script."""

    def __init__(self) -> None:
        self.requests: list[dict] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            {"method": request.method, "path": request.path_qs, "headers": request.headers.copy(), "body": body}
        )
        if request.path == "/status/503":
            return web.Response(status=503, text="busy")
        if request.path == "/hop":
            return web.Response(text="hop", headers={"Connection": "x-secret, keep-alive", "X-Secret": "1", "Keep-Alive": "timeout=5"})
        return web.json_response({"path": request.path_qs, "host": request.host}, headers={"x-up": "yes"})


async def start_upstream(aiohttp_server, recorder: Recorder):
    server = await aiohttp_server(recorder.app())
    return f"http://127.0.0.1:{server.port}"


CONFIG = """
version: 1
routes:
  - name: payments
    match: {{host: payments}}
    upstream: {up}
  - name: api
    match: {{host: "*.example.com", path_prefix: /api, methods: [GET, POST], headers: {{x-tenant: acme}}}}
    upstream: {up}
    strip_prefix: true
  - name: keephost
    match: {{host: keep.local}}
    upstream: {up}
    preserve_host: true
  - name: down
    match: {{host: down}}
    upstream: http://127.0.0.1:{dead}
"""


async def setup(aiohttp_server, start_fender):
    recorder = Recorder()
    up = await start_upstream(aiohttp_server, recorder)
    fender = await start_fender(CONFIG.format(up=up, dead=free_port()))
    return recorder, fender


async def test_forwards_by_host_and_marks_the_response(aiohttp_server, start_fender, http):
    recorder, fender = await setup(aiohttp_server, start_fender)
    async with http.get(fender.proxy_url + "/charge?x=1", headers={"Host": "payments"}) as resp:
        assert resp.status == 200
        assert resp.headers["x-fender-route"] == "payments"
        assert resp.headers["x-fender-attempts"] == "1"
        assert resp.headers["x-up"] == "yes"
        data = await resp.json()
    assert data["path"] == "/charge?x=1"
    # the upstream's own authority, not the client's Host, unless preserve_host
    assert data["host"].startswith("127.0.0.1:")
    assert len(recorder.requests) == 1


async def test_absolute_form_target_from_http_proxy_clients(aiohttp_server, start_fender, http):
    recorder, fender = await setup(aiohttp_server, start_fender)
    async with http.get("http://payments/v1/pay", proxy=fender.proxy_url) as resp:
        assert resp.status == 200
        assert resp.headers["x-fender-route"] == "payments"
    assert recorder.requests[0]["path"] == "/v1/pay"


async def test_no_route_is_404_and_never_forwarded(aiohttp_server, start_fender, http):
    recorder, fender = await setup(aiohttp_server, start_fender)
    async with http.get("http://evil.example.org/steal", proxy=fender.proxy_url) as resp:
        assert resp.status == 404
        assert resp.headers["x-fender-error"] == "no_route"
        body = await resp.json()
    assert body["error"] == "no_route" and body["route"] is None and body["message"]
    assert recorder.requests == []


async def test_connect_is_405_with_an_explanation(aiohttp_server, start_fender):
    _, fender = await setup(aiohttp_server, start_fender)
    reader, writer = await asyncio.open_connection(*fender.app.addresses["proxy"])
    writer.write(b"CONNECT payments:443 HTTP/1.1\r\nHost: payments:443\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405")
    assert b"x-fender-error: method_not_allowed" in head.lower()
    writer.close()


async def test_match_on_wildcard_prefix_method_and_header_with_strip_prefix(aiohttp_server, start_fender, http):
    recorder, fender = await setup(aiohttp_server, start_fender)
    headers = {"Host": "shop.example.com", "x-tenant": "acme"}
    async with http.get(fender.proxy_url + "/api/items/1", headers=headers) as resp:
        assert resp.headers["x-fender-route"] == "api"
    assert recorder.requests[-1]["path"] == "/items/1"
    async with http.delete(fender.proxy_url + "/api/items/1", headers=headers) as resp:
        assert resp.status == 404
    async with http.get(fender.proxy_url + "/api/items/1", headers={"Host": "shop.example.com"}) as resp:
        assert resp.status == 404
    assert len(recorder.requests) == 1


async def test_preserve_host(aiohttp_server, start_fender, http):
    _, fender = await setup(aiohttp_server, start_fender)
    async with http.get(fender.proxy_url + "/", headers={"Host": "keep.local"}) as resp:
        assert (await resp.json())["host"] == "keep.local"


async def test_hop_by_hop_headers_are_removed_both_ways(aiohttp_server, start_fender, http):
    recorder, fender = await setup(aiohttp_server, start_fender)
    headers = {
        "Host": "payments",
        "Connection": "keep-alive, X-Drop-Me",
        "X-Drop-Me": "secret",
        "Proxy-Authorization": "Basic abc",
        "TE": "trailers",
        "X-Keep": "1",
    }
    async with http.get(fender.proxy_url + "/hop", headers=headers) as resp:
        assert resp.status == 200
        assert "x-secret" not in resp.headers
        assert "keep-alive" not in resp.headers
    seen = recorder.requests[0]["headers"]
    assert "x-drop-me" not in seen
    assert "proxy-authorization" not in seen
    assert "te" not in seen
    assert seen["x-keep"] == "1"


async def test_request_id_added_when_absent_and_kept_when_present(aiohttp_server, start_fender, http):
    recorder, fender = await setup(aiohttp_server, start_fender)
    async with http.get(fender.proxy_url + "/", headers={"Host": "payments"}):
        pass
    async with http.get(fender.proxy_url + "/", headers={"Host": "payments", "x-request-id": "abc-123"}):
        pass
    first, second = (r["headers"]["x-request-id"] for r in recorder.requests)
    assert len(first) == 32 and first != "abc-123"
    assert second == "abc-123"


async def test_upstream_5xx_passes_through_as_is(aiohttp_server, start_fender, http):
    _, fender = await setup(aiohttp_server, start_fender)
    async with http.get(fender.proxy_url + "/status/503", headers={"Host": "payments"}) as resp:
        assert resp.status == 503
        assert await resp.text() == "busy"
        assert "x-fender-error" not in resp.headers
        assert resp.headers["x-fender-route"] == "payments"


async def test_connect_failure_is_502_upstream_unavailable(aiohttp_server, start_fender, http):
    _, fender = await setup(aiohttp_server, start_fender)
    async with http.get(fender.proxy_url + "/", headers={"Host": "down"}) as resp:
        assert resp.status == 502
        assert resp.headers["x-fender-error"] == "upstream_unavailable"
        assert resp.headers["x-fender-route"] == "down"
        assert resp.headers["x-fender-attempts"] == "1"
        body = json.loads(await resp.read())
    assert body == {"error": "upstream_unavailable", "route": "down", "message": body["message"]}


async def test_reset_before_response_is_502_upstream_reset(start_fender, http):
    async def slam(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()

    server, port = await raw_server(slam)
    fender = await start_fender(f"""
        routes:
          - name: flaky
            upstream: http://127.0.0.1:{port}
    """)
    async with http.get(fender.proxy_url + "/", headers={"Host": "x"}) as resp:
        assert resp.status == 502
        assert resp.headers["x-fender-error"] == "upstream_reset"
    server.close()


async def test_malformed_request_is_400_and_not_forwarded(aiohttp_server, start_fender):
    recorder, fender = await setup(aiohttp_server, start_fender)
    reader, writer = await asyncio.open_connection(*fender.app.addresses["proxy"])
    writer.write(b"GET / HTTP/1.1\r\nHost: payments\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello")
    await writer.drain()
    data = await reader.read()
    assert data.split(b" ", 2)[1] == b"400"
    assert b"x-fender-error: bad_request" in data.lower()
    assert b'"error": "bad_request"' in data
    assert recorder.requests == []
    writer.close()


async def test_request_body_is_forwarded(aiohttp_server, start_fender, http):
    recorder, fender = await setup(aiohttp_server, start_fender)
    async with http.post(fender.proxy_url + "/pay", data=b"x" * 300_000, headers={"Host": "payments"}) as resp:
        assert resp.status == 200

    async def gen():
        for _ in range(10):
            yield b"y" * 10_000

    async with http.post(fender.proxy_url + "/pay", data=gen(), headers={"Host": "payments"}) as resp:
        assert resp.status == 200
    assert recorder.requests[0]["body"] == b"x" * 300_000
    assert recorder.requests[1]["body"] == b"y" * 100_000


def half_body_upstream(declared: int, sent: int):
    async def half(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % declared + b"a" * sent)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    return half


async def test_small_body_cut_short_is_502_upstream_reset(start_fender, http):
    server, port = await raw_server(half_body_upstream(1000, 100))
    fender = await start_fender(f"""
        routes:
          - name: half
            upstream: http://127.0.0.1:{port}
    """)
    async with http.get(fender.proxy_url + "/", headers={"Host": "x"}) as resp:
        assert resp.status == 502
        assert resp.headers["x-fender-error"] == "upstream_reset"
    server.close()


async def test_large_body_cut_short_breaks_the_client_response(start_fender, http):
    server, port = await raw_server(half_body_upstream(10_000_000, 200_000))
    fender = await start_fender(f"""
        routes:
          - name: half
            upstream: http://127.0.0.1:{port}
    """)
    async with http.get(fender.proxy_url + "/", headers={"Host": "x"}) as resp:
        assert resp.status == 200  # the head was already relayed when the upstream broke off
        try:
            await resp.read()
        except aiohttp.ClientPayloadError:
            pass
        else:
            raise AssertionError("a truncated upstream body must not look complete")
    server.close()


async def test_health_and_readiness_on_metrics_listener(aiohttp_server, start_fender, http):
    _, fender = await setup(aiohttp_server, start_fender)
    async with http.get(fender.metrics_url + "/healthz") as resp:
        assert resp.status == 200
    async with http.get(fender.metrics_url + "/readyz") as resp:
        assert resp.status == 200
    fender.app.ready = False
    async with http.get(fender.metrics_url + "/readyz") as resp:
        assert resp.status == 503


async def in_front_of(handler, aiohttp_server, start_fender, upstream_settings: str = ""):
    """Fender with one route to an upstream that answers GET / with `handler`."""
    app = web.Application()
    app.router.add_get("/", handler)
    server = await aiohttp_server(app)
    extra = f", {upstream_settings}" if upstream_settings else ""
    return await start_fender(
        f"routes: [{{name: small, upstream: {{url: 'http://127.0.0.1:{server.port}'{extra}}}}}]"
    )


async def test_sequential_calls_reuse_one_upstream_connection(aiohttp_server, start_fender, http):
    # aiohttp 3.14 nudges a protocol with data_received(b"") after each body read; taking that
    # for stray bytes once closed every upstream connection after a single request
    peers: list = []

    async def hello(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(text="x" * 100)

    fender = await in_front_of(hello, aiohttp_server, start_fender)
    for _ in range(5):
        async with http.get(fender.proxy_url + "/", headers={"Host": "x"}) as resp:
            assert await resp.text() == "x" * 100
        await asyncio.sleep(0.01)  # let any close of the idle connection happen
    assert len(peers) == 5
    assert len(set(peers)) == 1


async def test_max_connections_bounds_the_upstream_pool(aiohttp_server, start_fender, http):
    peers: set = set()
    active = 0
    most = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal active, most
        peers.add(request.transport.get_extra_info("peername"))
        active += 1
        most = max(most, active)
        await asyncio.sleep(0.05)
        active -= 1
        return web.Response(text="ok")

    fender = await in_front_of(slow, aiohttp_server, start_fender, "max_connections: 2")

    async def call():
        async with http.get(fender.proxy_url + "/", headers={"Host": "x"}) as resp:
            assert resp.status == 200

    await asyncio.gather(*(call() for _ in range(8)))
    assert most == 2
    assert len(peers) == 2  # kept alive and reused, never more than two


async def test_credentials_in_the_upstream_url_become_basic_auth(aiohttp_server, start_fender, http):
    recorder = Recorder()
    server = await aiohttp_server(recorder.app())
    fender = await start_fender(f"""
        routes:
          - name: secret
            upstream: http://svc:s3cret@127.0.0.1:{server.port}
    """)
    async with http.get(fender.proxy_url + "/a", headers={"Host": "x"}) as resp:
        assert resp.status == 200
    async with http.get(fender.proxy_url + "/b", headers={"Host": "x", "Authorization": "Bearer mine"}) as resp:
        assert resp.status == 200
    first, second = recorder.requests
    assert first["headers"]["Authorization"] == aiohttp.BasicAuth("svc", "s3cret").encode()
    assert first["headers"]["Host"] == f"127.0.0.1:{server.port}"  # no credentials in Host
    assert second["headers"]["Authorization"] == "Bearer mine"


async def test_redis_backed_limit_without_redis_url_is_refused(start_fender, tmp_path):
    from config.loader import ConfigInvalid

    with pytest.raises(ConfigInvalid) as info:
        await start_fender("""
            routes:
              - name: limited
                upstream: http://127.0.0.1:9
                chain: [{rate_limit: {rate: 10/s, backend: redis}}]
        """)
    assert info.value.errors[0].loc == "routes[0].chain[0]"
    assert "FENDER_REDIS_URL" in info.value.errors[0].msg


async def test_missing_ca_file_is_a_located_config_error(start_fender):
    from config.loader import ConfigInvalid

    with pytest.raises(ConfigInvalid) as info:
        await start_fender("""
            routes:
              - name: tls
                upstream: {url: "https://127.0.0.1:9", tls: {ca_file: /nonexistent/ca.pem}}
        """)
    assert info.value.errors[0].loc == "routes[0].upstream.tls.ca_file"


async def test_a_large_max_body_is_buffered_and_replayed(start_fender, http, aiohttp_server):
    seen: list[int] = []

    async def flaky(request: web.Request) -> web.Response:
        seen.append(len(await request.read()))
        return web.Response(status=503 if len(seen) == 1 else 200)

    app = web.Application(client_max_size=0)
    app.router.add_put("/", flaky)
    server = await aiohttp_server(app)
    fender = await start_fender(f"""
        routes:
          - name: big
            upstream: http://127.0.0.1:{server.port}
            chain: [{{retry: {{attempts: 2, on: [5xx], max_body: 4MiB, backoff: {{base: 1ms, max: 1ms}}}}}}]
    """)
    async with http.put(fender.proxy_url + "/", data=b"b" * 3_000_000, headers={"Host": "x"}) as resp:
        assert resp.status == 200
        assert resp.headers["x-fender-attempts"] == "2"
    assert seen == [3_000_000, 3_000_000]
