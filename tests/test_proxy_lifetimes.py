"""A connection that ends, on either side and however it ends, is freed by reference counting.

`fender run` freezes its start-up heap and runs the cyclic collector rarely (proxy.cli), so
what a closed connection leaves in a reference cycle (its parser, its request, the frames
of a cancelled call) waits for a full collection: the resident memory grew with every
batch of closed connections. Each test runs with the collector off, then asks it what it
would free of Fender's: nothing.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
import types
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.http_parser import HttpRequestParser, HttpResponseParser

import policies
import proxy
from tests.support.raw_server import raw_server
from tests.test_proxy_edge_cases import raw_upstream

_FENDER_CODE = (str(Path(proxy.__file__).parent), str(Path(policies.__file__).parent), "<fused layer")
_MB = 2**20

CONFIG = """
routes:
  - {{name: bare, match: {{host: bare}}, upstream: 'http://127.0.0.1:{port}', chain: []}}
  - name: guarded
    match: {{host: guarded}}
    upstream: http://127.0.0.1:{port}
    chain:
      - fallback: {{on: [upstream_unavailable], status: 200, body: {{stale: true}}}}
      - rate_limit: {{rate: 1000000/s}}
      - timeout: 5s
      - retry: {{attempts: 2, backoff: {{base: 1ms, max: 1ms}}}}
      - circuit_breaker: {{consecutive_failures: 1000, open_for: 30s}}
      - bulkhead: {{max_concurrent: 100}}
      - timeout: 4s
  - name: tls
    match: {{host: tls}}
    upstream: https://127.0.0.1:{plain}
"""


def _fenders(garbage: list[object]) -> Counter[str]:
    """Fender's objects among `garbage`: its classes' instances, the parsers, its frames."""
    found: Counter[str] = Counter()
    for thing in garbage:
        kind = type(thing)
        if kind.__module__.startswith(("proxy.", "policies.")) or isinstance(
            thing, HttpRequestParser | HttpResponseParser
        ):
            found[kind.__name__] += 1
        elif isinstance(thing, types.FrameType) and thing.f_code.co_filename.startswith(_FENDER_CODE):
            found[f"frame of {thing.f_code.co_name}"] += 1
    return found


async def left_for_the_collector(fender, scenario: Callable[[], Awaitable[None]]) -> Counter[str]:
    """Run `scenario` with the cyclic collector off: what of Fender's it would then find."""
    listener = fender.app._proxy
    gc.collect()
    gc.disable()
    try:
        await scenario()
        for _ in range(300):  # the connections closed, and their tasks ended
            if not listener.connections and not listener.serving:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # (and the upstream side heard of its closes)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        return _fenders(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        gc.collect()


class Upstream:
    """A raw upstream, by path: /close, /cut, /cut-big, /early, /garbage, /hold, /no-read, else 200 "ok"."""

    def __init__(self) -> None:
        self.holding = asyncio.Event()  # a /hold or /no-read request arrived
        self.release = asyncio.Event()

    async def script(self, reader, writer, head: bytes) -> str | None:
        path = head.split(b" ", 2)[1]
        length, chunked = 0, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            chunked = chunked or name.strip().lower() == b"transfer-encoding"
        if path == b"/early":  # answers before the body, and reads on
            writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno")
            await writer.drain()
        if path == b"/no-read":  # takes no byte of the body, and goes away
            self.holding.set()
            await self.release.wait()
            writer.transport.abort()
            return "close"
        if length:
            await reader.readexactly(length)
        while chunked:  # (Fender sends only whole chunks, with no extensions)
            size = int(await reader.readuntil(b"\r\n"), 16)
            await reader.readexactly(size + 2)
            chunked = size > 0
        if path == b"/hold":
            self.holding.set()
            await self.release.wait()
            return "close"
        if path == b"/close":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbye")
            await writer.drain()
            return "close"
        if path == b"/cut":  # a small body broken off
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabcdefghij")
            await writer.drain()
            writer.transport.abort()
            return "close"
        if path == b"/cut-big":  # a streamed body broken off
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (8 * _MB) + b"z" * _MB)
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.transport.abort()
            return "close"
        if path == b"/garbage":
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            await writer.drain()
            return "close"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return None


@pytest.fixture
async def setup(start_fender):
    upstream = Upstream()
    server, port = await raw_upstream(upstream.script)

    async def not_tls(reader, writer):  # for an https:// upstream: the handshake fails
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    plain, plain_port = await raw_server(not_tls)
    fender = await start_fender(CONFIG.format(port=port, plain=plain_port))
    yield fender, upstream
    upstream.release.set()
    server.close()
    plain.close()


def request(host: str, path: str, *, close: bool = False) -> bytes:
    head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n" + ("Connection: close\r\n" if close else "")
    return (head + "\r\n").encode()


