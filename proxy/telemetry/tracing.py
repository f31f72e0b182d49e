"""OpenTelemetry tracing: SERVER span per request, CLIENT span per upstream attempt, saga spans.

Tracing exists only when an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT`
or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); otherwise `Tracing.from_env` returns None
and the data plane never touches OpenTelemetry. Spans go over OTLP/HTTP (protobuf)
through a batch processor, so exporting happens on the SDK's thread. Every other
`OTEL_*` variable (service name, resource attributes, sampler, batch sizes,
headers, timeouts) has its standard meaning.

The provider belongs to the app, not to the process-wide OpenTelemetry globals, so
that two apps in one process (tests) export to their own endpoints.

Attribute names follow the stable HTTP semantic conventions (`http.request.method`,
`url.path`, `http.response.status_code`, `http.request.resend_count`, `error.type`,
...); Fender's own attributes are under `fender.`. The query string is not
recorded on SERVER spans (it often carries tokens).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import fields
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from yarl import URL

from policies.base import RequestContext
from policies.events import Event
from proxy.telemetry.tracing_switch import tracing_configured

__all__ = ["Tracing", "tracing_configured", "format_traceparent", "trace_id_of"]

log = logging.getLogger("fender.telemetry")

_PROPAGATOR = TraceContextTextMapPropagator()
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"))
_SAGA_HEADER = "x-fender-saga-id"


def format_traceparent(span: Span) -> str:
    sc = span.get_span_context()
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


def trace_id_of(span: Span) -> str | None:
    trace_id = span.get_span_context().trace_id
    return f"{trace_id:032x}" if trace_id else None


def _method_attributes(method: str) -> dict[str, Any]:
    if method in _METHODS:
        return {"http.request.method": method}
    return {"http.request.method": "_OTHER", "http.request.method_original": method}


def _event_attributes(event: Event, cache: dict[type, tuple[str, ...]]) -> dict[str, Any]:
    names = cache.get(type(event))
    if names is None:
        names = cache[type(event)] = tuple(f.name for f in fields(event))  # type: ignore[arg-type]
    return {f"fender.{name}": getattr(event, name) for name in names}


class Tracing:
    def __init__(self, provider: TracerProvider, version: str = "") -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("fender", version or None)
        # with a parent-based sampler (the default, and every `parentbased_*` choice) a child
        # of an unsampled span is never sampled, so it need not be created at all
        sampler = provider.sampler
        self._children_follow_parent = isinstance(sampler, ParentBased) and isinstance(
            getattr(sampler, "_local_parent_not_sampled", None), type(ALWAYS_OFF)
        )
        self._event_fields: dict[type, tuple[str, ...]] = {}
        self._sagas: dict[str, Span] = {}
        self._steps: dict[tuple[str, str, str], Span] = {}

    @classmethod
    def from_env(cls, version: str = "", environ: Mapping[str, str] = os.environ) -> Tracing | None:
        """A Tracing exporting over OTLP/HTTP, or None when no endpoint is configured."""
        if not tracing_configured(environ):
            return None
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        if protocol and protocol.strip() != "http/protobuf":
            log.warning("OTLP protocol %s is not supported; exporting traces over http/protobuf", protocol)
        resource = Resource.create({"service.version": version} if version else {})
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: "fender"}))
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider, version)

    # -- requests ---------------------------------------------------------------------
    def request_span(self, ctx: RequestContext, headers: Any) -> Span:
        """SERVER span continuing the caller's traceparent (INTERNAL for a saga's in-process call).

        Attributes are built only for a recorded span, and given after the start so
        the SDK validates them once (the sampler does not look at them).
        """
        parent = _PROPAGATOR.extract(headers) if "traceparent" in headers else None
        method = ctx.method
        saga_id = headers.get(_SAGA_HEADER)
        span = self.tracer.start_span(
            method if method in _METHODS else "HTTP",
            context=parent,
            kind=SpanKind.SERVER if saga_id is None else SpanKind.INTERNAL,
        )
        if not span.is_recording():
            return span
        attributes = _method_attributes(method)
        attributes["fender.route"] = ctx.route
        request = ctx.request
        if request is not None:
            attributes["url.path"] = request.path_qs.partition("?")[0]
        if saga_id is not None:
            attributes["fender.saga.id"] = saga_id
        else:
            attributes["url.scheme"] = "http"
            host = headers.get("host")
            if host:
                if host.startswith("["):  # [v6]:port
                    name, _, port = host[1:].partition("]")
                    port = port[1:]
                else:
                    name, _, port = host.partition(":")
                attributes["server.address"] = name
                if port.isdigit():
                    attributes["server.port"] = int(port)
            if ctx.client_ip:
                attributes["client.address"] = ctx.client_ip
            agent = headers.get("user-agent")
            if agent:
                attributes["user_agent.original"] = agent
        span.set_attributes(attributes)
        return span

    def attempt_span(
        self, ctx: RequestContext, method: str, full_url: str, headers: MutableMapping[str, str]
    ) -> Span | None:
        """CLIENT span for one upstream attempt; its context goes upstream in `traceparent`."""
        parent = ctx.span
        if parent is not None and self._children_follow_parent and not parent.get_span_context().trace_flags.sampled:
            # an unsampled request has unsampled attempts: pass its context on, build nothing
            headers["traceparent"] = format_traceparent(parent)
            return None
        span = self.tracer.start_span(
            method if method in _METHODS else "HTTP",
            context=trace.set_span_in_context(parent) if parent is not None else None,
            kind=SpanKind.CLIENT,
        )
        headers["traceparent"] = format_traceparent(span)
        if span.is_recording():
            attributes = _method_attributes(method)
            try:
                url = URL(full_url, encoded=True)
            except ValueError:  # (a target such as `*`): the span still ends, without an address
                url = None
            if url is not None:
                attributes["server.address"] = url.raw_host or ""
                if url.port is not None:
                    attributes["server.port"] = url.port
            attributes["url.full"] = full_url
            if ctx.attempts > 1:
                attributes["http.request.resend_count"] = ctx.attempts - 1
            span.set_attributes(attributes)
        return span

    trace_id_of = staticmethod(trace_id_of)

    @staticmethod
    def attempt_done(span: Span, status: int | None, error: BaseException | None) -> None:
        if span.is_recording():
            if status is not None:
                if status >= 500:
                    span.set_attributes({"http.response.status_code": status, "error.type": str(status)})
                    span.set_status(Status(StatusCode.ERROR))
                else:
                    span.set_attribute("http.response.status_code", status)
            elif error is not None:
                kind = getattr(error, "kind", None) or type(error).__name__
                span.set_attribute("error.type", kind)
                span.set_status(Status(StatusCode.ERROR, str(error) or kind))
        span.end()

    @staticmethod
    def request_done(span: Span, status: int, outcome: str, attempts: int) -> None:
        if span.is_recording():
            attributes: dict[str, Any] = {
                "http.response.status_code": status, "fender.outcome": outcome, "fender.attempts": attempts,
            }
            if status >= 500:
                attributes["error.type"] = outcome if outcome not in ("success", "upstream_error") else str(status)
                span.set_status(Status(StatusCode.ERROR))
            span.set_attributes(attributes)
        span.end()

    def on_event(self, event: Event, ctx: RequestContext) -> None:
        """Policy decisions become events on the request's span."""
        span = ctx.span
        if span is not None and span.is_recording():
            span.add_event(f"fender.{event.name}", _event_attributes(event, self._event_fields))

    # -- sagas --------------------------------------------------------------------------
    def saga_started(self, saga_id: str) -> None:
        old = self._sagas.pop(saga_id, None)
        if old is not None:
            old.end()
        self._sagas[saga_id] = self.tracer.start_span(
            "saga", kind=SpanKind.INTERNAL, attributes={"fender.saga.id": saga_id}
        )

    def saga_call_started(self, saga_id: str, step: str, phase: str, headers: MutableMapping[str, str]) -> None:
        parent = self._sagas.get(saga_id)
        span = self.tracer.start_span(
            f"saga {phase} {step}",
            context=trace.set_span_in_context(parent) if parent is not None else None,
            kind=SpanKind.INTERNAL,
            attributes={"fender.saga.id": saga_id, "fender.saga.step": step, "fender.saga.phase": phase},
        )
        old = self._steps.pop((saga_id, step, phase), None)
        if old is not None:
            old.end()
        self._steps[(saga_id, step, phase)] = span
        headers["traceparent"] = format_traceparent(span)

    def saga_step_finished(self, saga_id: str, step: str, phase: str, outcome: str) -> None:
        span = self._steps.pop((saga_id, step, phase), None)
        if span is None:  # failed before any call was made (a template error)
            saga = self._sagas.get(saga_id)
            if saga is not None:
                saga.add_event(
                    f"fender.saga.{phase}_not_sent",
                    {"fender.saga.step": step, "fender.saga.outcome": outcome},
                )
            return
        span.set_attribute("fender.saga.outcome", outcome)
        if outcome != "ok":
            span.set_status(Status(StatusCode.ERROR, outcome))
        span.end()

    def saga_finished(self, saga_id: str, status: str) -> None:
        span = self._sagas.pop(saga_id, None)
        if span is not None:
            span.set_attribute("fender.saga.status", status)
            if status == "failed":
                span.set_status(Status(StatusCode.ERROR, status))
            span.end()

    def saga_stopped(self, saga_id: str) -> None:
        span = self._sagas.pop(saga_id, None)
        if span is not None:
            span.set_attribute("fender.saga.stopped", True)
            span.end()

    # -- lifecycle ----------------------------------------------------------------------
    def force_flush(self, timeout_millis: int = 10_000) -> bool:
        return self.provider.force_flush(timeout_millis)

    async def shutdown(self) -> None:
        for span in [*self._steps.values(), *self._sagas.values()]:  # still running: record what we saw
            span.end()
        self._steps.clear()
        self._sagas.clear()
        await asyncio.get_running_loop().run_in_executor(None, self.provider.shutdown)
