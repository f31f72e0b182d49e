"""The one place where failures become HTTP responses (SPEC section 5)."""

from __future__ import annotations

import json
import math

from aiohttp import web

from policies.errors import FenderError, RateLimited
from policies.rate_limit import ratelimit_headers

__all__ = ["STATUS_BY_KIND", "error_response", "rejection_response"]

STATUS_BY_KIND = {
    "no_route": 404,
    "timeout": 504,
    "circuit_open": 503,
    "rate_limited": 429,
    "bulkhead_full": 503,
    "upstream_unavailable": 502,
    "upstream_reset": 502,
    "bad_request": 400,
    "method_not_allowed": 405,
}


def error_response(
    kind: str,
    message: str,
    route: str | None = None,
    *,
    status: int | None = None,
    headers: dict[str, str] | None = None,
    attempts: int | None = None,
) -> web.Response:
    body = json.dumps({"error": kind, "route": route, "message": message}).encode()
    out = {"content-type": "application/json", "x-fender-error": kind}
    if route is not None:
        out["x-fender-route"] = route
        out["x-fender-attempts"] = str(attempts or 0)
    if headers:
        out.update(headers)
    return web.Response(status=status or STATUS_BY_KIND.get(kind, 500), body=body, headers=out)


def rejection_response(error: FenderError, route: str, attempts: int) -> web.Response:
    headers: dict[str, str] = {}
    if error.retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(error.retry_after)))
    if isinstance(error, RateLimited):
        headers.update(ratelimit_headers(error))
    return error_response(error.kind, error.message, route, headers=headers, attempts=attempts)
