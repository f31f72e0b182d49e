"""The admin listener (SPEC section 7). Health and metrics here too."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from proxy.health import health_routes

if TYPE_CHECKING:
    from proxy.app import FenderApp

__all__ = ["build_admin_app"]


def build_admin_app(fender: FenderApp) -> web.Application:
    app = web.Application(middlewares=list(fender.admin_middlewares))
    app.add_routes(health_routes(lambda: fender.ready, lambda: fender.metrics_text()))
    app.add_routes(fender.admin_routes)
    return app