async def to_the_end(reader: asyncio.StreamReader) -> bytes:
    """What the client reads before the connection ends (a reset loses what was left unread)."""
    data = b""
    try:
        async with asyncio.timeout(5):
            while chunk := await reader.read(2**16):
                data += chunk
    except ConnectionResetError:
        pass
    return data


async def response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    return head


@pytest.mark.parametrize("host", ["bare", "guarded"])
async def test_keep_alive_connections_closed_by_the_client_or_the_upstream(setup, host):
    fender, _ = setup
    heads: list[bytes] = []

    async def scenario() -> None:
        for _ in range(3):
            reader, writer = await asyncio.open_connection(*fender.app.addresses["proxy"])
            for path in ("/a", "/close", "/b", "/c"):  # /close: the upstream ends its connection
                writer.write(request(host, path))
                heads.append(await response(reader))
            writer.write(request(host, "/d", close=True))
            heads.append(await response(reader))
            assert await reader.read() == b""
            writer.close()
        reader, writer = await asyncio.open_connection(*fender.app.addresses["proxy"])
        writer.write(request(host, "/e"))
        heads.append(await response(reader))
        writer.close()  # the client ends a kept-alive connection
        await writer.wait_closed()

    assert await left_for_the_collector(fender, scenario) == {}
    assert len(heads) == 16 and all(head.startswith(b"HTTP/1.1 200") for head in heads)


@pytest.mark.parametrize("host", ["bare", "guarded"])
@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
async def test_a_client_that_leaves_mid_request(setup, host, reset):
    fender, upstream = setup

    async def scenario() -> None:
        reader, writer = await asyncio.open_connection(*fender.app.addresses["proxy"])
        writer.write(request(host, "/hold"))
        async with asyncio.timeout(5):
            await upstream.holding.wait()
        if reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()
        # (the call is cancelled: every policy of the chain, and the upstream call, unwind)

    assert await left_for_the_collector(fender, scenario) == {}


@pytest.mark.parametrize("host", ["bare", "guarded"])
@pytest.mark.parametrize("path", ["/garbage", "/cut", "/cut-big"])
async def test_an_upstream_that_breaks(setup, host, path):
    fender, _ = setup
    received: list[bytes] = []

    async def scenario() -> None:
        reader, writer = await asyncio.open_connection(*fender.app.addresses["proxy"])
        writer.write(request(host, path, close=True))
        received.append(await to_the_end(reader))
        writer.close()

    assert await left_for_the_collector(fender, scenario) == {}
    if path == "/cut-big":
        assert received[0].startswith(b"HTTP/1.1 200") and len(received[0]) < 8 * _MB  # cut, not short
    else:
        assert received[0].startswith(b"HTTP/1.1 502")


async def test_an_upstream_that_fails_the_tls_handshake(setup):
    fender, _ = setup
    received: list[bytes] = []

    async def scenario() -> None:
        reader, writer = await asyncio.open_connection(*fender.app.addresses["proxy"])
        writer.write(request("tls", "/", close=True))
        received.append(await to_the_end(reader))
        writer.close()

    assert await left_for_the_collector(fender, scenario) == {}
    assert received[0].startswith(b"HTTP/1.1 502") and b"upstream_unavailable" in received[0]


@pytest.mark.parametrize(("host", "path"), [
    ("bare", "/a"),  # streamed
    ("guarded", "/a"),  # buffered for retries
    ("bare", "/early"),  # streamed, and answered before it broke
])
async def test_a_malformed_request_body(setup, host, path):
    fender, _ = setup
    received: list[bytes] = []

    async def scenario() -> None:
        reader, writer = await asyncio.open_connection(*fender.app.addresses["proxy"])
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".encode())
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"zz-not-a-size\r\n")
        received.append(await to_the_end(reader))
        writer.close()

    assert await left_for_the_collector(fender, scenario) == {}
    assert received[0].startswith(b"HTTP/1.1 413" if path == "/early" else b"HTTP/1.1 400")


async def test_an_upstream_that_goes_away_while_it_holds_an_upload_back(setup):
    fender, upstream = setup
    received: list[bytes] = []

    async def scenario() -> None:
        reader, writer = await asyncio.open_connection(*fender.app.addresses["proxy"])
        size = 32 * _MB  # more than the socket buffers take: Fender waits for the upstream to read
        writer.write(b"POST /no-read HTTP/1.1\r\nHost: bare\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(b"u" * size)
        async with asyncio.timeout(5):
            await upstream.holding.wait()
        await asyncio.sleep(0.3)
        upstream.release.set()
        async with asyncio.timeout(5):
            received.append(await reader.readuntil(b"\r\n\r\n"))
        writer.transport.abort()

    assert await left_for_the_collector(fender, scenario) == {}
    assert received[0].startswith(b"HTTP/1.1 502")
