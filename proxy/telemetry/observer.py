"""The data plane's and the saga coordinator's observers, feeding metrics, traces and the access log."""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict

from policies.base import RequestContext
from policies.events import Event
from proxy.telemetry.access_log import AccessLog
from proxy.telemetry.metrics import FenderMetrics

if TYPE_CHECKING:  # imported only where traces are exported (proxy.telemetry.tracing_switch)
    from proxy.telemetry.tracing import Tracing

__all__ = ["TelemetryObserver", "SagaTelemetry", "inbound_trace_id"]


# W3C trace-context: version-traceid-parentid-flags, lower-case hex, all-zero ids invalid
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(?:-.*)?")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def inbound_trace_id(headers: Mapping[str, str]) -> str | None:
    """The trace id of the caller's W3C traceparent (`00-<trace id>-<span id>-<flags>`), if well formed."""
    value = headers.get("traceparent")
    if value is None:
        return None
    match = _TRACEPARENT.match(value.strip())
    if match is None or match.group(1) == "ff" or match.group(2) == _ZERO_TRACE or match.group(3) == _ZERO_SPAN:
        return None
    return match.group(2)


class TelemetryObserver:
    """`proxy.observer.RequestObserver`; also subscribed to the EventBus (`on_event`)."""

    __slots__ = ("metrics", "tracing", "access_log")

    def __init__(self, metrics: FenderMetrics, tracing: Tracing | None, access_log: AccessLog | None) -> None:
        self.metrics = metrics
        self.tracing = tracing
        self.access_log = access_log

    def request_started(self, ctx: RequestContext, headers: Any) -> None:
        self.metrics.request_started(ctx.route)
        tracing = self.tracing
        if tracing is not None:
            ctx.span = tracing.request_span(ctx, headers)

    def attempt_started(self, ctx: RequestContext, method: str, url: str, headers: CIMultiDict[str]) -> Any:
        tracing = self.tracing
        if tracing is None:
            return None
        return tracing.attempt_span(ctx, method, url, headers)

    def attempt_finished(
        self, ctx: RequestContext, token: Any, status: int | None, error: BaseException | None
    ) -> None:
        self.metrics.attempt_finished(ctx.route, status, error)
        tracing = self.tracing
        if token is not None and tracing is not None:
            tracing.attempt_done(token, status, error)

    def request_finished(
        self, ctx: RequestContext, method: str, path: str, status: int, outcome: str, duration: float
    ) -> None:
        self.metrics.request_finished(ctx.route, method, status, outcome, duration)
        span = ctx.span
        tracing = self.tracing
        if span is not None and tracing is not None:
            tracing.request_done(span, status, outcome, ctx.attempts)
        access_log = self.access_log
        if access_log is not None:
            if span is not None and tracing is not None:
                trace_id = tracing.trace_id_of(span)
            else:
                trace_id = inbound_trace_id(ctx.headers)
            request = ctx.request
            # unrouted requests have no outbound request: the client's own id, if any
            headers = request.headers if request is not None else ctx.headers
            request_id = headers.get("x-request-id")
            access_log.log(ctx.route, method, path, status, ctx.attempts, duration, outcome, request_id, trace_id)

    def on_event(self, event: Event, ctx: RequestContext) -> None:
        self.metrics.on_event(event, ctx.route)
        tracing = self.tracing
        if tracing is not None:
            tracing.on_event(event, ctx)


class SagaTelemetry:
    """`saga.observer.SagaObserver`: saga counters and histograms, a span per saga and per call."""

    __slots__ = ("metrics", "tracing")

    def __init__(self, metrics: FenderMetrics, tracing: Tracing | None) -> None:
        self.metrics = metrics
        self.tracing = tracing

    def saga_started(self, saga_id: str) -> None:
        self.metrics.saga_started()
        if self.tracing is not None:
            self.tracing.saga_started(saga_id)

    def call_started(self, saga_id: str, step: str, phase: str, headers: MutableMapping[str, str]) -> None:
        if self.tracing is not None:
            self.tracing.saga_call_started(saga_id, step, phase, headers)

    def step_finished(self, saga_id: str, step: str, phase: str, duration: float, outcome: str) -> None:
        if outcome != "template_error":  # no call was made
            self.metrics.saga_step(phase, duration)
        if self.tracing is not None:
            self.tracing.saga_step_finished(saga_id, step, phase, outcome)

    def saga_finished(self, saga_id: str, status: str) -> None:
        self.metrics.saga_finished(status)
        if self.tracing is not None:
            self.tracing.saga_finished(saga_id, status)

    def saga_stopped(self, saga_id: str) -> None:
        """Driving ended without a terminal status (shutdown, journal error, lease lost)."""
        self.metrics.saga_stopped()
        if self.tracing is not None:
            self.tracing.saga_stopped(saga_id)
