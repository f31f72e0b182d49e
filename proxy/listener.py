"""The proxy listener's low-level aiohttp server, with SPEC-shaped errors for malformed requests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy.errors import error_response

__all__ = ["ProxyServer"]


class _ProxyRequestHandler(RequestHandler):
    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if 400 <= status < 500:
            # the HTTP parser refused the request: nothing was forwarded
            text = (message or "").strip().splitlines()
            detail = text[0].rstrip(":") if text else "malformed HTTP request"
            response = error_response("bad_request", f"malformed request: {detail}", status=status)
            response.force_close()
            manager = self._manager
            if isinstance(manager, ProxyServer) and manager.on_refused is not None:
                manager.on_refused(request, response.status)
            return response
        return super().handle_error(request, status, exc, message)


class ProxyServer(web.Server):
    # told of every request the parser refused, so that it is counted and logged too
    on_refused: Callable[[Any, int], None] | None = None

    def __call__(self) -> RequestHandler:
        return _ProxyRequestHandler(self, loop=self._loop, **self._kwargs)
