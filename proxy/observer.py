"""Hooks the data plane calls so telemetry can watch requests and upstream attempts.

The default observer does nothing; `proxy.telemetry` provides the real one. Policy
decisions do not come through here: they are `policies.events` on the EventBus.
"""

from __future__ import annotations

from typing import Any, Protocol

from multidict import CIMultiDict

from policies.base import RequestContext

__all__ = ["RequestObserver", "NullObserver"]


class RequestObserver(Protocol):
    def request_started(self, ctx: RequestContext, headers: Any) -> None:
        """Before the chain runs; `headers` are the inbound request's (for traceparent)."""

    def attempt_started(
        self, ctx: RequestContext, method: str, url: str, headers: CIMultiDict[str]
    ) -> Any:
        """Before each upstream attempt; may add headers (traceparent). Returns a token."""

    def attempt_finished(
        self, ctx: RequestContext, token: Any, status: int | None, error: BaseException | None
    ) -> None: ...

    def request_finished(
        self, ctx: RequestContext, method: str, path: str, status: int, outcome: str, duration: float
    ) -> None:
        """After the response was sent (or failed); `outcome` is a bounded word (see handler)."""


class NullObserver:
    __slots__ = ()

    def request_started(self, ctx: RequestContext, headers: Any) -> None:
        return None

    def attempt_started(
        self, ctx: RequestContext, method: str, url: str, headers: CIMultiDict[str]
    ) -> Any:
        return None

    def attempt_finished(
        self, ctx: RequestContext, token: Any, status: int | None, error: BaseException | None
    ) -> None:
        return None

    def request_finished(
        self, ctx: RequestContext, method: str, path: str, status: int, outcome: str, duration: float
    ) -> None:
        return None
