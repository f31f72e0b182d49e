"""The proxy listener: a lean HTTP/1.1 server on aiohttp's C request parser.

aiohttp's web server wraps every request in a Request, a StreamResponse and a payload
writer, and composes each response head anew; in the running proxy that was the larger
part of the CPU a proxied call cost. A proxy relays heads it already holds, so this server
keeps what matters from aiohttp (the C parser with its limits, chunked decoding, the
flow-controlled StreamReader for request bodies) and writes each response itself: one
`transport.write` for a head and a small body.

One task per connection serves its requests in order (pipelined requests wait their turn).
A client that goes away cancels the request in progress, which abandons its upstream call.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser
from aiohttp.http_writer import HttpVersion10
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import error_response
from proxy.flow import ProxyProtocol, drop_traceback
from proxy.headers import content_length

__all__ = ["Exchange", "ProxyListener", "Handler", "RefusedHook"]

log = logging.getLogger("fender.proxy")

_REASONS = {status.value: status.phrase for status in HTTPStatus}
_NO_BODY_STATUSES = frozenset((204, 304))
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_READ_LIMIT = 2**16
_MAX_QUEUED = 16  # pipelined requests held before reading from the client pauses
_SWEEP_EVERY = 5.0
_LINGER_SECONDS = 10.0  # as aiohttp's server: how long an unread request body is read and dropped
_LINGER_BYTES = 64 * 2**20
_REFUSAL_LINGER_SECONDS = 2.0  # after a 400, how long what the client still sends is read and dropped
_NO_FLOW_CONTROL = 2**30  # a limit no re-parse reaches (see `_complete_requests`)


class _Refusal:
    """A request the parser refused, answered in its turn after those before it.

    (Those in the same read as the bad bytes are answered if the read began between two
    requests, as it almost always does: see `ServerConnection._read_refused`.)
    """

    __slots__ = ("status", "message")

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


class Exchange:
    """One request on a client connection and the response written back to it.

    The handler reads the request's fields and body (`content`) and answers exactly once:
    `respond()` (head and whole body in one write) or `start()`, `write()`..., `finish()`.
    """

    __slots__ = ("method", "path", "query_string", "headers", "version", "host", "authority", "remote",
                 "content", "should_close", "started", "finished", "_chunked", "_conn")

    def __init__(self, message: Any, payload: StreamReader, conn: ServerConnection) -> None:
        self.method: str = message.method
        url = message.url
        self.path: str = url.raw_path
        self.query_string: str = url.raw_query_string
        self.headers: CIMultiDictProxy[str] = message.headers
        self.version = message.version
        # absolute-form targets (HTTP_PROXY clients) name the host in the URL, as aiohttp reads it
        self.host: str
        # the target's host[:port], which stands for the client's Host (RFC 9112, 3.2.2); None: origin-form
        self.authority: str | None = None
        if url.absolute:
            self.host = url.raw_host or ""
            port = url.explicit_port
            name = f"[{self.host}]" if ":" in self.host else self.host
            self.authority = name if port is None else f"{name}:{port}"
        else:
            self.host = message.headers.get("host", "")
        self.remote: str | None = conn.remote
        self.content = payload
        self.should_close: bool = message.should_close
        self.started = False
        self.finished = False
        self._chunked = False
        self._conn = conn

    @property
    def body_exists(self) -> bool:
        return self.content is not EMPTY_PAYLOAD

    @property
    def content_length(self) -> int | None:
        return content_length(self.headers)

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The task serving this request (its connection's)."""
        return self._conn._task

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._conn._loop

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.transport

    def send_continue(self) -> None:
        transport = self._conn.transport
        if transport is not None and not self.started and self.version != HttpVersion10:
            transport.write(_CONTINUE)  # (never to an HTTP/1.0 client: RFC 9110, 15.2.1)

    def respond(self, status: int, headers: CIMultiDict[str], body: bytes = b"", reason: str | None = None) -> None:
        """The whole response: head and body in one write (no body for HEAD, 204 and 304)."""
        headers.popall("content-length", None)
        if status in _NO_BODY_STATUSES:
            framing, body = "", b""
        else:
            framing = f"Content-Length: {len(body)}\r\n"
            if self.method == "HEAD":
                body = b""
        head = self._head(status, reason, headers, framing)
        self.finished = True
        transport = self._conn.transport
        if transport is not None:
            transport.write(head + body if body else head)

    def respond_with(self, response: web.Response) -> None:
        """A response built by `proxy.errors` (the JSON errors)."""
        body = response.body
        self.respond(response.status, CIMultiDict(response.headers),
                     body if isinstance(body, bytes) else b"", response.reason)

    def start(self, status: int, headers: CIMultiDict[str], reason: str | None = None,
              length: int | None = None) -> bool:
        """Send the head of a streamed response; False when no body may follow (HEAD, 204, 304)."""
        no_body = self.method == "HEAD" or status in _NO_BODY_STATUSES
        headers.popall("content-length", None)
        if length is not None and status not in _NO_BODY_STATUSES:
            framing = f"Content-Length: {length}\r\n"
        elif no_body:
            framing = ""
        elif self.version == HttpVersion10:
            framing = ""  # an HTTP/1.0 client reads the body to the end of the connection
            self.should_close = True
        else:
            framing = "Transfer-Encoding: chunked\r\n"
            self._chunked = True
        head = self._head(status, reason, headers, framing)
        transport = self._conn.transport
        if transport is not None:
            transport.write(head)
        if no_body:
            self.finished = True
        return not no_body

    async def write(self, chunk: bytes) -> None:
        conn = self._conn
        transport = conn.transport
        if transport is None:
            raise ConnectionResetError("the client closed the connection")
        if self._chunked:
            transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))  # no copy of the chunk
        else:
            transport.write(chunk)
        if conn.writing_paused:
            await conn._drain_helper()

    def finish(self) -> None:
        transport = self._conn.transport
        if self._chunked and transport is not None:
            transport.write(b"0\r\n\r\n")
        self.finished = True

    def abort(self) -> None:
        """Break the connection: the client must see a cut response, not a short one."""
        transport = self._conn.transport
        if transport is not None:
            transport.abort()

    def _head(self, status: int, reason: str | None, headers: Mapping[str, str], framing: str) -> bytes:
        if self.started:
            raise RuntimeError("the response head was already sent")
        conn = self._conn
        if self.should_close or conn.server.draining or not self.content.is_eof() or (
            conn._stopped and not conn._queue
        ):
            # (a request body not read to its end would be taken for the next request; after an
            # upgrade request or a malformed one nothing more is parsed)
            self.should_close = True
            framing += "Connection: close\r\n"
        elif self.version == HttpVersion10:
            framing += "Connection: keep-alive\r\n"
        head = encode_head(status, reason, headers, framing)
        self.started = True
        return head


