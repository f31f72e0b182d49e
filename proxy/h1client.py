"""A lean HTTP/1.1 client for the forwarding path.

aiohttp's ClientSession spends most of a proxied request's time on machinery a
proxy does not need (cookies, redirects, URL handling, per-request objects).
This client keeps what matters: aiohttp's C response parser and its flow-
controlled StreamReader, keep-alive pools per upstream, and one write per
request head (plus body when it is buffered).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpResponseParser
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.flow import ProxyProtocol, drop_traceback
from proxy.headers import content_length

__all__ = ["ConnectionPool", "UpstreamResponse", "ConnectFailed", "ResponseFailed"]

_READ_LIMIT = 2**16
_NO_FLOW_CONTROL = 2**30  # a limit no re-parse reaches (see `_first_response`)
_IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"))
_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))


class ConnectFailed(Exception):
    """No connection could be made (refused, unreachable, TLS or connect timeout)."""


class ResponseFailed(Exception):
    """The connection broke, or the answer was not HTTP (or a 101), before a full response head."""


def _make_parser(protocol: BaseProtocol, loop: asyncio.AbstractEventLoop, with_body: bool,
                 limit: int = _READ_LIMIT) -> Any:
    return HttpResponseParser(
        protocol,
        loop,
        limit,
        payload_exception=aiohttp.ClientPayloadError,
        response_with_body=with_body,
        read_until_eof=True,
        auto_decompress=False,
    )


class UpstreamConnection(ProxyProtocol):
    __slots__ = ("pool", "_waiter", "_payload", "_should_close", "_body_parser", "_head_parser",
                 "_received", "reused", "_sent_all")

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: ConnectionPool) -> None:
        super().__init__(loop, None)
        self._body_parser: Any = None  # (made in `connection_made`)
        self._head_parser: Any = None
        self.pool = pool
        self._waiter: asyncio.Future[tuple[Any, aiohttp.StreamReader]] | None = None
        self._payload: aiohttp.StreamReader | None = None
        self._should_close = False
        self._received = b""
        self.reused = False
        self._sent_all = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # made here rather than with the protocol, which uvloop makes before it connects: a
        # parser refers back to its protocol, and one that never connected (refused, timed
        # out, a failed TLS handshake) would be a cycle left for the cyclic collector
        self._body_parser = self._parser = _make_parser(self, self._loop, True)

    @property
    def usable(self) -> bool:
        transport = self.transport
        return transport is not None and not transport.is_closing() and not self._should_close

    def expect_response(self, method: str) -> asyncio.Future[tuple[Any, aiohttp.StreamReader]]:
        if method == "HEAD":
            if self._head_parser is None:
                self._head_parser = _make_parser(self, self._loop, False)
            self._parser = self._head_parser
        else:
            self._parser = self._body_parser
        self._received = b""
        self._waiter = self._loop.create_future()
        return self._waiter

    def data_received(self, data: bytes) -> None:
        if not data:
            # aiohttp >= 3.14 calls data_received(b"") from resume_reading() (after every read
            # of a drained body) to resume a paused parser: not bytes from the upstream
            if self._waiter is None and self._payload is None:
                return
        elif self._waiter is None and self._payload is None:
            # bytes on an idle connection answer nothing we sent: never parse a later reply after them
            self.close()
            return
        try:
            messages, _upgraded, _tail = self._parser.feed_data(data)  # type: ignore[union-attr]
        except Exception as exc:
            self._refused(data, exc)
            return
        for message, payload in messages:
            if 100 <= message.code < 200:
                if message.code == 101:
                    self._switched(data)
                    return
                continue  # interim responses (100 Continue, 103 Early Hints): the final one follows
            if message.should_close or not self._sent_all:
                self._should_close = True  # (an answer before the whole body was sent ends it too)
            self._payload = payload
            waiter, self._waiter = self._waiter, None
            if waiter is None or waiter.done():
                self.close()  # an answer nobody asked for
                return
            payload.on_eof(self._message_done)
            waiter.set_result((message, payload))
        if self._waiter is not None:
            self._received += data  # the head is not whole yet: kept for `_refused`

    def _switched(self, data: bytes) -> None:
        """A 101: Fender strips Upgrade from requests and never switches protocols, so it is broken."""
        self._received += data  # (an answer: not a kept-alive connection the upstream had closed)
        self._fail(ResponseFailed("an unrequested 101 Switching Protocols"))
        self.close()

    def _refused(self, data: bytes, exc: Exception) -> None:
        """The parser refused bytes: relay the response they may complete first, and end the connection.

        aiohttp's C parser drops the messages it completed in a feed that goes on to fail, so a
        whole response followed by stray bytes in the same read (a body after a 204, more than
        Content-Length) is parsed again from its first byte, without what follows it.
        """
        self.close()  # whatever followed a response must never be taken for the next one
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        self._received += data
        answer = _first_response(self._received, self, self._loop, self._parser is self._body_parser)
        if answer is None or answer[0].code == 101:  # (see `_switched`)
            self._fail(ResponseFailed(f"invalid HTTP response: {exc}"))
        else:
            self._waiter = None
            waiter.set_result(answer)

    def _message_done(self) -> None:
        self._payload = None
        if self._should_close or self.transport is None:
            self.close()
        else:
            self.pool.release(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._should_close = True
        parser = self._parser
        if parser is not None:
            try:
                parser.feed_eof()
            except Exception as underlying:
                payload = self._payload
                if payload is not None and not payload.is_eof():
                    payload.set_exception(aiohttp.ClientPayloadError(f"response body not completed: {underlying!r}"))
        payload = self._payload
        if payload is not None and not payload.is_eof():
            payload.set_exception(aiohttp.ClientPayloadError("the upstream closed the connection mid-body"))
        # nothing is parsed again, and the parsers and the body refer back to the connection:
        # dropped, so that reference counting frees it (with `_waiter` failed below and no
        # `_payload`, a `data_received` from a reader's `resume_reading` parses nothing)
        self._parser = self._body_parser = self._head_parser = None
        self._payload = None
        reason = f": {exc}" if exc else ""
        self._fail(ResponseFailed(f"the upstream closed the connection{reason}"))
        self.pool.forget(self)

    def _fail(self, error: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def close(self) -> None:
        self._should_close = True
        transport = self.transport
        if transport is not None:
            transport.close()

    async def drain(self) -> None:
        if self._paused:
            await self._drain_helper()


def _first_response(
    data: bytes, protocol: BaseProtocol, loop: asyncio.AbstractEventLoop, with_body: bool
) -> tuple[Any, aiohttp.StreamReader] | None:
    """The whole final response `data` starts with, if any, parsed apart from the bytes after it.

    `data` as a whole is refused. A prefix that ends before the response does is incomplete,
    and one that reaches into refused bytes is refused too, so the shortest prefix that is
    neither is found by bisection (some log2(len(data)) parses, on an error path only).
    """
    answer = None  # what data[:high] parses to
    low, high = 1, len(data)
    while low < high:
        middle = (low + high) // 2
        # all the bytes are here, and a pause would reach the connection's own parser (through
        # `protocol`): no flow control
        parser = _make_parser(protocol, loop, with_body, _NO_FLOW_CONTROL)
        try:
            messages = parser.feed_data(data[:middle])[0]
        except Exception:
            answer, high = None, middle
            continue
        # (interim responses are skipped, as in `data_received`)
        final = next((found for found in messages if not 100 <= found[0].code < 200 or found[0].code == 101), None)
        if final is None or not final[1].is_eof():
            low = middle + 1
        else:
            answer, high = final, middle
    return answer


class UpstreamResponse:
    """The subset of aiohttp.ClientResponse the relay needs."""

    __slots__ = ("status", "reason", "headers", "content", "_conn")

    def __init__(self, message: Any, payload: aiohttp.StreamReader, conn: UpstreamConnection) -> None:
        self.status: int = message.code
        self.reason: str = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = payload
        self._conn = conn

    @property
    def content_length(self) -> int | None:
        return content_length(self.headers)

    async def read(self) -> bytes:
        content = self.content
        first = await content.readany()
        if not first or content.is_eof():
            return first
        chunks = [first]
        while True:
            chunk = await content.readany()
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def release(self) -> None:
        # at EOF the connection already went back to its pool; otherwise it is unusable
        if not self.content.is_eof():
            self._conn.close()

    close = release


class ConnectionPool:
    """Keep-alive connections to one upstream, at most `limit` open."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None,
        connect_timeout: float,
        limit: int,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.connect_timeout = connect_timeout
        self.limit = limit
        self._idle: list[UpstreamConnection] = []
        self._open = 0
        self._waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        self._all: set[UpstreamConnection] = set()

    def _take_idle(self) -> UpstreamConnection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.usable:
                conn.reused = True
                return conn
        return None

    async def acquire(self) -> UpstreamConnection:
        conn = self._take_idle()
        if conn is not None:
            return conn
        if self._open < self.limit:
            return await self._connect()
        waiter: asyncio.Future[UpstreamConnection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            conn = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                handed = waiter.result()
                if handed is not None:
                    self.release(handed)  # pass the connection on
                else:
                    self._wake_next()  # pass the free slot on
            else:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            raise
        if conn is not None and conn.usable:
            conn.reused = True
            return conn
        return await self.acquire()

    async def _connect(self) -> UpstreamConnection:
        self._open += 1
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(loop, self),
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    server_hostname=self.server_hostname if self.ssl_context else None,
                )
        except TimeoutError as exc:
            self._slot_freed()
            raise ConnectFailed(f"connect timed out after {self.connect_timeout:g}s") from exc
        except (OSError, ssl.SSLError) as exc:
            self._slot_freed()
            # (asyncio's failed TLS handshake keeps the error in a future its frames hold)
            drop_traceback(exc)
            raise ConnectFailed(str(exc) or type(exc).__name__) from exc
        except BaseException:
            self._slot_freed()
            raise
        self._all.add(conn)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        if not conn.usable:
            conn.close()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection closed: free its slot."""
        if conn in self._all:
            self._all.discard(conn)
            try:
                self._idle.remove(conn)
            except ValueError:
                pass
            self._slot_freed()

    def _slot_freed(self) -> None:
        self._open -= 1
        self._wake_next()

    def _wake_next(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # go and connect: there is room now
                return

    async def request(
        self,
        method: str,
        path_qs: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | aiohttp.StreamReader | None,
    ) -> UpstreamResponse:
        """One exchange; `headers` must ignore case (the framing replaces any Content-Length)."""
        conn = self._take_idle()  # the common case, without a coroutine for `acquire`
        if conn is None:
            conn = await self.acquire()
        try:
            return await self._exchange(conn, method, path_qs, headers, body)
        except ResponseFailed:
            # a kept-alive connection the upstream had closed while idle: one fresh try
            if not (conn.reused and not conn._received and method in _IDEMPOTENT
                    and (body is None or isinstance(body, bytes | bytearray))):
                raise
        conn = await self._connect()
        return await self._exchange(conn, method, path_qs, headers, body)

    async def _exchange(
        self,
        conn: UpstreamConnection,
        method: str,
        path_qs: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | aiohttp.StreamReader | None,
    ) -> UpstreamResponse:
        transport = conn.transport
        if transport is None:
            raise ResponseFailed("the upstream closed the connection")
        waiter = conn.expect_response(method)
        lines = [f"{method} {path_qs} HTTP/1.1"]
        # the fields joined in C (see `encode_head`); the framing is ours, whatever the caller's
        # Content-Length said, in any case
        if "content-length" in headers:
            lines += [": ".join(field) for field in headers.items() if field[0].lower() != "content-length"]
        else:
            lines += map(": ".join, headers.items())
        try:
            if body is None:
                if method in _BODY_METHODS:
                    lines.append("Content-Length: 0")
                lines.append("\r\n")
                transport.write("\r\n".join(lines).encode("utf-8", "surrogateescape"))
            elif isinstance(body, bytes | bytearray):
                lines.append(f"Content-Length: {len(body)}\r\n\r\n")
                transport.write("\r\n".join(lines).encode("utf-8", "surrogateescape") + body)
            else:
                length = headers.get("content-length")
                if length is not None:
                    lines.append(f"Content-Length: {length}\r\n\r\n")
                else:
                    lines.append("Transfer-Encoding: chunked\r\n\r\n")
                transport.write("\r\n".join(lines).encode("utf-8", "surrogateescape"))
                try:
                    await _send_stream(conn, body, waiter, chunked=length is None)
                except Exception:
                    if not waiter.done() or waiter.exception() is not None:
                        raise
                    # the upstream answered before taking the whole body (say 413): relay that
                if waiter.done() and not waiter.exception() and not conn._sent_all:
                    conn._should_close = True  # the rest of the body was never sent
            message, payload = await waiter
        except BaseException:
            conn.close()  # cancelled or broken mid-exchange: the connection's state is unknown
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # retrieved: nobody else will look at it
            else:
                waiter.cancel()
            # the future holds the exception (when it is the one raised), whose traceback holds
            # this frame: a frame holding the future back would be a reference cycle
            del waiter
            raise
        return UpstreamResponse(message, payload, conn)

    async def close(self) -> None:
        for conn in list(self._all):
            conn.close()
        self._idle.clear()


async def _send_stream(
    conn: UpstreamConnection,
    body: AsyncIterator[bytes] | aiohttp.StreamReader,
    answered: asyncio.Future[Any],
    *,
    chunked: bool,
) -> None:
    conn._sent_all = False
    iterator = body.iter_any() if isinstance(body, aiohttp.StreamReader) else body
    async for chunk in iterator:
        if answered.done():
            return  # a final response arrived: stop sending
        if not chunk:
            continue
        transport = conn.transport
        if transport is None:
            raise ResponseFailed("the upstream closed the connection while the request body was sent")
        if chunked:
            transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))  # no copy of the chunk
        else:
            transport.write(chunk)
        try:
            await conn.drain()
        except ConnectionError as exc:  # the upstream went away while it held our body back
            drop_traceback(exc)
            raise ResponseFailed(f"the upstream closed the connection while the request body was sent: {exc}") from exc
    if chunked and conn.transport is not None:
        conn.transport.write(b"0\r\n\r\n")
    conn._sent_all = True
