"""How the coordinator calls a configured route: in-process, through the route's chain.

The proxy implements this (`proxy.invoker.ChainInvoker`); tests use fakes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = ["RouteResponse", "RouteInvoker", "UnknownRoute"]


@dataclass(frozen=True, slots=True)
class RouteResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes


class UnknownRoute(LookupError):
    """The route name is not in the current config."""


class RouteInvoker(Protocol):
    def has_route(self, name: str) -> bool: ...

    async def invoke(
        self,
        route: str,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes | None,
    ) -> RouteResponse:
        """Send one call through `route`'s chain and read the whole response.

        Raises `policies.errors.FenderError` subclasses (timeout, circuit_open,
        upstream_unavailable, upstream_reset, ...) when there is no response, and
        UnknownRoute when the route does not exist. Cancellation propagates.
        The caller applies its own step timeout around this call.
        """
        ...
