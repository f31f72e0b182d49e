"""Pipelined requests before bad bytes in the same read: answered in their turn, then the 400.

aiohttp's C parser drops the requests it completed in a read that goes on to fail; the
listener recovers them only when the read began at a request boundary.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web


@pytest.fixture
async def upstream(aiohttp_server):
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(body=b"%s %s %s" % (request.method.encode(), request.path_qs.encode(), body))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return await aiohttp_server(app)


@pytest.fixture
async def proxy(upstream, start_fender):
    return await start_fender(f"routes: [{{name: raw, match: {{host: raw}}, upstream: 'http://127.0.0.1:{upstream.port}'}}]")


async def exchange(fender, *writes: bytes) -> bytes:
    """Each write sent on its own (a pause between them), then all the client receives."""
    reader, writer = await asyncio.open_connection(*fender.app.addresses["proxy"])
    for i, data in enumerate(writes):
        if i:
            await asyncio.sleep(0.2)  # a read of its own at the listener
        writer.write(data)
        await writer.drain()
    async with asyncio.timeout(5):
        received = await reader.read()
    writer.close()
    return received


def statuses_and_bodies(data: bytes) -> list[tuple[int, bytes]]:
    answers = []
    while data:
        head, rest = data.split(b"\r\n\r\n", 1)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        answers.append((int(head.split(b" ")[1]), rest[:length]))
        data = rest[length:]
    return answers


async def test_a_request_before_garbage_in_the_same_read_is_answered_then_the_garbage_refused(proxy):
    data = await exchange(proxy, b"GET /echo?1 HTTP/1.1\r\nHost: raw\r\n\r\nGARBAGE\r\n\r\n")
    answers = statuses_and_bodies(data)
    assert answers[0] == (200, b"GET /echo?1 ")
    assert [status for status, _ in answers] == [200, 400]
    assert b"Invalid method" in answers[1][1]


async def test_what_follows_connection_close_in_the_same_read_is_ignored(proxy):
    # RFC 9112, 9.6: the request that carried `close` is answered, the bytes after it are not
    data = await exchange(proxy, b"GET /echo HTTP/1.1\r\nHost: raw\r\nConnection: close\r\n\r\n"
                                 b"GET /x HTTP/1.1\r\nHost: raw\r\n\r\n")
    assert statuses_and_bodies(data) == [(200, b"GET /echo ")]
    assert b"Connection: close" in data


async def test_pipelined_requests_and_a_body_before_garbage_are_forwarded_whole_in_order(proxy):
    data = await exchange(proxy, b"GET /echo?1 HTTP/1.1\r\nHost: raw\r\n\r\n"
                                 b"POST /echo?2 HTTP/1.1\r\nHost: raw\r\nContent-Length: 11\r\n\r\nhello world"
                                 b"GARBAGE\r\n\r\n")
    assert statuses_and_bodies(data)[:2] == [(200, b"GET /echo?1 "), (200, b"POST /echo?2 hello world")]
    assert [status for status, _ in statuses_and_bodies(data)] == [200, 200, 400]


async def test_a_later_read_at_a_request_boundary_is_recovered_too(proxy):
    data = await exchange(proxy, b"GET /echo?1 HTTP/1.1\r\nHost: raw\r\n\r\n",
                          b"GET /echo?2 HTTP/1.1\r\nHost: raw\r\n\r\nGARBAGE\r\n\r\n")
    assert [status for status, _ in statuses_and_bodies(data)] == [200, 200, 400]
    assert statuses_and_bodies(data)[1] == (200, b"GET /echo?2 ")


async def test_a_read_that_continues_a_request_head_is_not_parsed_on_its_own(proxy):
    # read alone, the second read starts with a request; in the stream it is a header value
    # of /echo?2 (which then repeats Host): re-parsing it apart would serve a request never sent
    data = await exchange(proxy, b"GET /echo?1 HTTP/1.1\r\nHost: raw\r\n\r\nGET /echo?2 HTTP/1.1\r\nHost: raw\r\nX-A: ",
                          b"GET /echo?smuggled HTTP/1.1\r\nHost: raw\r\n\r\nGARBAGE\r\n\r\n")
    assert [status for status, _ in statuses_and_bodies(data)] == [200, 400]
    assert b"smuggled" not in data


async def test_a_read_that_ends_a_request_body_is_not_parsed_on_its_own(proxy):
    # the first read ends in a blank line, but inside the body: the second read is the body's
    # rest, which must reach the upstream as the body and never be served as a request
    tail = b"GET /echo?smuggled HTTP/1.1\r\nHost: raw\r\n\r\n"
    data = await exchange(proxy, b"POST /echo?1 HTTP/1.1\r\nHost: raw\r\nContent-Length: %d\r\n\r\nab\r\n\r\n" % (6 + len(tail)),
                          tail + b"GARBAGE\r\n\r\n")
    answers = statuses_and_bodies(data)
    assert answers[0] == (200, b"POST /echo?1 ab\r\n\r\n" + tail)
    assert [status for status, _ in answers] == [200, 400]

