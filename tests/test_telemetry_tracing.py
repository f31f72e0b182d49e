"""Spans as a real OTLP/HTTP receiver (oteltest's otelsink) gets them."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from oteltest.sink import HttpSink
from oteltest.sink.handler import RequestHandler

from bench.procs import free_port
from proxy.invoker import ChainInvoker
from proxy.telemetry.tracing import tracing_configured

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
SERVER, CLIENT, INTERNAL = 2, 3, 1  # opentelemetry.proto SpanKind values


class Received(RequestHandler):
    """Keeps every span the sink parses, with its resource."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Any]] = []

    def handle_trace(self, request: Any, headers: Any) -> None:
        for resource_spans in request.resource_spans:
            resource = attrs(resource_spans.resource)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append((resource, span))

    def handle_metrics(self, request: Any, headers: Any) -> None:
        pass

    def handle_logs(self, request: Any, headers: Any) -> None:
        pass


def attrs(item: Any) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in item.attributes}


@pytest.fixture
def otlp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Received]:
    """A running OTLP/HTTP receiver; ask for it before start_fender, so Fender flushes before it stops."""
    received = Received()
    port = free_port()
    sink = HttpSink(received, logging.getLogger("otelsink"), port=port)
    sink.start()
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.02)
    for name in ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_SAMPLER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    yield received
    sink.stop()


async def flush(fender: Any) -> None:
    assert await asyncio.to_thread(fender.app.telemetry.tracing.force_flush)


def hexid(raw: bytes) -> str:
    return raw.hex()


