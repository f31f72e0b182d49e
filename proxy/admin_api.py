"""The admin API of SPEC section 7 (config, reload, routes, breakers, OpenAPI) and its guard.

`install(app)` adds the routes and the auth middleware to a FenderApp, and the
config-file watcher to its services. Mutating calls (POST, PUT, PATCH, DELETE)
from a peer outside loopback need `Authorization: Bearer $FENDER_ADMIN_TOKEN`:
401 when a token is configured and the header is missing or wrong, 403 when no
token is configured. Loopback peers (127.0.0.0/8, ::1) are trusted: in a pod
that is the pod itself, which is the sidecar's trust boundary.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from config.redact import redact, redact_url
from policies.base import RequestContext
from policies.circuit_breaker import CircuitBreakerPolicy
from policies.events import BreakerTransitioned
from proxy.breaker_resets import ResetAnnouncer, ResetFollower
from proxy.config_watch import ConfigWatcher, fingerprint, interval_from_env
from proxy.openapi import openapi_document
from proxy.workers import live_supervisor, shared_directory

if TYPE_CHECKING:
    from proxy.app import FenderApp
    from proxy.runtime import Runtime

__all__ = ["install", "admin_routes", "auth_middleware", "peer_address", "is_loopback", "breakers_of", "find_breaker",
           "reset_breaker_named"]

log = logging.getLogger("fender")

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PeerFn = Callable[[web.BaseRequest], str | None]


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(value, status=status, headers=headers, dumps=_dumps)


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json({"error": kind, "message": message}, status=status, headers=headers)


# -- the guard ----------------------------------------------------------------------------


def peer_address(request: web.BaseRequest) -> str | None:
    """The TCP peer's address; never a forwarded-for header, which a client can forge."""
    transport = request.transport
    if transport is None:
        return None
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple | list) and peer:
        return str(peer[0])
    return None


def is_loopback(address: str | None) -> bool:
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def auth_middleware(token: str | None, peer: PeerFn = peer_address) -> Any:
    """Guard mutating calls; `peer` is injectable so tests can play a remote client."""
    token = (token or "").strip()  # a Secret made with --from-file ends in a newline
    expected = token.encode() if token else None

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method not in MUTATING or is_loopback(peer(request)):
            return await handler(request)
        if expected is None:
            return _error(403, "forbidden",
                          "mutating admin calls from outside loopback need FENDER_ADMIN_TOKEN to be set")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # compare_digest on bytes of any length: no early exit that leaks the token's prefix
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            return _error(401, "unauthorized", "a valid bearer token is required",
                          headers={"WWW-Authenticate": 'Bearer realm="fender-admin"'})
        return await handler(request)

    return guard


# -- views of the running config --------------------------------------------------------


def breakers_of(runtime: Runtime) -> dict[str, tuple[CircuitBreakerPolicy, list[str]]]:
    """Each breaker by its admin name (a shared policy's name, or `<route>.<label>`) and its routes."""
    out: dict[str, tuple[CircuitBreakerPolicy, list[str]]] = {}
    for name, _label, policy, _shared, route in _policies(runtime):
        if isinstance(policy, CircuitBreakerPolicy):
            _, routes = out.setdefault(name, (policy, []))
            routes.append(route)
    return out


def find_breaker(runtime: Runtime, name: str) -> tuple[str, CircuitBreakerPolicy, list[str]] | None:
    """The breaker GET /breakers calls `name`, or else the only breaker of the route `name`.

    An inline breaker's own name (`<route>.circuit_breaker`) is one a caller has to look
    up first; its route's name is the one in hand (metrics, `x-fender-route`).
    """
    found = breakers_of(runtime)
    if name in found:
        return (name, *found[name])
    of_route = [(n, policy, routes) for n, (policy, routes) in found.items() if name in routes]
    return of_route[0] if len(of_route) == 1 else None


def _policies(runtime: Runtime) -> Iterator[tuple[str, str, Any, bool, str]]:
    """(admin name, label, policy, shared, route) for every policy of every route."""
    config = runtime.loaded.config
    for route in runtime.routes.values():
        items = config.chain_of(route.model)
        for index, (label, policy) in enumerate(route.policies):
            shared = index < len(items) and isinstance(items[index], str)
            yield (label if shared else f"{route.name}.{label}"), label, policy, shared, route.name


def _describe(policy: Any) -> dict[str, Any]:
    describe = getattr(policy, "describe", None)
    if callable(describe):
        try:
            info = describe()
        except Exception as exc:  # a state view must not break the whole listing
            return {"kind": getattr(policy, "kind", type(policy).__name__), "error": str(exc)}
        return dict(info) if isinstance(info, dict) else {"state": info}
    return {"kind": getattr(policy, "kind", type(policy).__name__)}


def route_inflight(fender: FenderApp) -> dict[str, int] | None:
    """Requests in progress per route, from telemetry's `fender_inflight_requests` gauge.

    None when telemetry is not installed (the data plane keeps no per-route count itself).
    """
    gauge = getattr(getattr(getattr(fender, "telemetry", None), "metrics", None), "inflight", None)
    collect = getattr(gauge, "collect", None)
    if not callable(collect):
        return None
    out: dict[str, int] = {}
    for family in collect():
        for sample in family.samples:
            route = sample.labels.get("route")
            if route is not None:
                out[route] = int(sample.value)
    return out


