"""FallbackPolicy: answer with a fixed response when the call fails in a listed way.

`on` lists failure kinds (`circuit_open`, `timeout`, `rate_limited`,
`bulkhead_full`, `upstream_unavailable`, `upstream_reset`) and `5xx`, which
matches an upstream response with a 5xx status (that response is released and
replaced). A dict or list body is served as JSON.
"""

from __future__ import annotations

import json
from asyncio import Task
from collections.abc import Iterable, Mapping
from typing import Any

from policies.base import Call, Outcome, RequestContext
from policies.errors import FenderError
from policies.events import FallbackServed

__all__ = ["FallbackPolicy", "FALLBACK_KINDS"]

FALLBACK_KINDS = (
    "circuit_open", "timeout", "rate_limited", "bulkhead_full",
    "upstream_unavailable", "upstream_reset", "5xx",
)


class FallbackPolicy:
    __slots__ = ("name", "kinds", "on_5xx", "status", "headers", "body", "_events")

    kind = "fallback"
    needs_task = False
    settles = True
    defers = False
    resumes = False
    recovers = True  # an error it is configured for becomes its response
    clock = None  # it never asks the time, so it fuses with guards on any clock

    def __init__(
        self,
        on: Iterable[str] = ("circuit_open", "timeout", "5xx"),
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        body: str | bytes | dict[str, Any] | list[Any] = "",
        *,
        name: str = "fallback",
    ) -> None:
        kinds = frozenset(on)
        unknown = kinds - set(FALLBACK_KINDS)
        if unknown:
            raise ValueError(f"unknown failure kinds: {', '.join(sorted(unknown))}")
        self.name = name
        self.kinds = kinds - {"5xx"}
        self.on_5xx = "5xx" in kinds
        self.status = status
        # x-fender-fallback is Fender's to set (outcome): a configured one would go out twice
        out_headers = {k: v for k, v in (headers or {}).items() if k.lower() != "x-fender-fallback"}
        if isinstance(body, dict | list):
            data = json.dumps(body, separators=(",", ":")).encode()
            if not any(k.lower() == "content-type" for k in out_headers):
                out_headers["Content-Type"] = "application/json"
        else:
            data = body.encode() if isinstance(body, str) else body
        self.headers = out_headers
        self.body = data
        self._events = {kind: FallbackServed(kind) for kind in FALLBACK_KINDS}

    def outcome(self, kind: str) -> Outcome:
        # a fresh header dict each time: the proxy adds its own headers to it. The kind tells
        # the client (and whoever reads its logs) that this answer stands in for a failure.
        headers = dict(self.headers)
        headers["x-fender-fallback"] = kind
        return Outcome(self.status, headers, body=self.body)

    # -- as a guard (policies.guard): nothing before the call; after it, the answer may be replaced

    def enter(self, ctx: RequestContext, now: float, task: Task[Any] | None) -> None:
        return None

    def exit(self, ctx: RequestContext, token: None, started: float, outcome: Outcome) -> Outcome:
        if self.on_5xx and outcome.status >= 500:
            outcome.release()
            ctx.emit(self._events["5xx"])
            return self.outcome("5xx")
        return outcome

    def exit_error(self, ctx: RequestContext, token: None, started: float, error: BaseException) -> Outcome:
        if isinstance(error, FenderError) and error.kind in self.kinds:
            ctx.emit(self._events[error.kind])
            return self.outcome(error.kind)
        try:
            raise error
        finally:
            del error  # (the traceback holds this frame: see Guard.exit_error)

    async def __call__(self, call: Call, ctx: RequestContext) -> Outcome:
        try:
            outcome = await call(ctx)
        except FenderError as error:
            return self.exit_error(ctx, None, 0.0, error)
        return self.exit(ctx, None, 0.0, outcome)

    def describe(self) -> dict[str, Any]:
        on = sorted(self.kinds | ({"5xx"} if self.on_5xx else set()))
        return {"kind": self.kind, "name": self.name, "on": on, "status": self.status}
