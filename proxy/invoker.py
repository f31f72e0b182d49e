"""Calls a configured route by name, in-process, through its current chain (for sagas)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import aiohttp
from multidict import CIMultiDict

from policies.base import RequestContext
from policies.errors import FenderError, UpstreamReset
from proxy.app import FenderApp
from proxy.errors import STATUS_BY_KIND
from proxy.flow import drop_traceback
from proxy.headers import strip_hop_by_hop
from proxy.upstream import OutboundRequest
from saga.invoker import RouteResponse, UnknownRoute

__all__ = ["ChainInvoker"]


class ChainInvoker:
    """`saga.invoker.RouteInvoker` over the live runtime of a FenderApp."""

    def __init__(self, app: FenderApp) -> None:
        self.app = app

    def has_route(self, name: str) -> bool:
        return self.app.holder is not None and name in self.app.runtime.routes

    async def invoke(
        self,
        route: str,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes | None,
    ) -> RouteResponse:
        runtime = self.app.runtime
        target = runtime.routes.get(route)
        if target is None:
            raise UnknownRoute(route)
        if not path.startswith("/"):
            path = "/" + path
        out: CIMultiDict[str] = strip_hop_by_hop(CIMultiDict(headers))
        if target.host_header is not None or "host" not in out:
            # a saga call has no client Host to preserve: the upstream's authority it is
            out["Host"] = target.host_header or target.upstream.host_header
        ctx = RequestContext(route, method.upper(), out, client_ip="127.0.0.1", bus=self.app.bus)
        ctx.request = OutboundRequest(method.upper(), path, out, body)
        observer = self.app.observer
        observer.request_started(ctx, out)
        started = time.monotonic()
        status, kind = 500, "success"  # the handler's outcome words, for telemetry
        try:
            try:
                outcome = await target.call(ctx)
            except FenderError as exc:
                status, kind = STATUS_BY_KIND.get(exc.kind, 500), exc.kind
                raise
            status = outcome.status
            if outcome.body is not None:  # a fallback answered
                kind = "fallback"
                return RouteResponse(outcome.status, dict(outcome.headers), outcome.body)
            if status >= 500:
                kind = "upstream_error"
            response: aiohttp.ClientResponse = outcome.response
            try:
                data = await response.read()
            except (aiohttp.ClientPayloadError, aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
                kind = "upstream_reset"
                drop_traceback(exc)
                raise UpstreamReset(f"route {route}: the response body broke off: {exc}") from exc
            finally:
                response.release()
            return RouteResponse(outcome.status, dict(strip_hop_by_hop(response.headers)), data)
        except asyncio.CancelledError:
            status, kind = 499, "client_abort"
            raise
        finally:
            observer.request_finished(ctx, ctx.method, path, status, kind, time.monotonic() - started)