def encode_head(status: int, reason: str | None, headers: Mapping[str, str], framing: str) -> bytes:
    """Status line, headers and the server's own framing lines, ready to write."""
    if "date" not in headers:
        framing += f"Date: {_http_date()}\r\n"
    # the fields joined in C: `": ".join` takes multidict's `istr` names as they are, where an
    # f-string would call `format()` on each (about a microsecond per head)
    lines = [f"HTTP/1.1 {status} {reason or _REASONS.get(status, 'Unknown')}"]
    lines += map(": ".join, headers.items())
    lines.append(framing + "\r\n")  # (framing's lines end in CRLF; the separator ends the last field's)
    head = "\r\n".join(lines)
    # values come from the parser, the config or Fender itself; a CR or LF in one would split
    # the head (response splitting): refuse to send it. Counting is cheaper than a check per
    # value: our own line ends hold one CR and one LF each, so any other shows in either count.
    breaks = len(lines) + framing.count("\n")
    if head.count("\n") != breaks or head.count("\r") != breaks:
        raise ValueError("a response header contains CR or LF")
    return head.encode("utf-8", "surrogateescape")


_date_second = 0
_date_text = ""


def _http_date() -> str:
    global _date_second, _date_text
    now = int(time.time())
    if now != _date_second:
        _date_second, _date_text = now, formatdate(now, usegmt=True)
    return _date_text


Handler = Callable[[Exchange], Awaitable[None]]
RefusedHook = Callable[[str | None, int], None]


