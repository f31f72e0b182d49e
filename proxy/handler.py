"""The data plane: match a route, run its chain, relay the response.

Per request this builds one RequestContext and one OutboundRequest; everything
else (router, composed chains, upstream pools) was built with the config version.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from random import getrandbits
from time import perf_counter

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from policies.base import Outcome, RequestContext
from policies.errors import FenderError
from policies.events import EventBus
from proxy.errors import error_response, rejection_response
from proxy.h1client import UpstreamResponse
from proxy.headers import forward_headers, strip_hop_by_hop
from proxy.observer import NullObserver, RequestObserver
from proxy.routing import normalize_host
from proxy.runtime import RouteRuntime, RuntimeHolder
from proxy.upstream import OutboundRequest

__all__ = ["ProxyHandler", "InflightTracker"]

log = logging.getLogger("fender.proxy")

_CONNECT_MESSAGE = (
    "Fender does not tunnel CONNECT: send plain http:// URLs through the proxy and let the "
    "route's https:// upstream originate TLS"
)
_NO_BODY_STATUSES = frozenset((204, 304))
_SMALL_BODY = 64 * 1024
_BODY_ERRORS = (aiohttp.ClientPayloadError, aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)


class InflightTracker:
    """Counts requests in progress, so SIGTERM can wait for them to drain."""

    __slots__ = ("count", "_idle")

    def __init__(self) -> None:
        self.count = 0
        self._idle: asyncio.Event | None = None

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        while self.count:
            self._idle = asyncio.Event()
            await self._idle.wait()


class ProxyHandler:
    def __init__(
        self,
        holder: RuntimeHolder,
        *,
        bus: EventBus | None = None,
        observer: RequestObserver | None = None,
        inflight: InflightTracker | None = None,
    ) -> None:
        self.holder = holder
        self.bus = bus if bus is not None else EventBus()
        self.observer: RequestObserver = observer or NullObserver()
        self.inflight = inflight or InflightTracker()

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        self.inflight.enter()
        try:
            return await self._handle(request)
        finally:
            self.inflight.leave()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        started = loop.time()
        timer = perf_counter()  # uvloop's loop.time() ticks in whole milliseconds
        method = request.method
        rel = request.rel_url
        path = rel.raw_path
        headers = request.headers
        if method == "CONNECT":
            return self._unrouted(request, error_response(
                "method_not_allowed", _CONNECT_MESSAGE, status=405,
                headers={"allow": "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE"},
            ), "method_not_allowed", path, timer)
        route = self.holder.current.router.match(normalize_host(request.host), path, method, headers)
        if route is None:
            return self._unrouted(
                request, error_response("no_route", f"no route matches {method} {request.host}{path}"),
                "no_route", path, timer,
            )
        if route.strip:
            path = path[route.strip:] or "/"
            if not path.startswith("/"):
                path = "/" + path
        query = rel.raw_query_string
        path_qs = f"{path}?{query}" if query else path

        fwd = forward_headers(headers, drop_host=route.host_header is not None)
        if route.host_header is not None:
            fwd["Host"] = route.host_header
        if "x-request-id" not in fwd:
            # an id, not a secret: no getrandom() syscall per request
            fwd["x-request-id"] = f"{getrandbits(128):032x}"
        fwd.popall("expect", None)

        ctx = RequestContext(route.name, method, headers, client_ip=request.remote, bus=self.bus)
        try:
            body = await self._request_body(request, route, ctx)
        except (asyncio.IncompleteReadError, HttpProcessingError) as exc:
            # the body broke off or was malformed while being buffered for replay: nothing was sent
            message = f"the request body could not be read: {getattr(exc, 'message', None) or exc}"
            return self._unrouted(
                request, error_response("bad_request", message, route.name), "bad_request", path, timer,
                route=route.name,
            )
        ctx.request = OutboundRequest(method, path_qs, fwd, body)
        observer = self.observer
        observer.request_started(ctx, headers)

        status = 500
        outcome_kind = "success"
        try:
            try:
                outcome = await route.call(ctx)
            except FenderError as exc:
                outcome_kind = exc.kind
                response: web.StreamResponse = rejection_response(exc, route.name, ctx.attempts)
                status = response.status
                return response
            status = outcome.status
            if outcome.body is not None:
                outcome_kind = "fallback"
                return self._static(outcome, route, ctx)
            if status >= 500:
                outcome_kind = "upstream_error"
            response, outcome_kind = await self._relay(request, outcome, route, ctx, outcome_kind, started)
            status = response.status  # a body that broke off early became a 502 or 504
            return response
        except asyncio.CancelledError:
            outcome_kind = "client_abort"
            status = 499
            raise
        finally:
            observer.request_finished(ctx, method, path, status, outcome_kind, perf_counter() - timer)

    def refused(self, request: web.BaseRequest, status: int) -> None:
        """A request the HTTP parser refused (400): counted and logged, never forwarded."""
        try:
            path = request.rel_url.raw_path
        except Exception:  # the parser gave up before there was a usable target
            path = ""
        self._record(request, "", path, status, "bad_request", 0.0)

    def _unrouted(
        self, request: web.BaseRequest, response: web.Response, outcome: str, path: str, timer: float,
        *, route: str = "",
    ) -> web.Response:
        """Requests answered before any chain ran are still counted and logged."""
        self._record(request, route, path, response.status, outcome, perf_counter() - timer)
        return response

    def _record(
        self, request: web.BaseRequest, route: str, path: str, status: int, outcome: str, duration: float
    ) -> None:
        ctx = RequestContext(route, request.method, request.headers, client_ip=request.remote, bus=self.bus)
        self.observer.request_finished(ctx, request.method, path, status, outcome, duration)

    async def _request_body(
        self, request: web.BaseRequest, route: RouteRuntime, ctx: RequestContext
    ) -> bytes | AsyncIterator[bytes] | aiohttp.StreamReader | None:
        if not request.body_exists:
            return None
        if request.headers.get("expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        limit = route.buffer_limit
        length = request.content_length
        if limit and length is not None and length <= limit:
            # not request.read(): that enforces aiohttp's client_max_size (1 MiB) over max_body
            return await request.content.readexactly(length) if length else b""
        ctx.replayable = False
        if limit and length is None:
            # chunked: buffer what fits, stream the rest behind it
            content = request.content
            buffered = bytearray()
            while len(buffered) <= limit:
                chunk = await content.readany()
                if not chunk:
                    ctx.replayable = True
                    return bytes(buffered)
                buffered += chunk
            return _prefixed(bytes(buffered), content)
        return request.content

    @staticmethod
    def _static(outcome: Outcome, route: RouteRuntime, ctx: RequestContext) -> web.Response:
        headers = CIMultiDict(outcome.headers)
        headers.popall("content-length", None)
        headers["x-fender-route"] = route.name
        headers["x-fender-attempts"] = str(ctx.attempts)
        return web.Response(status=outcome.status, body=outcome.body, headers=headers)

    async def _relay(
        self,
        request: web.BaseRequest,
        outcome: Outcome,
        route: RouteRuntime,
        ctx: RequestContext,
        outcome_kind: str,
        started: float,
    ) -> tuple[web.StreamResponse, str]:
        upstream: UpstreamResponse = outcome.response
        headers = strip_hop_by_hop(upstream.headers)
        headers["x-fender-route"] = route.name
        headers["x-fender-attempts"] = str(ctx.attempts)
        content = upstream.content
        # the route's total timeout also bounds the body (as Envoy's route timeout does)
        deadline = started + route.body_budget if route.body_budget is not None else None
        length = upstream.content_length
        if length is not None and length <= _SMALL_BODY and request.method != "HEAD":
            # small bodies (the common case) go out in one write with their head
            try:
                if deadline is None or content.is_eof():
                    body = await upstream.read()
                else:
                    async with asyncio.timeout_at(deadline):
                        body = await upstream.read()
            except _BODY_ERRORS:
                upstream.close()
                return error_response(
                    "upstream_reset", "the upstream broke off the response body", route.name,
                    attempts=ctx.attempts,
                ), "upstream_reset"
            except TimeoutError:
                upstream.close()
                return error_response(
                    "timeout", f"the response body did not arrive within {route.body_budget:g}s",
                    route.name, attempts=ctx.attempts,
                ), "timeout"
            except BaseException:
                upstream.close()  # the client went away: the connection's state is unknown
                raise
            upstream.release()
            del headers["content-length"]
            return web.Response(status=upstream.status, reason=upstream.reason, body=body, headers=headers), outcome_kind
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        try:
            await response.prepare(request)
            if request.method != "HEAD" and upstream.status not in _NO_BODY_STATUSES:
                if deadline is None:
                    await _copy(content, response)
                else:
                    async with asyncio.timeout_at(deadline):
                        await _copy(content, response)
        except _BODY_ERRORS as exc:
            # the upstream broke mid-body: the client must see a broken response, not a short one
            log.debug("upstream reset mid-body on route %s: %s", route.name, exc)
            upstream.close()
            _abort(request)
            return response, "upstream_reset"
        except TimeoutError:
            upstream.close()
            _abort(request)
            return response, "timeout"
        except BaseException:
            upstream.close()
            raise
        upstream.release()
        await response.write_eof()
        return response, outcome_kind


async def _copy(content: aiohttp.StreamReader, response: web.StreamResponse) -> None:
    while True:
        chunk = await content.readany()
        if not chunk:
            return
        await response.write(chunk)


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _prefixed(prefix: bytes, rest: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    yield prefix
    while True:
        chunk = await rest.readany()
        if not chunk:
            return
        yield chunk
