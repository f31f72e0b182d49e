"""The proxy listener's own HTTP/1.1: keep-alive, pipelining, HTTP/1.0, framing, idle clients."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from proxy.server import encode_head


@pytest.fixture
async def upstream(aiohttp_server):
    async def answer(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.path == "/slow":
            await asyncio.sleep(0.6)  # longer than the keep-alive timeout the stall test sets
        if request.path == "/stream":
            response = web.StreamResponse()  # no length: chunked upstream
            await response.prepare(request)
            for part in (b"one,", b"two,", b"three"):
                await response.write(part)
            await response.write_eof()
            return response
        return web.Response(text=f"{request.method} {request.path_qs} {len(body)}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return await aiohttp_server(app)


@pytest.fixture
async def proxy(upstream, start_fender):
    return await start_fender(f"routes: [{{name: up, match: {{host: x}}, upstream: 'http://127.0.0.1:{upstream.port}'}}]")


async def exchange(fender, data: bytes, *, until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection(*fender.app.addresses["proxy"])
    writer.write(data)
    await writer.drain()
    async with asyncio.timeout(5):
        received = await reader.read() if until_close else await reader.readuntil(b"\r\n\r\n")
    writer.close()
    return received


async def test_pipelined_requests_are_answered_in_order_on_one_connection(proxy):
    requests = b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(5))
    data = await exchange(proxy, requests + b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    bodies = [part.split(b"\r\n\r\n", 1)[1][:20] for part in data.split(b"HTTP/1.1 200 OK")[1:]]
    assert [b.split(b" ")[1] for b in bodies] == [b"/0", b"/1", b"/2", b"/3", b"/4", b"/last"]
    assert data.count(b"Connection: close") == 1  # only the last answer ends the connection


async def test_http10_client_gets_a_length_and_the_connection_closes(proxy):
    data = await exchange(proxy, b"GET /old HTTP/1.0\r\nHost: x\r\n\r\n")
    head, body = data.split(b"\r\n\r\n", 1)
    assert b"Content-Length: %d" % len(body) in head
    assert b"Connection: close" in head
    assert body == b"GET /old 0"


async def test_http10_keep_alive_is_honoured(proxy):
    reader, writer = await asyncio.open_connection(*proxy.app.addresses["proxy"])
    for i in range(2):
        writer.write(b"GET /k%d HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n" % i)
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"Connection: keep-alive" in head
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        assert await reader.readexactly(length) == b"GET /k%d 0" % i
    writer.close()


async def test_unknown_length_is_chunked_for_http11_and_close_delimited_for_http10(proxy):
    data = await exchange(proxy, b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, body = data.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head
    assert body.endswith(b"0\r\n\r\n") and b"three" in body
    data = await exchange(proxy, b"GET /stream HTTP/1.0\r\nHost: x\r\n\r\n")
    head, body = data.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding" not in head and b"Content-Length" not in head
    assert body == b"one,two,three"


async def test_head_keeps_the_upstream_length_and_sends_no_body(proxy):
    data = await exchange(proxy, b"HEAD /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, body = data.split(b"\r\n\r\n", 1)
    assert b"Content-Length: 9" in head  # the upstream's length of "HEAD /h 0"
    assert body == b""


async def test_an_answer_before_the_upload_ends_is_read_by_the_client_then_the_connection_closes(proxy):
    # the rest of the body must not be parsed as a request, and closing at once would reset
    # the connection under a client still sending (it might never read the 404)
    reader, writer = await asyncio.open_connection(*proxy.app.addresses["proxy"])
    writer.write(b"POST / HTTP/1.1\r\nHost: nowhere\r\nContent-Length: 100000\r\n\r\n" + b"G" * 1000)
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 404") and b"Connection: close" in head
        writer.write((b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4000)[:99000])  # the body's rest
        await writer.drain()
        rest = await reader.read()  # the 404's body, then the close: no answer to the "requests"
    assert b"HTTP/1.1" not in rest
    writer.close()


async def test_pipelining_and_unread_answers_stay_bounded(proxy):
    # a client that pipelines thousands of requests and reads nothing must not make Fender
    # queue them all, nor buffer every answer
    reader, writer = await asyncio.open_connection(*proxy.app.addresses["proxy"])
    writer.write(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" * 20000)
    await asyncio.sleep(0.5)
    (conn,) = [c for c in proxy.app._proxy.connections]
    assert len(conn._queue) <= 16
    assert conn.transport.get_write_buffer_size() < 4 * 2**20
    writer.transport.abort()


async def test_a_malformed_chunk_mid_body_is_answered_at_once(proxy):
    reader, writer = await asyncio.open_connection(*proxy.app.addresses["proxy"])
    writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.write(b"zz-not-a-size\r\n")
    async with asyncio.timeout(5):
        data = await reader.read()
    assert data.startswith(b"HTTP/1.1 400") and b"bad_request" in data
    assert proxy.app.inflight.count == 0
    writer.close()


async def test_answers_carry_a_date(proxy):
    data = await exchange(proxy, b"GET /nowhere HTTP/1.1\r\nHost: unknown\r\nConnection: close\r\n\r\n")
    assert b"\r\nDate: " in data.split(b"\r\n\r\n")[0]


async def test_idle_keep_alive_connections_are_closed(upstream, start_fender, monkeypatch):
    import proxy.server as server

    monkeypatch.setattr(server, "_SWEEP_EVERY", 0.05)
    fender = await start_fender(f"routes: [{{name: up, upstream: 'http://127.0.0.1:{upstream.port}'}}]")
    fender.app._proxy.keepalive_timeout = 0.1
    reader, writer = await asyncio.open_connection(*fender.app.addresses["proxy"])
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readuntil(b"GET / 0")
    async with asyncio.timeout(3):
        assert await reader.read() == b""  # closed by Fender, not by the test
    writer.close()


async def test_a_request_body_that_stops_coming_is_given_up(upstream, start_fender, monkeypatch):
    import proxy.server as server

    monkeypatch.setattr(server, "_SWEEP_EVERY", 0.05)
    fender = await start_fender(f"routes: [{{name: up, upstream: 'http://127.0.0.1:{upstream.port}'}}]")
    fender.app._proxy.keepalive_timeout = 0.3
    reader, writer = await asyncio.open_connection(*fender.app.addresses["proxy"])
    writer.write(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
    await writer.drain()
    async with asyncio.timeout(3):
        await reader.read()  # the connection is cut: the request and its upstream call are abandoned
    assert fender.app.inflight.count == 0
    writer.close()
    # a body sent in full is not cut, however long the upstream then takes
    async with aiohttp.ClientSession() as http, http.post(
        f"http://127.0.0.1:{fender.app.addresses['proxy'][1]}/slow", data=b"y" * 10, headers={"Host": "x"},
    ) as resp:
        assert resp.status == 200 and await resp.text() == "POST /slow 10"


def test_a_header_value_with_a_line_break_is_never_written():
    with pytest.raises(ValueError):
        encode_head(200, None, {"x-a": "1\r\nSet-Cookie: evil=1"}, "")
    with pytest.raises(ValueError):
        encode_head(200, None, {"x-a": "1\nx-b: 2"}, "")
    with pytest.raises(ValueError):
        encode_head(200, None, {"x-a": "1\rx-b: 2"}, "")
    with pytest.raises(ValueError):
        encode_head(200, "OK\r\nx-b: 2", {}, "")
    assert encode_head(200, None, {"x-a": "1"}, "Content-Length: 0\r\n").startswith(b"HTTP/1.1 200 OK\r\nx-a: 1\r\n")


async def test_draining_answers_with_connection_close(proxy):
    reader, writer = await asyncio.open_connection(*proxy.app.addresses["proxy"])
    writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"Connection: close" not in head
    await reader.readuntil(b"GET /a 0")
    proxy.app._proxy.draining = True  # as SIGTERM sets it, without closing idle connections yet
    writer.write(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"Connection: close" in head
    writer.close()


async def test_requests_pipelined_after_an_upgrade_request_are_still_answered(proxy):
    # Fender does not switch protocols: the Upgrade header is dropped and the next request parsed
    data = await exchange(proxy, b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                                 b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert b"GET /ws 0" in data and b"GET /after 0" in data


async def test_no_100_continue_for_an_http10_client(proxy):
    data = await exchange(proxy, b"POST /p HTTP/1.0\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi")
    assert data.startswith(b"HTTP/1.1 200 OK") and b"100 Continue" not in data


async def test_an_unknown_upgrade_ends_the_connection_rather_than_hang_what_follows(proxy):
    # aiohttp's parser drops the bytes after an Upgrade it does not know (h2c): the answer
    # closes the connection, so a pipelining client retries on a new one instead of waiting
    data = await exchange(proxy, b"GET /h2 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                                 b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
                                 b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
    assert data.count(b"HTTP/1.1 200 OK") == 1 and b"Connection: close" in data


async def test_a_refused_request_is_answered_even_while_the_client_keeps_sending(proxy):
    # the 400 must reach a client still uploading: closing with its bytes unread would reset it
    reader, writer = await asyncio.open_connection(*proxy.app.addresses["proxy"])
    writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz-not-a-size\r\n")

    async def keep_sending():
        try:
            for _ in range(64):
                writer.write(b"x" * 65536)
                await writer.drain()
        except ConnectionError:
            pass

    sender = asyncio.create_task(keep_sending())
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400")
        await reader.read()  # and the connection ends after it
    sender.cancel()
    writer.close()


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"deflate,chunked"])
async def test_a_transfer_coding_other_than_chunked_is_refused_not_dropped(proxy, coding):
    # aiohttp's parser reads `gzip, chunked` as chunked: the gzip coding would be lost and the
    # upstream would take the compressed bytes for the content
    data = await exchange(proxy, b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + coding
                          + b"\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400") and b"x-fender-error: bad_request" in data
    assert b"only chunked" in data
    assert b"POST /up" not in data  # the upstream echoes what reached it: nothing did


async def test_a_chunked_body_in_any_letter_case_is_still_forwarded(proxy):
    data = await exchange(proxy, b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n"
                                 b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"POST /up 5")
