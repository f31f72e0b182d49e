"""The data plane: match a route, run its chain, relay the response.

Per request this builds one RequestContext and one OutboundRequest; everything
else (router, composed chains, upstream pools) was built with the config version.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
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
from proxy.flow import drop_traceback
from proxy.h1client import UpstreamResponse
from proxy.headers import forward_headers, strip_hop_by_hop
from proxy.observer import NullObserver, RequestObserver
from proxy.routing import normalize_host
from proxy.runtime import RouteRuntime, RuntimeHolder
from proxy.server import Exchange
from proxy.upstream import OutboundRequest

__all__ = ["ProxyHandler", "InflightTracker"]

log = logging.getLogger("fender.proxy")

_CONNECT_MESSAGE = (
    "Fender does not tunnel CONNECT: send plain http:// URLs through the proxy and let the "
    "route's https:// upstream originate TLS"
)
_NO_HEADERS: Mapping[str, str] = {}
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

    async def __call__(self, request: Exchange) -> None:
        # (one coroutine, not a wrapper around another: each level costs every request
        # a frame, and every resumption of it)
        inflight = self.inflight
        inflight.enter()
        try:
            timer = perf_counter()  # uvloop's loop.time() ticks in whole milliseconds
            method = request.method
            path = request.path
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
            query = request.query_string
            path_qs = f"{path}?{query}" if query else path

            fwd = forward_headers(headers, drop_host=route.host_header is not None)
            if route.host_header is not None:
                fwd["Host"] = route.host_header
            elif request.authority is not None:  # preserve_host of an absolute-form request
                fwd["Host"] = request.authority
            if "x-request-id" not in fwd:
                # an id, not a secret: no getrandom() syscall per request
                fwd["x-request-id"] = getrandbits(128).to_bytes(16, "big").hex()  # (cheaper than format())
            fwd.popall("expect", None)

            ctx = RequestContext(route.name, method, headers, client_ip=request.remote, bus=self.bus,
                                 task=request.task)
            try:
                # (most requests have no body: no coroutine to find that out)
                body = await self._request_body(request, route, ctx) if request.body_exists else None
            except (asyncio.IncompleteReadError, HttpProcessingError) as exc:
                # the body broke off or was malformed while being buffered for replay: nothing was sent
                return self._unrouted(request, _unreadable_body(exc, route.name, 0), "bad_request", path, timer,
                                      route=route.name)
            except asyncio.CancelledError:  # the client left while its body was being read
                self._record(method, headers, request.remote, route.name, path, 499, "client_abort",
                             perf_counter() - timer)
                raise
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
                    response = rejection_response(exc, route.name, ctx.attempts)
                    status = response.status
                    request.respond_with(response)
                    return
                except (asyncio.IncompleteReadError, HttpProcessingError) as exc:
                    # a streamed request body broke off or was malformed (say a bad chunk) mid-call
                    outcome_kind = "bad_request"
                    status = 400
                    request.respond_with(_unreadable_body(exc, route.name, ctx.attempts))
                    return
                if outcome.body is not None:
                    outcome_kind = "fallback"
                    # status stays 500 until the response is written: if writing raises, the
                    # server answers 500 internal_error, and that is what the client got
                    self._static(request, outcome, route, ctx)
                    status = outcome.status
                    return
                status = outcome.status
                if status >= 500:
                    outcome_kind = "upstream_error"
                upstream: UpstreamResponse = outcome.response
                length = upstream.content_length
                if (upstream.content.is_eof() and length is not None and length <= _SMALL_BODY
                        and method != "HEAD"):
                    # the whole response is in (the common case): no coroutine to relay it
                    status, outcome_kind = self._relay_whole(request, upstream, route, ctx, outcome_kind)
                else:
                    status, outcome_kind = await self._relay(request, upstream, length, route, ctx, outcome_kind,
                                                             timer)
            except asyncio.CancelledError:
                outcome_kind = "client_abort"
                status = 499
                raise
            except ConnectionError:  # the client went away while its response was written
                outcome_kind = "client_abort"
                status = 499
                raise
            except Exception:  # a bug: the server answers 500 internal_error (ProxyListener)
                outcome_kind = "internal_error"
                status = 500
                raise
            finally:
                observer.request_finished(ctx, method, path, status, outcome_kind, perf_counter() - timer)
        finally:
            inflight.leave()

    def refused(self, remote: str | None, status: int) -> None:
        """A request the HTTP parser refused (400): counted and logged, never forwarded."""
        self._record("", _NO_HEADERS, remote, "", "", status, "bad_request", 0.0)

    def _unrouted(
        self, request: Exchange, response: web.Response, outcome: str, path: str, timer: float,
        *, route: str = "",
    ) -> None:
        """Requests answered before any chain ran are still counted and logged."""
        request.respond_with(response)
        self._record(request.method, request.headers, request.remote, route, path, response.status, outcome,
                     perf_counter() - timer)

    def _record(
        self, method: str, headers: Mapping[str, str], remote: str | None, route: str, path: str, status: int,
        outcome: str, duration: float,
    ) -> None:
        ctx = RequestContext(route, method, headers, client_ip=remote, bus=self.bus)
        self.observer.request_finished(ctx, method, path, status, outcome, duration)

    async def _request_body(
        self, request: Exchange, route: RouteRuntime, ctx: RequestContext
    ) -> bytes | AsyncIterator[bytes] | aiohttp.StreamReader:
        coding = request.headers.get("transfer-encoding")
        if coding is not None and coding.strip().lower() != "chunked":
            # aiohttp's parser takes `gzip, chunked` as chunked and drops the gzip: the upstream
            # would get gzip bytes as the content. Only chunked is understood here.
            raise HttpProcessingError(message=f"Transfer-Encoding {coding!r} is not supported (only chunked)")
        if request.headers.get("expect", "").lower() == "100-continue":
            request.send_continue()
        limit = route.buffer_limit
        length = request.content_length
        if limit and length is not None and length <= limit:
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
    def _static(request: Exchange, outcome: Outcome, route: RouteRuntime, ctx: RequestContext) -> None:
        headers = CIMultiDict(outcome.headers)
        headers["x-fender-route"] = route.name
        headers["x-fender-attempts"] = str(ctx.attempts)
        request.respond(outcome.status, headers, outcome.body or b"")

    @staticmethod
    def _relay_whole(
        request: Exchange, upstream: UpstreamResponse, route: RouteRuntime, ctx: RequestContext, outcome_kind: str,
    ) -> tuple[int, str]:
        """`_relay` for a small response already received whole, without awaiting anything."""
        try:
            body = upstream.content.read_nowait()
        except _BODY_ERRORS:
            return _broke_off(request, upstream, route, ctx)
        except BaseException:
            upstream.close()  # the connection's state is unknown
            raise
        upstream.release()
        request.respond(upstream.status, _response_headers(upstream, route, ctx), body, upstream.reason)
        return upstream.status, outcome_kind

    async def _relay(
        self,
        request: Exchange,
        upstream: UpstreamResponse,
        length: int | None,
        route: RouteRuntime,
        ctx: RequestContext,
        outcome_kind: str,
        timer: float,
    ) -> tuple[int, str]:
        """Relay the upstream response (`length`: its Content-Length); returns the status the client saw and the outcome."""
        headers = _response_headers(upstream, route, ctx)
        content = upstream.content
        # the route's total timeout also bounds the body (as Envoy's route timeout does)
        budget = route.body_budget
        if length is not None and length <= _SMALL_BODY and request.method != "HEAD":
            # a small body still arriving is awaited, then goes out in one write with its head
            try:
                if budget is None:
                    body = await upstream.read()
                else:
                    async with asyncio.timeout_at(_body_deadline(request, budget, timer)):
                        body = await upstream.read()
            except _BODY_ERRORS as exc:
                drop_traceback(exc)
                return _broke_off(request, upstream, route, ctx)
            except TimeoutError:
                upstream.close()
                request.respond_with(error_response(
                    "timeout", f"the response body did not arrive within {budget:g}s",
                    route.name, attempts=ctx.attempts,
                ))
                return 504, "timeout"
            except BaseException:
                upstream.close()  # the client went away: the connection's state is unknown
                raise
            upstream.release()
            request.respond(upstream.status, headers, body, upstream.reason)
            return upstream.status, outcome_kind
        try:
            if request.start(upstream.status, headers, upstream.reason, length):
                if budget is None:
                    await _copy(content, request)
                else:
                    async with asyncio.timeout_at(_body_deadline(request, budget, timer)):
                        await _copy(content, request)
                request.finish()
        except _BODY_ERRORS as exc:
            # the upstream broke mid-body: the client must see a broken response, not a short one
            log.debug("upstream reset mid-body on route %s: %s", route.name, exc)
            drop_traceback(exc)
            upstream.close()
            request.abort()
            return upstream.status, "upstream_reset"
        except TimeoutError:
            upstream.close()
            request.abort()
            return upstream.status, "timeout"
        except BaseException:
            upstream.close()
            raise
        upstream.release()
        return upstream.status, outcome_kind


def _response_headers(upstream: UpstreamResponse, route: RouteRuntime, ctx: RequestContext) -> CIMultiDict[str]:
    headers = strip_hop_by_hop(upstream.headers)
    headers["x-fender-route"] = route.name
    headers["x-fender-attempts"] = str(ctx.attempts)
    return headers


def _broke_off(request: Exchange, upstream: UpstreamResponse, route: RouteRuntime, ctx: RequestContext) -> tuple[int, str]:
    """502: the upstream broke off a small response's body before the client got anything."""
    upstream.close()
    request.respond_with(error_response(
        "upstream_reset", "the upstream broke off the response body", route.name, attempts=ctx.attempts,
    ))
    return 502, "upstream_reset"


def _body_deadline(request: Exchange, budget: float, timer: float) -> float:
    """When the route's total timeout runs out, in loop time (`timer` is the request's start)."""
    # (not asyncio.get_running_loop(): that costs a getpid() syscall)
    return request.loop.time() + budget - (perf_counter() - timer)


def _unreadable_body(exc: Exception, route: str, attempts: int) -> web.Response:
    """400: the client's body broke off or was malformed (say a bad chunk)."""
    detail = getattr(exc, "message", None) or exc
    return error_response("bad_request", f"the request body could not be read: {detail}", route, attempts=attempts)


async def _copy(content: aiohttp.StreamReader, request: Exchange) -> None:
    while True:
        chunk = await content.readany()
        if not chunk:
            return
        await request.write(chunk)


async def _prefixed(prefix: bytes, rest: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    yield prefix
    while True:
        chunk = await rest.readany()
        if not chunk:
            return
        yield chunk
