"""Upstreams that break HTTP/1.1: bytes after a whole response, a 101 nobody asked for."""

from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict

from proxy.h1client import ConnectionPool, ResponseFailed
from tests.test_proxy_edge_cases import raw_upstream

RETRYING = (
    "routes: [{{name: r, upstream: 'http://127.0.0.1:{port}',"
    " chain: [{{retry: {{attempts: 3, backoff: {{base: 1ms, max: 1ms}}}}}}]}}]"
)


async def scripted(*writes: bytes):
    """A raw upstream that answers every request with `writes` (a short pause between two).

    Returns the server, its port, the request heads it read and the connections they came on.
    """
    heads: list[bytes] = []
    connections: set[object] = set()

    async def script(reader, writer, head):
        heads.append(head)
        connections.add(writer)
        for i, chunk in enumerate(writes):
            if i:
                await asyncio.sleep(0.05)  # a separate read on Fender's side
            writer.write(chunk)
            await writer.drain()

    server, port = await raw_upstream(script)
    return server, port, heads, connections


@pytest.mark.parametrize(
    ("method", "answer", "status", "body"),
    [
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdefghij", 200, b"abc"),
        ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nmore", 200, b"abc"),
        ("GET", b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef", 200, b"abc"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\na body anyway", 204, b""),
        ("GET", b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\na body anyway', 304, b""),
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 200, b""),
    ],
    ids=["content-length", "chunked", "after-103", "204", "304", "head"],
)
async def test_a_whole_response_with_extra_bytes_in_the_same_read_is_relayed_once(
    start_fender, http, method, answer, status, body
):
    server, port, heads, connections = await scripted(answer)
    fender = await start_fender(RETRYING.format(port=port))
    for _ in range(2):
        async with http.request(method, fender.proxy_url + "/", headers={"Host": "x"}) as resp:
            assert (resp.status, await resp.read()) == (status, body)
            assert resp.headers["x-fender-attempts"] == "1"
    assert len(heads) == 2  # never retried
    assert len(connections) == 2  # what followed the response was never read as the next one
    server.close()


async def test_extra_bytes_after_a_response_whose_head_took_two_reads(start_fender, http):
    server, port, heads, connections = await scripted(
        b"HTTP/1.1 200 OK\r\nContent-Le", b"ngth: 3\r\n\r\nabcdefghij"
    )
    fender = await start_fender(RETRYING.format(port=port))
    async with http.get(fender.proxy_url + "/", headers={"Host": "x"}) as resp:
        assert (resp.status, await resp.read()) == (200, b"abc")
    assert len(heads) == 1
    server.close()


@pytest.mark.parametrize(
    "answer",
    [b"SSH-2.0-OpenSSH_9.6\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\nabc"],
    ids=["not-http", "bad-head"],
)
async def test_an_answer_that_is_not_a_response_is_still_a_reset(start_fender, http, answer):
    server, port, heads, _ = await scripted(answer)
    fender = await start_fender(RETRYING.format(port=port))
    async with http.get(fender.proxy_url + "/", headers={"Host": "x"}) as resp:
        assert resp.status == 502
        assert resp.headers["x-fender-error"] == "upstream_reset"
        assert resp.headers["x-fender-attempts"] == "3"
    assert len(heads) == 3
    server.close()


async def test_an_invalid_answer_on_a_kept_alive_connection_is_not_tried_again_by_the_pool():
    # the pool's one fresh try is for a kept-alive connection the upstream closed unseen; this one answered
    heads: list[bytes] = []

    async def script(reader, writer, head):
        heads.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" if len(heads) == 1 else b"garbage\r\n\r\n")
        await writer.drain()

    server, port = await raw_upstream(script)
    pool = ConnectionPool("127.0.0.1", port, ssl_context=None, server_hostname=None, connect_timeout=1, limit=1)
    try:
        response = await pool.request("GET", "/", CIMultiDict({"Host": "up"}), None)
        assert await response.read() == b"ok"
        response.release()
        with pytest.raises(ResponseFailed, match="invalid HTTP response"):
            await pool.request("GET", "/", CIMultiDict({"Host": "up"}), None)
        assert len(heads) == 2
    finally:
        await pool.close()
        server.close()


SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


@pytest.mark.parametrize(
    "answer",
    [
        SWITCHING,
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["upgrade", "bare", "then-200"],
)
async def test_an_unrequested_101_is_a_reset(start_fender, http, answer):
    # Fender strips Upgrade from requests: a 101 is the upstream's bug, like a reset before a response
    server, port, heads, connections = await scripted(answer)
    fender = await start_fender(RETRYING.format(port=port))
    async with asyncio.timeout(5):
        async with http.get(fender.proxy_url + "/", headers={"Host": "x"}) as resp:
            assert resp.status == 502
            assert resp.headers["x-fender-error"] == "upstream_reset"
            assert resp.headers["x-fender-attempts"] == "3"
            assert (await resp.json())["error"] == "upstream_reset"
    assert len(heads) == 3
    assert len(connections) == 3  # never reused after a 101
    server.close()


async def test_a_client_is_never_sent_a_101_it_did_not_ask_for(start_fender):
    server, port, _, _ = await scripted(SWITCHING)
    fender = await start_fender(f"routes: [{{name: s, upstream: 'http://127.0.0.1:{port}'}}]")
    reader, writer = await asyncio.open_connection(*fender.app.addresses["proxy"])
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 502 ")
        assert b"\r\ncontent-length: " in head.lower()  # a whole answer: the client does not wait on
    writer.close()
    server.close()
