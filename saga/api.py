"""HTTP handlers of `/v1/sagas` (SPEC section 8). Authentication is the admin app's job."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from config.units import parse_duration
from saga.coordinator import SagaConflict
from saga.model import SAGA_STATUSES, Saga, loads_json
from saga.store import SagaGone, StoreRefused

if TYPE_CHECKING:
    from saga.service import SagaService

__all__ = ["saga_routes", "MAX_WAIT", "DEFAULT_LIMIT", "MAX_LIMIT"]

log = logging.getLogger("fender.saga")

MAX_WAIT = 300.0
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _error(status: int, kind: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": kind, "message": message, **extra}, status=status, dumps=_dumps)


def _record(saga: Saga, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(saga.record(), status=status, headers=headers, dumps=_dumps)


class _BadQuery(Exception):
    pass


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _store_errors(handler: Handler) -> Handler:
    """A journal that cannot be read or written is a 503 with a JSON body, not a bare 500."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except SagaGone as exc:  # deleted while this request was working on it
            return _error(404, "not_found", str(exc))
        except StoreRefused as exc:  # a shared journal: another replica holds this saga's lease
            return _error(409, "saga_owned_elsewhere", str(exc))
        except Exception as exc:
            log.exception("saga API: %s %s failed", request.method, request.path)
            return _error(503, "saga_store_unavailable", f"the saga journal failed: {exc}")

    return wrapped


def _wait_seconds(request: web.Request) -> float:
    raw = request.query.get("wait")
    if raw is None or raw == "":
        return 0.0
    try:
        seconds = parse_duration(float(raw) if raw.replace(".", "", 1).isdigit() else raw)
    except ValueError as exc:
        raise _BadQuery(f"wait: {exc}") from None
    return min(seconds, MAX_WAIT)


def saga_routes(service: SagaService) -> list[web.RouteDef]:
    from saga.service import SagaExists, SagaInvalid

    coordinator = service.coordinator

    async def create(request: web.Request) -> web.Response:
        try:
            wait = _wait_seconds(request)
        except _BadQuery as exc:
            return _error(400, "bad_request", str(exc))
        try:
            body = await request.json(loads=loads_json)
        except (ValueError, RecursionError):  # (RecursionError: nested deeper than the decoder goes)
            return _error(
                400, "invalid_saga", "the body is not valid JSON",
                errors=[{"loc": "", "msg": "the body is not valid JSON"}],
            )
        try:
            saga, created = await service.create(body)
        except SagaInvalid as exc:
            return _error(400, "invalid_saga", str(exc), errors=exc.errors)
        except SagaExists as exc:
            return _error(409, "saga_exists", str(exc))
        location = f"/v1/sagas/{saga.id}"
        if wait:
            await coordinator.wait(saga.id, wait)
            saga = await coordinator.get(saga.id) or saga
        status = 202 if created and not (wait and saga.terminal) else 200
        return _record(saga, status, {"Location": location})

    async def list_sagas(request: web.Request) -> web.Response:
        query = request.query
        status: tuple[str, ...] | None = None
        if query.get("status"):
            status = tuple(s.strip() for s in query["status"].split(",") if s.strip())
            unknown = [s for s in status if s not in SAGA_STATUSES]
            if unknown:
                return _error(400, "bad_request", f"status: unknown status {unknown[0]!r}; use {', '.join(SAGA_STATUSES)}")
        try:
            limit = int(query.get("limit") or DEFAULT_LIMIT)
        except ValueError:
            return _error(400, "bad_request", "limit: not an integer")
        if not 1 <= limit <= MAX_LIMIT:
            return _error(400, "bad_request", f"limit: must be between 1 and {MAX_LIMIT}")
        try:
            page = await service.store.page(status, limit, query.get("cursor") or None)
        except ValueError as exc:
            return _error(
                400, "invalid_cursor", f"cursor: {exc}; use a next_cursor as returned, or none for the first page",
                errors=[{"loc": "cursor", "msg": str(exc)}],
            )
        running = coordinator.running()
        items = [(running.get(s.id) or s).record() for s in page.items]
        return web.json_response({"items": items, "next_cursor": page.next_cursor}, dumps=_dumps)

    async def get(request: web.Request) -> web.Response:
        saga_id = request.match_info["id"]
        try:
            wait = _wait_seconds(request)
        except _BadQuery as exc:
            return _error(400, "bad_request", str(exc))
        if wait:
            await coordinator.wait(saga_id, wait)
        saga = await coordinator.get(saga_id)
        if saga is None:
            return _error(404, "not_found", f"no saga {saga_id!r}")
        return _record(saga)

    async def delete(request: web.Request) -> web.Response:
        saga_id = request.match_info["id"]
        if coordinator.busy(saga_id):  # driven (or about to be, e.g. by a retry): not ours to delete
            return _error(409, "saga_not_terminal", f"saga {saga_id!r} is still running; cancel it first")
        result = await service.store.delete(saga_id)
        if result == "not_found":
            return _error(404, "not_found", f"no saga {saga_id!r}")
        if result == "not_terminal":
            return _error(409, "saga_not_terminal", f"saga {saga_id!r} is not finished; cancel it first")
        return web.Response(status=204)

    async def cancel(request: web.Request) -> web.Response:
        return await _drive(request, coordinator.cancel)

    async def retry(request: web.Request) -> web.Response:
        return await _drive(request, coordinator.retry)

    async def _drive(request: web.Request, action: Callable[[str], Awaitable[Saga | None]]) -> web.Response:
        """cancel and retry: start the action, optionally wait for a terminal status."""
        saga_id = request.match_info["id"]
        try:
            wait = _wait_seconds(request)
            saga = await action(saga_id)
        except _BadQuery as exc:
            return _error(400, "bad_request", str(exc))
        except SagaConflict as exc:
            return _error(409, "saga_conflict", str(exc))
        if saga is None:
            return _error(404, "not_found", f"no saga {saga_id!r}")
        if wait:
            await coordinator.wait(saga_id, wait)
            saga = await coordinator.get(saga_id) or saga
        return _record(saga, 200 if saga.terminal else 202)

    return [
        web.post("/v1/sagas", _store_errors(create)),
        web.get("/v1/sagas", _store_errors(list_sagas), allow_head=False),
        web.get("/v1/sagas/{id}", _store_errors(get), allow_head=False),
        web.delete("/v1/sagas/{id}", _store_errors(delete)),
        web.post("/v1/sagas/{id}/cancel", _store_errors(cancel)),
        web.post("/v1/sagas/{id}/retry", _store_errors(retry)),
    ]
