"""One config version made runnable: routes with their composed chains, and the router.

A `Runtime` is immutable once built. Reload builds a new one completely, then
`RuntimeHolder.swap` replaces the reference in one assignment; requests already
running keep the `RouteRuntime` they matched, so they finish on their old chain.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from config.loader import ConfigInvalid, ConfigIssue, LoadedConfig
from config.models import RouteModel
from policies.base import Call, Policy, compose
from policies.events import EventBus
from proxy.routing import RouteMatcher, Router
from proxy.upstream import Upstream, UpstreamPool

__all__ = ["RouteRuntime", "Runtime", "RuntimeHolder", "build_runtime"]


@dataclass(slots=True, eq=False)
class RouteRuntime:
    name: str
    model: RouteModel
    upstream: Upstream
    call: Call
    policies: Sequence[tuple[str, Policy]]
    buffer_limit: int  # request-body bytes buffered so that retries can replay them
    strip: int  # characters of path prefix to strip (0 = keep)
    host_header: str | None  # Host sent upstream; None keeps the client's
    body_budget: float | None  # the outermost timeout: it bounds the response body too


@dataclass(slots=True, eq=False)
class Runtime:
    loaded: LoadedConfig
    routes: Mapping[str, RouteRuntime]
    router: Router[RouteRuntime]
    loaded_at: float = field(default_factory=time.time)

    @property
    def hash(self) -> str:
        return self.loaded.hash


def build_runtime(loaded: LoadedConfig, factory: Any, pool: UpstreamPool, bus: EventBus) -> Runtime:
    """Everything a config version needs, built before it serves its first request."""
    config = loaded.config
    chains = factory.build(config)
    routes: dict[str, RouteRuntime] = {}
    entries = []
    for i, route in enumerate(config.routes):
        upstream = pool.get(route.upstream)
        try:
            upstream.pool  # noqa: B018 - builds the TLS context now, not at the first request
        except (OSError, ssl.SSLError) as exc:
            raise ConfigInvalid(
                [ConfigIssue(f"routes[{i}].upstream.tls", f"cannot set up TLS: {exc}")], loaded.source
            ) from exc
        chain = chains[route.name]
        policies = list(chain.policies)
        call = compose([p for _, p in policies], upstream.send)
        strip = len(route.match.path_prefix.rstrip("/")) if route.strip_prefix else 0
        rt = RouteRuntime(
            name=route.name,
            model=route,
            upstream=upstream,
            call=call,
            policies=policies,
            buffer_limit=chain.buffer_limit,
            strip=strip,
            host_header=None if route.preserve_host else upstream.host_header,
            body_budget=_outermost_timeout(policies),
        )
        routes[route.name] = rt
        entries.append((RouteMatcher(route.match), rt))
    return Runtime(loaded=loaded, routes=routes, router=Router(entries))


def _outermost_timeout(policies: Sequence[tuple[str, Policy]]) -> float | None:
    for _, policy in policies:
        if getattr(policy, "kind", None) == "timeout":
            duration = getattr(policy, "duration", None)
            return float(duration) if duration is not None else None
    return None


class RuntimeHolder:
    """The current Runtime; swapped atomically on reload."""

    __slots__ = ("current",)

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime

    def swap(self, runtime: Runtime) -> Runtime:
        old, self.current = self.current, runtime
        return old
