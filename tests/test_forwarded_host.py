"""`Connection` may name hop-by-hop headers to drop, never the request's Host or its framing."""

from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict

from proxy.headers import strip_hop_by_hop
from tests.support.raw_server import raw_server


class Seen:
    """What the upstream received: each request's header fields (lower-case names) and body."""

    def __init__(self) -> None:
        self.fields: list[list[tuple[str, str]]] = []
        self.bodies: list[bytes] = []

    def field(self, name: str) -> list[str]:
        return [value for key, value in self.fields[-1] if key == name]


async def recording_upstream(seen: Seen) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                fields = []
                for line in head.split("\r\n")[1:-2]:
                    name, _, value = line.partition(":")
                    fields.append((name.lower(), value.strip()))
                seen.fields.append(fields)
                seen.bodies.append(await read_body(reader, dict(fields)))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await raw_server(handle)


async def read_body(reader: asyncio.StreamReader, fields: dict[str, str]) -> bytes:
    if "content-length" in fields:
        return await reader.readexactly(int(fields["content-length"]))
    if fields.get("transfer-encoding") != "chunked":
        return b""
    body = b""
    while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
        body += (await reader.readexactly(size + 2))[:-2]
    await reader.readuntil(b"\r\n")
    return body


async def exchange(proxy_url: str, request: bytes) -> bytes:
    host, _, port = proxy_url.removeprefix("http://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        return head
    finally:
        writer.close()


async def start(start_fender, seen: Seen, *, preserve_host: bool):
    server, port = await recording_upstream(seen)
    fender = await start_fender(f"""
        routes:
          - name: shop
            upstream: http://127.0.0.1:{port}
            preserve_host: {str(preserve_host).lower()}
    """)
    return server, port, fender


@pytest.mark.parametrize("connection", ["host", "keep-alive, Host", "HOST"])
async def test_connection_naming_host_does_not_drop_the_clients_host(start_fender, connection):
    seen = Seen()
    server, _, fender = await start(start_fender, seen, preserve_host=True)
    head = await exchange(fender.proxy_url,
                          f"GET / HTTP/1.1\r\nHost: shop.example\r\nConnection: {connection}\r\n\r\n".encode())
    assert head.startswith(b"HTTP/1.1 200 ")
    assert seen.field("host") == ["shop.example"]
    assert seen.field("connection") == []
    server.close()


async def test_connection_naming_host_still_sends_the_upstreams_host(start_fender):
    seen = Seen()
    server, port, fender = await start(start_fender, seen, preserve_host=False)
    await exchange(fender.proxy_url, b"GET / HTTP/1.1\r\nHost: shop.example\r\nConnection: host\r\n\r\n")
    assert seen.field("host") == [f"127.0.0.1:{port}"]
    server.close()


async def test_connection_naming_content_length_keeps_the_request_framed_by_its_length(start_fender):
    # (the body is streamed on a route without retries: its Content-Length is what frames it upstream)
    seen = Seen()
    server, _, fender = await start(start_fender, seen, preserve_host=False)
    head = await exchange(fender.proxy_url, b"POST /up HTTP/1.1\r\nHost: shop\r\nConnection: content-length\r\n"
                                            b"Content-Length: 5\r\n\r\nhello")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert seen.field("content-length") == ["5"]
    assert seen.field("transfer-encoding") == []
    assert seen.bodies == [b"hello"]
    server.close()


async def test_connection_naming_transfer_encoding_keeps_a_chunked_body_whole(start_fender):
    seen = Seen()
    server, _, fender = await start(start_fender, seen, preserve_host=False)
    head = await exchange(fender.proxy_url, b"POST /up HTTP/1.1\r\nHost: shop\r\nConnection: transfer-encoding\r\n"
                                            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert seen.field("transfer-encoding") == ["chunked"]  # Fender's own framing
    assert seen.bodies == [b"hello"]
    server.close()


async def test_other_headers_named_in_connection_are_still_dropped(start_fender):
    seen = Seen()
    server, _, fender = await start(start_fender, seen, preserve_host=True)
    await exchange(fender.proxy_url, b"GET / HTTP/1.1\r\nHost: shop.example\r\nConnection: x-hop, host\r\n"
                                     b"X-Hop: 1\r\nX-Kept: 2\r\n\r\n")
    assert seen.field("x-hop") == []
    assert seen.field("x-kept") == ["2"]
    assert seen.field("host") == ["shop.example"]
    server.close()


def test_strip_hop_by_hop_keeps_host_and_content_length_whatever_connection_names():
    headers = CIMultiDict({"Host": "h", "Content-Length": "5", "Connection": "Host, content-length, x-a, te",
                           "X-A": "1", "TE": "trailers", "X-B": "2"})
    assert dict(strip_hop_by_hop(headers)) == {"Host": "h", "Content-Length": "5", "X-B": "2"}


@pytest.mark.parametrize(("request_head", "host"), [
    (b"GET http://shop.example:8080/ HTTP/1.1\r\nHost: elsewhere\r\n\r\n", "shop.example:8080"),
    (b"GET http://shop.example/ HTTP/1.0\r\n\r\n", "shop.example"),
    (b"GET http://user:pw@[::1]:8080/ HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", "[::1]:8080"),
])
async def test_preserve_host_sends_an_absolute_form_targets_authority_as_host(start_fender, request_head, host):
    # RFC 9112, 3.2.2: a proxy ignores the Host of an absolute-form request and sends the target's
    # authority (the request was routed by it, too)
    seen = Seen()
    server, _, fender = await start(start_fender, seen, preserve_host=True)
    head = await exchange(fender.proxy_url, request_head)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert seen.field("host") == [host]
    server.close()