def routes_view(runtime: Runtime, inflight: dict[str, int] | None = None) -> list[dict[str, Any]]:
    chains: dict[str, list[dict[str, Any]]] = {}
    for name, label, policy, shared, route_name in _policies(runtime):
        entry = {"label": label, **_describe(policy), "shared": shared}
        if isinstance(policy, CircuitBreakerPolicy):
            entry["breaker"] = name
        chains.setdefault(route_name, []).append(entry)
    out = []
    for route in runtime.routes.values():
        model = route.model
        out.append({
            "name": route.name,
            "match": redact(model.match.model_dump(mode="json", exclude_none=True)),
            "upstream": redact_url(model.upstream.url),
            "strip_prefix": model.strip_prefix,
            "preserve_host": model.preserve_host,
            "in_flight": None if inflight is None else inflight.get(route.name, 0),
            "chain": chains.get(route.name, []),
        })
    return out


def _breaker_view(name: str, policy: CircuitBreakerPolicy, routes: list[str]) -> dict[str, Any]:
    return {**_describe(policy), "name": name, "routes": routes}


# -- routes -----------------------------------------------------------------------------


def admin_routes(fender: FenderApp, resets: ResetAnnouncer | None = None) -> list[web.RouteDef]:
    """`resets`: with `--workers N`, how worker 0 tells the others of a breaker reset."""

    async def get_config(request: web.Request) -> web.Response:
        runtime = fender.runtime
        last = fender.last_reload
        return _json({
            "hash": runtime.hash,
            "loaded_at": runtime.loaded_at,
            "source": runtime.loaded.source,
            "config": redact(runtime.loaded.raw),
            "last_reload": last.as_dict() if last is not None else None,
        })

    async def post_reload(request: web.Request) -> web.Response:
        result = await fender.reload("api")
        if not result.ok:
            return _json({"ok": False, "errors": [e.as_dict() for e in result.errors]}, status=400)
        if not result.unchanged:
            _tell_sibling_workers(fender)
        return _json({"ok": True, "hash": result.hash, "result": result.result})

    async def get_routes(request: web.Request) -> web.Response:
        runtime = fender.runtime
        return _json({
            "hash": runtime.hash,
            "in_flight": fender.inflight.count,
            "routes": routes_view(runtime, route_inflight(fender)),
        })

    async def get_breakers(request: web.Request) -> web.Response:
        found = breakers_of(fender.runtime)
        return _json({"breakers": [_breaker_view(n, p, r) for n, (p, r) in found.items()]})

    async def reset_breaker(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        found = reset_breaker_named(fender, name)
        if found is None:
            return _error(404, "not_found", f"no circuit breaker named {name!r} (see GET /breakers)")
        if resets is not None:
            resets.announce(found[0])
        return _json(_breaker_view(*found))

    async def get_openapi(request: web.Request) -> web.Response:
        from proxy.cli import _version

        return _json(openapi_document(_version()))

    return [
        web.get("/config", get_config),
        web.post("/config/reload", post_reload),
        web.get("/routes", get_routes),
        web.get("/breakers", get_breakers),
        web.post("/breakers/{name}/reset", reset_breaker),
        web.get("/openapi.json", get_openapi),
    ]


def reset_breaker_named(fender: FenderApp, name: str) -> tuple[str, CircuitBreakerPolicy, list[str]] | None:
    """Force the breaker `name` (see `find_breaker`) closed; None if there is none."""
    found = find_breaker(fender.runtime, name)
    if found is None:
        return None
    name, policy, routes = found
    before = policy.state.value
    policy.reset()
    after = policy.state.value
    if before != after:
        # metrics and traces learn of transitions through events; tell them once per route
        event = BreakerTransitioned(policy.name, before, after)
        for route in routes:
            fender.bus.emit(event, RequestContext(route, "POST", {}, bus=fender.bus))
    log.info("circuit breaker reset", extra={"breaker": name, "from": before})
    return found


def _tell_sibling_workers(fender: FenderApp) -> None:
    """With `--workers N` the parent forwards SIGHUP to every worker, so all of them reload."""
    supervisor = live_supervisor() if fender.settings.workers > 1 else None
    if supervisor is not None:
        try:
            os.kill(supervisor, signal.SIGHUP)
        except OSError:
            log.warning("could not ask the other workers to reload")


def install(fender: FenderApp) -> None:
    fender.admin_middlewares.append(auth_middleware(fender.settings.admin_token))
    fender.admin_routes.extend(admin_routes(fender, _share_resets(fender)))
    interval = interval_from_env()
    if interval > 0:
        # fingerprinted now, right after the initial load, so an edit before start() is not missed
        watcher = ConfigWatcher(
            fender.config_path, _file_reload(fender), interval=interval, seen=fingerprint(fender.config_path)
        )
        fender.services.append(watcher)


def _share_resets(fender: FenderApp) -> ResetAnnouncer | None:
    """With `--workers N`: worker 0 announces its breaker resets, the others follow them."""
    shared = shared_directory(fender.settings)
    if shared is None:
        return None
    directory, index = shared
    if index == 0:
        return ResetAnnouncer(directory)
    fender.worker_services.append(ResetFollower(directory, lambda name: reset_breaker_named(fender, name)))
    return None


def _file_reload(fender: FenderApp) -> Callable[[str], Awaitable[Any]]:
    async def reload(trigger: str) -> Any:
        result = await fender.reload(trigger)
        if result.ok and not result.unchanged:
            _tell_sibling_workers(fender)
        return result

    return reload