class ServerConnection(ProxyProtocol):
    """One client connection: parse, queue, and serve its requests in order."""

    __slots__ = ("server", "remote", "last_active", "_queue", "_task", "_waiter", "_stopped", "_body",
                 "_last", "_last_read")

    def __init__(self, server: ProxyListener, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop, None)  # (the parser is made in `connection_made`)
        self.server = server
        self.remote: str | None = None
        self.last_active = loop.time()
        self._queue: deque[tuple[Any, StreamReader]] = deque()
        # one task serves the connection while it lives, waiting on `_waiter` between requests
        # (cheaper than a task per request: no Task to build and register each time)
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._stopped = False  # nothing more is parsed: after an upgrade, a refusal or the close
        self._body: StreamReader | None = None  # the body the parser is filling, if any
        self._last: Any = None  # the head of the last request parsed
        self._last_read: bytes | None = None  # the bytes last parsed whole, if any (see `_read_refused`)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # the parser stops emitting requests once _MAX_QUEUED wait (pipelining is bounded). Made
        # here rather than with the protocol: uvloop makes the protocol before it accepts the
        # socket, and one whose accept fails hears neither connection_made nor connection_lost;
        # with a parser, which refers back to it, it would be a cycle for the cyclic collector
        self._parser = _make_parser(self, self._loop, _READ_LIMIT, _MAX_QUEUED)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple | list) and peer:
            self.remote = str(peer[0])
        self.server.connections.add(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.server.connections.discard(self)
        self._stopped = True
        self._queue.clear()
        # nothing is parsed again (stopped, `data_received` returns at once, and with the queue
        # empty `_next` is not called), and the parser and the body it fills refer back to the
        # connection: dropped, so that reference counting frees the connection when its task
        # ends, rather than the cyclic collector (which Fender keeps off the request path)
        parser, self._parser = self._parser, None
        self._body = self._last = self._last_read = None
        try:
            parser.feed_eof()  # type: ignore[union-attr]
        except Exception:
            pass  # a body cut short: the request in progress is cancelled below
        if self._task is not None:
            self._task.cancel()  # the client left: abandon its request (and its upstream call)

    def resume_writing(self) -> None:
        self.last_active = self._loop.time()  # a slow reader that reads is not a stuck one
        super().resume_writing()

    def eof_received(self) -> bool:
        # a client that closes its side has gone (as aiohttp's server reads it too): the
        # transport closes, and the request in progress is cancelled
        return False

    def data_received(self, data: bytes) -> None:
        # aiohttp >= 3.14 also calls this with b"" from resume_reading() to resume the parser
        if self._stopped:
            return
        self.last_active = self._loop.time()
        try:
            messages, upgraded, tail = self._parser.feed_data(data)  # type: ignore[union-attr]
        except HttpProcessingError as exc:
            self._read_refused(data, exc)
            return
        if messages:
            self._last_read = data  # (a reference, no copy: tested only when a read is refused)
            last = self._last = messages[-1][0]
            self._body = messages[-1][1]
            self._enqueue(messages)
            if last.upgrade and not upgraded:
                # aiohttp's parser drops what follows an Upgrade it does not know (h2c, ...):
                # parse nothing more, and the answer closes the connection
                self._stopped = True
        elif self._body is None or self._body is EMPTY_PAYLOAD:
            self._last_read = data  # part of a head (or blank lines)
        else:
            # a piece of a body, after which nothing is recovered anyway: not kept, as an idle
            # connection would keep its upload's last read (up to 256 KiB) alive
            self._last_read = b""
        if upgraded:
            if self._last.method == "CONNECT":
                self._stopped = True  # what follows is a tunnel's bytes, not HTTP we parse
            else:
                # Fender never switches protocols (Upgrade is dropped like any hop-by-hop
                # header), so what follows an Upgrade request is the next request
                self._parser.set_upgraded(False)  # type: ignore[union-attr]
                self._last_read = b""  # (the tail is no read of its own: see `_read_refused`)
                if tail:
                    self.data_received(tail)

    def _read_refused(self, data: bytes, exc: HttpProcessingError) -> None:
        """The parser refused a read: queue the requests it completed before the bad bytes, then the 400.

        aiohttp's C parser drops the requests it completed in a feed that goes on to fail, so
        they are parsed again from the read's first byte, which is only right if the parser
        stood between two requests when the read came. That is known when this is the first
        read, or the read before ended in a blank line and the last request had no body: a
        blank line ends a request head (or lies between requests) but never falls inside one,
        and in a body the last request would have one. (A read is parsed whole before the
        next: a parser holding bytes back for a full queue has paused reading, and is fed
        again with b"" first.) After a request that closes the connection nothing more is
        parsed. Otherwise only the 400 is queued.
        """
        self._stopped = True
        body = self._body
        if body is not None and not body.is_eof():
            body.set_exception(exc)  # (say a malformed chunk): the request reading it fails now
        last, previous = self._last, self._last_read
        recovered = []
        if (data and (previous is None or previous.endswith(b"\r\n\r\n")) and (body is None or body is EMPTY_PAYLOAD)
                and not (last is not None and last.should_close)):
            recovered = _complete_requests(data, self, self._loop)
        if recovered and recovered[-1][0].should_close:
            self._enqueue(recovered)  # (RFC 9112, 9.6: what follows a close is not answered)
            return
        refusal = _Refusal(exc.code if 400 <= exc.code < 500 else 400, exc.message)
        self._enqueue([*recovered, (refusal, EMPTY_PAYLOAD)])

    def _enqueue(self, messages: Any) -> None:
        self._queue.extend(messages)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        elif self._task is None:
            self._task = self._loop.create_task(self._serve())
            self.server.serving.add(self._task)
        if len(self._queue) >= _MAX_QUEUED and not self._buffer_paused:
            self._pause_reading_for_buffer()

    def _next(self) -> tuple[Any, StreamReader]:
        item = self._queue.popleft()
        self._parser.message_consumed()  # type: ignore[union-attr]
        if self._buffer_paused and len(self._queue) <= _MAX_QUEUED // 2:
            self.data_received(b"")  # parse what waited in the parser, then read again
            if len(self._queue) < _MAX_QUEUED:
                self._resume_reading_for_buffer()
        return item

    async def _serve(self) -> None:
        queue = self._queue
        handler = self.server.handler
        try:
            while True:
                if not queue:
                    message = payload = exchange = None  # an idle connection keeps no request alive
                    self._waiter = self._loop.create_future()
                    await self._waiter  # the next request (cancelled when the client leaves)
                    continue
                message, payload = self._next()
                if self.transport is None:
                    return
                if isinstance(message, _Refusal):
                    self._refuse(message)
                    return
                exchange = Exchange(message, payload, self)
                try:
                    await handler(exchange)
                except asyncio.CancelledError:
                    self._close(abort=True)  # the client left
                    return
                except Exception as exc:
                    if isinstance(exc, ConnectionError) and self.transport is None:
                        return  # the client left while its response was written
                    log.exception("unexpected error while serving %s %s", exchange.method, exchange.path)
                    if not exchange.started:
                        self._internal_error(exchange)
                    self._close(abort=exchange.started and not exchange.finished)
                    return
                if not exchange.finished:
                    self._close(abort=True)  # a response left unfinished must not look complete
                    return
                if self.writing_paused:
                    # the client does not read: serve nothing more until it does (memory stays bounded)
                    try:
                        await self._drain_helper()
                    except ConnectionError:
                        return
                self.last_active = self._loop.time()
                if exchange.should_close or self.server.draining:
                    if not payload.is_eof():
                        await self._linger(payload)
                    self._close()
                    return
                if self._stopped and not queue:
                    self._close()
                    return
        finally:
            self.server.serving.discard(self._task)
            self._task = None
            self._waiter = None

    async def _linger(self, payload: StreamReader) -> None:
        """Read and drop what is left of a request body before closing.

        Closing with unread bytes in the socket makes the kernel send a reset, and a client
        still sending its upload may then never read the answer (a 404 or 413) it was sent.
        """
        deadline = self._loop.time() + _LINGER_SECONDS
        dropped = 0
        try:
            async with asyncio.timeout_at(deadline):
                while dropped < _LINGER_BYTES:
                    chunk = await payload.readany()
                    if not chunk:
                        return
                    dropped += len(chunk)
        except (TimeoutError, ConnectionError, HttpProcessingError, asyncio.IncompleteReadError) as exc:
            drop_traceback(exc)

    def _refuse(self, refusal: _Refusal) -> None:
        text = (refusal.message or "").strip().splitlines()
        detail = text[0].rstrip(":") if text else "malformed HTTP request"
        response = error_response("bad_request", f"malformed request: {detail}", status=refusal.status)
        _send_and_close(self, response)
        hook = self.server.on_refused
        if hook is not None:
            hook(self.remote, refusal.status)

    def _internal_error(self, exchange: Exchange) -> None:
        exchange.should_close = True
        exchange.respond_with(error_response("internal_error", "Fender failed to handle the request", status=500))

    def close_after_reading(self) -> None:
        """Half-close, and drop what the client still sends for a while, then close.

        Closing at once with the client's bytes unread makes the kernel send a reset, which
        can destroy the answer before the client reads it. (Nothing more is parsed: the
        connection is stopped, so `data_received` drops what arrives.)
        """
        self._stopped = True
        transport = self.transport
        if transport is None:
            return
        try:
            if transport.can_write_eof():
                transport.write_eof()
            transport.resume_reading()
        except (OSError, RuntimeError):
            self._close()
            return
        self._loop.call_later(_REFUSAL_LINGER_SECONDS, self._close)

    def _close(self, *, abort: bool = False) -> None:
        self._stopped = True
        transport = self.transport
        if transport is not None:
            if abort:
                transport.abort()
            else:
                transport.close()

    @property
    def idle(self) -> bool:
        return not self._queue and (self._task is None or self._waiter is not None)

    @property
    def body_stalled(self) -> bool:
        """A request body begun and not finished while Fender would read more: the client stopped sending.

        (While reading is paused the upstream is the slow side: its own timeouts apply.)
        """
        body = self._body
        return body is not None and not body.is_eof() and not self._reading_paused


def _make_parser(protocol: ServerConnection, loop: asyncio.AbstractEventLoop, limit: int,
                 max_queued: int) -> HttpRequestParser:
    return HttpRequestParser(
        protocol, loop, limit, max_line_size=8190, max_field_size=8190, auto_decompress=False,
        max_msg_queue_size=max_queued,
    )


def _complete_requests(data: bytes, protocol: ServerConnection,
                       loop: asyncio.AbstractEventLoop) -> list[tuple[Any, StreamReader]]:
    """The whole requests `data` starts with, before the bytes the parser refuses.

    `data` as a whole is refused, and every prefix that stops before the refused byte parses
    (the parser reads one byte after another), so the longest prefix that parses is found by
    bisection (some log2(len(data)) parses, on an error path only). The requests are few: the
    connection's parser, which pauses at _MAX_QUEUED, reached the refused byte.
    """
    requests: list[tuple[Any, StreamReader]] = []  # what data[:low] parses to
    low, high = 0, len(data) - 1
    while low < high:
        middle = (low + high + 1) // 2
        # all the bytes are here, and a pause would reach the connection's reading (through
        # `protocol`): no flow control, and each body is fed whole to a reader of its own
        parser = _make_parser(protocol, loop, _NO_FLOW_CONTROL, 0)
        try:
            messages = parser.feed_data(data[:middle])[0]
        except HttpProcessingError:
            high = middle - 1
        else:
            requests, low = list(messages), middle
    return [(message, payload) for message, payload in requests if payload.is_eof()]


def _send_and_close(conn: ServerConnection, response: web.Response) -> None:
    transport = conn.transport
    if transport is None:
        return
    body = response.body if isinstance(response.body, bytes) else b""
    headers = CIMultiDict(response.headers)
    headers.popall("content-length", None)
    head = encode_head(response.status, response.reason, headers,
                       f"Content-Length: {len(body)}\r\nConnection: close\r\n")
    transport.write(head + body)
    conn.close_after_reading()


class ProxyListener:
    """The proxy's listening socket and its client connections."""

    def __init__(self, handler: Handler, *, on_refused: RefusedHook | None = None,
                 keepalive_timeout: float = 75.0) -> None:
        self.handler = handler
        self.on_refused = on_refused
        self.keepalive_timeout = keepalive_timeout
        self.connections: set[ServerConnection] = set()
        # every connection's serving task until it ends, its connection gone or not (close waits for them)
        self.serving: set[asyncio.Task[None]] = set()
        self.draining = False
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024) -> int:
        """Listen; returns the port bound (useful with port 0)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ServerConnection(self, loop), host, port, reuse_port=reuse_port or None, backlog=backlog,
        )
        self._sweeper = loop.call_later(_SWEEP_EVERY, self._sweep)
        sockets = self._server.sockets or ()
        for sock in sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                return int(sock.getsockname()[1])
        return port

    def _sweep(self) -> None:
        # one timer for all connections: close those idle past the keep-alive timeout, those
        # whose client has read nothing of a response for as long, and those whose client has
        # sent nothing of a request body it began (which would hold an upstream connection too)
        loop = asyncio.get_running_loop()
        limit = loop.time() - self.keepalive_timeout
        for conn in list(self.connections):
            if conn.last_active < limit and (conn.idle or conn.writing_paused or conn.body_stalled):
                # a client that reads nothing would keep a closing transport's buffer forever
                transport = conn.transport
                conn._close(abort=transport is not None and transport.get_write_buffer_size() > 0)
        self._sweeper = loop.call_later(_SWEEP_EVERY, self._sweep)

    def stop_accepting(self) -> None:
        """Draining: no new connections; each open one closes after its current response."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.idle:
                conn._close()

    async def close(self, timeout: float) -> None:
        """Stop: wait up to `timeout` for responses in progress, then cut what is left."""
        self.stop_accepting()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(not c.idle for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn._close(abort=not conn.idle)
        self.connections.clear()
        if self.serving:
            # the requests just cut, and those of clients that left a moment ago, wind up (a
            # 499, counted and logged) before close returns: what stops after the listener
            # sees them finished
            await asyncio.wait(list(self.serving), timeout=1.0)