async def recording_upstream(aiohttp_server: Any, answer: Any = None) -> tuple[int, list[str]]:
    """An upstream that keeps the traceparent of every call; `answer(calls)` picks the response."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.headers["traceparent"])
        return answer(len(seen)) if answer is not None else web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = await aiohttp_server(app)
    return server.port, seen


async def test_server_and_client_spans_continue_the_callers_trace(otlp, aiohttp_server, start_fender, http):
    port, seen = await recording_upstream(
        aiohttp_server, lambda calls: web.Response(status=503 if calls == 1 else 200, text="ok"))
    fender = await start_fender(f"""
        routes:
          - name: orders
            upstream: http://127.0.0.1:{port}
            chain:
              - retry: {{attempts: 3, on: [5xx], backoff: {{base: 1ms, max: 1ms}}}}
    """, assemble=True)
    headers = {"Host": "orders.local:8080", "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "User-Agent": "t/1"}
    async with http.get(fender.proxy_url + "/orders/7?secret=x", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["x-fender-attempts"] == "2"
    await flush(fender)

    spans = [span for _, span in otlp.spans]
    [root] = [s for s in spans if s.kind == SERVER]
    clients = sorted((s for s in spans if s.kind == CLIENT), key=lambda s: s.start_time_unix_nano)
    assert len(spans) == 3 and len(clients) == 2
    assert {hexid(s.trace_id) for s in spans} == {TRACE_ID}
    assert hexid(root.parent_span_id) == PARENT_ID
    assert all(c.parent_span_id == root.span_id for c in clients)
    assert root.name == "GET"
    server_attrs = attrs(root)
    assert server_attrs["http.request.method"] == "GET"
    assert server_attrs["url.path"] == "/orders/7"
    assert server_attrs["url.scheme"] == "http"
    assert server_attrs["server.address"] == "orders.local"
    assert server_attrs["server.port"] == 8080
    assert server_attrs["user_agent.original"] == "t/1"
    assert server_attrs["http.response.status_code"] == 200
    assert server_attrs["fender.route"] == "orders"
    assert server_attrs["fender.attempts"] == 2
    assert "secret" not in str(server_attrs)
    [event] = [e for e in root.events if e.name == "fender.retry"]
    assert attrs(event)["fender.reason"] == "5xx"
    assert attrs(event)["fender.attempt"] == 2

    first, second = (attrs(c) for c in clients)
    assert "http.request.resend_count" not in first
    assert second["http.request.resend_count"] == 1
    assert first["http.response.status_code"] == 503 and first["error.type"] == "503"
    assert second["http.response.status_code"] == 200 and "error.type" not in second
    assert second["server.address"] == "127.0.0.1" and second["server.port"] == port
    assert second["url.full"] == f"http://127.0.0.1:{port}/orders/7?secret=x"
    assert clients[0].status.code == 2  # STATUS_CODE_ERROR
    # the upstream saw each CLIENT span as its parent
    assert seen == [f"00-{TRACE_ID}-{hexid(c.span_id)}-01" for c in clients]
    resource, _ = otlp.spans[0]
    assert resource["service.name"] == "fender"


async def test_a_request_without_traceparent_starts_a_trace_and_failures_are_errors(otlp, start_fender, http):
    fender = await start_fender(f"""
        routes:
          - name: gone
            upstream: http://127.0.0.1:{free_port()}
    """, assemble=True)
    async with http.post(fender.proxy_url + "/", headers={"Host": "x"}, data=b"{}") as resp:
        assert resp.status == 502
    await flush(fender)
    spans = {span.kind: span for _, span in otlp.spans}
    root, client = spans[SERVER], spans[CLIENT]
    assert root.parent_span_id == b""
    assert client.trace_id == root.trace_id and client.parent_span_id == root.span_id
    assert attrs(client)["error.type"] == "upstream_unavailable"
    assert attrs(root)["error.type"] == "upstream_unavailable"
    assert attrs(root)["http.response.status_code"] == 502
    assert root.status.code == 2


async def test_policy_rejection_is_a_span_event(otlp, start_fender, http):
    fender = await start_fender(f"""
        routes:
          - name: limited
            upstream: http://127.0.0.1:{free_port()}
            chain:
              - rate_limit: {{rate: 1/m, burst: 2}}
              - circuit_breaker: {{consecutive_failures: 1, open_for: 1m}}
    """, assemble=True)
    for expected in (502, 503, 429):
        async with http.get(fender.proxy_url + "/", headers={"Host": "x"}) as resp:
            assert resp.status == expected
    await flush(fender)
    roots = sorted((s for _, s in otlp.spans if s.kind == SERVER), key=lambda s: s.start_time_unix_nano)
    events = [[e.name for e in r.events] for r in roots]
    assert events[0] == ["fender.circuit_breaker_transition"]
    assert attrs(roots[0].events[0])["fender.to_state"] == "open"
    assert events[1] == ["fender.circuit_open"]
    assert events[2] == ["fender.rate_limited"]
    assert attrs(roots[2])["fender.outcome"] == "rate_limited"


async def test_saga_span_with_action_and_compensation_children(otlp, aiohttp_server, start_fender):
    port, got = await recording_upstream(aiohttp_server, lambda calls: web.json_response({"id": 1}))
    fender = await start_fender(f"routes:\n  - name: inventory\n    upstream: http://127.0.0.1:{port}\n", assemble=True)
    observer = fender.app.saga_observer
    invoker = ChainInvoker(fender.app)
    observer.saga_started("order-1")
    for phase in ("action", "compensation"):
        headers = {"x-fender-saga-id": "order-1"}
        observer.call_started("order-1", "reserve", phase, headers)
        response = await invoker.invoke("inventory", "POST", "/reservations", headers, b"{}")
        assert response.status == 200
        observer.step_finished("order-1", "reserve", phase, 0.01, "ok")
    observer.saga_finished("order-1", "compensated")
    await flush(fender)

    spans = [span for _, span in otlp.spans]
    by_id = {s.span_id: s for s in spans}
    [saga] = [s for s in spans if s.name == "saga"]
    assert saga.parent_span_id == b"" and attrs(saga)["fender.saga.status"] == "compensated"
    steps = [s for s in spans if s.parent_span_id == saga.span_id]
    assert sorted(s.name for s in steps) == ["saga action reserve", "saga compensation reserve"]
    clients = [s for s in spans if s.kind == CLIENT]
    assert len(clients) == 2
    for client in clients:
        route_span = by_id[client.parent_span_id]  # the in-process route call
        assert route_span.kind == INTERNAL and attrs(route_span)["fender.route"] == "inventory"
        assert by_id[route_span.parent_span_id] in steps
        assert client.trace_id == saga.trace_id
    assert sorted(tp[:-3] for tp in got) == sorted(f"00-{hexid(c.trace_id)}-{hexid(c.span_id)}" for c in clients)
    assert all(int(tp[-2:], 16) & 1 for tp in got)  # sampled


def test_tracing_is_off_without_an_endpoint():
    assert not tracing_configured({})
    assert tracing_configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing_configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert not tracing_configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"})
    assert not tracing_configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"})


def test_opentelemetry_is_not_even_imported_without_an_endpoint(tmp_path):
    """Its SDK is 1.5 MB of the 60 MB idle goal; a sidecar that does not trace should not pay it."""
    config = tmp_path / "fender.yaml"
    config.write_text("version: 1\nroutes: []\n")
    script = (
        "import sys\n"
        "from config.settings import Settings\n"
        "from proxy.app import FenderApp\n"
        "from proxy.assemble import assemble\n"
        f"app = FenderApp(Settings(config={str(config)!r}, data_dir={str(tmp_path / 'd')!r}))\n"
        "app.load_initial()\n"
        "assemble(app)\n"
        "print(app.telemetry.tracing, sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None []"

    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:9"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("<proxy.telemetry.tracing.Tracing object") and "opentelemetry.sdk.trace" in done.stdout


async def test_no_endpoint_means_no_tracer_and_the_callers_traceparent_goes_through(
    aiohttp_server, start_fender, http, monkeypatch
):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    port, got = await recording_upstream(aiohttp_server)
    fender = await start_fender(f"routes:\n  - name: a\n    upstream: http://127.0.0.1:{port}\n", assemble=True)
    assert fender.app.telemetry.tracing is None
    traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
    async with http.get(fender.proxy_url + "/", headers={"Host": "x", "traceparent": traceparent}) as resp:
        assert resp.status == 200
    assert got == [traceparent]


async def test_unsampled_caller_is_not_recorded_but_its_trace_goes_upstream(otlp, aiohttp_server, start_fender, http):
    port, got = await recording_upstream(aiohttp_server)
    fender = await start_fender(f"routes:\n  - name: a\n    upstream: http://127.0.0.1:{port}\n", assemble=True)
    async with http.get(fender.proxy_url + "/", headers={"Host": "x", "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"}) as resp:
        assert resp.status == 200
    async with http.get(fender.proxy_url + "/", headers={"Host": "x"}) as resp:
        assert resp.status == 200
    await flush(fender)
    assert got[0].startswith(f"00-{TRACE_ID}-") and got[0].endswith("-00")
    assert got[0] != f"00-{TRACE_ID}-{PARENT_ID}-00"  # Fender's (unrecorded) span id, not the caller's
    # only the second request (sampled root) was recorded: its SERVER and CLIENT spans
    assert sorted(span.kind for _, span in otlp.spans) == [SERVER, CLIENT]
    assert {hexid(span.trace_id) for _, span in otlp.spans} != {TRACE_ID}


async def test_a_real_saga_is_traced_and_counted(otlp, aiohttp_server, start_fender, http):
    async def handle(request: web.Request) -> web.Response:
        if request.path == "/charge":
            return web.Response(status=402, text="declined")
        return web.json_response({"id": "r1"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = await aiohttp_server(app)
    fender = await start_fender(
        f"routes: [{{name: shop, match: {{host: shop}}, upstream: 'http://127.0.0.1:{server.port}'}}]",
        assemble=True,
    )
    saga = {"id": "order-9", "steps": [
        {"name": "reserve", "action": {"route": "shop", "method": "POST", "path": "/reserve"},
         "compensation": {"route": "shop", "method": "DELETE", "path": "/reserve/r1"}},
        {"name": "charge", "action": {"route": "shop", "method": "POST", "path": "/charge"}},
    ]}
    async with http.post(fender.admin_url + "/v1/sagas?wait=5", json=saga) as resp:
        record = await resp.json()
    assert record["status"] == "compensated", record
    await flush(fender)

    spans = [span for _, span in otlp.spans]
    [root] = [s for s in spans if s.name == "saga"]
    assert attrs(root)["fender.saga.id"] == "order-9" and attrs(root)["fender.saga.status"] == "compensated"
    steps = {s.name: s for s in spans if s.parent_span_id == root.span_id}
    assert set(steps) == {"saga action reserve", "saga action charge", "saga compensation reserve"}
    assert attrs(steps["saga action charge"])["fender.saga.outcome"] == "status"
    assert steps["saga action charge"].status.code == 2
    routes = [s for s in spans if s.kind == INTERNAL and "fender.route" in attrs(s)]
    assert sorted(s.parent_span_id for s in routes) == sorted(s.span_id for s in steps.values())
    assert {s.trace_id for s in spans} == {root.trace_id}

    async with http.get(fender.metrics_url + "/metrics") as resp:
        text = await resp.text()
    assert 'fender_sagas_total{status="compensated"} 1.0' in text
    assert "fender_sagas_in_progress 0.0" in text
    assert 'fender_saga_step_duration_seconds_count{phase="action"} 2.0' in text
    assert 'fender_saga_step_duration_seconds_count{phase="compensation"} 1.0' in text
