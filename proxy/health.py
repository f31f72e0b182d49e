"""`/healthz`, `/readyz` and `/metrics`, served on both the metrics and the admin listener."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

__all__ = ["health_routes"]


def health_routes(
    is_ready: Callable[[], bool], metrics_text: Callable[[], tuple[bytes, str]]
) -> list[web.RouteDef]:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        if is_ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = metrics_text()
        response = web.Response(body=body)
        response.headers["content-type"] = content_type
        return response

    return [
        web.get("/healthz", healthz, allow_head=True),
        web.get("/readyz", readyz, allow_head=True),
        web.get("/metrics", metrics),
    ]
