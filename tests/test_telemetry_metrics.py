"""/metrics: valid for promtool, and the counters move as the policies act."""

from __future__ import annotations

import asyncio
import shutil
from asyncio.subprocess import PIPE, STDOUT

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.telemetry.metrics import FenderMetrics, attempt_result, normalize_method
from proxy.telemetry.observer import SagaTelemetry
from tests.conftest import REQUIRE_SERVICES
from tests.support.raw_server import raw_server

CONFIG = """
version: 1
routes:
  - name: flaky
    match: {{host: flaky}}
    upstream: {up}
    chain:
      - retry: {{attempts: 3, on: [5xx], backoff: {{base: 1ms, max: 1ms}}}}
  - name: broken
    match: {{host: broken}}
    upstream: {up}
    chain:
      - circuit_breaker: {{consecutive_failures: 2, open_for: 60s}}
  - name: limited
    match: {{host: limited}}
    upstream: {up}
    chain:
      - rate_limit: {{rate: 1/m, burst: 1}}
"""


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if REQUIRE_SERVICES:
            pytest.fail("promtool is not installed and FENDER_REQUIRE_SERVICES=1")
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return path


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


async def upstream(aiohttp_server) -> str:
    calls = {"flaky": 0}

    async def handle(request: web.Request) -> web.Response:
        if request.path == "/flaky":
            calls["flaky"] += 1
            return web.Response(status=503 if calls["flaky"] == 1 else 200, text="ok")
        if request.path == "/broken":
            return web.Response(status=500, text="down")
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}"


async def scrape(http, url: str) -> str:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
        return await resp.text()


async def test_metrics_pass_promtool_and_move_with_policies(aiohttp_server, start_fender, http):
    tool = promtool()
    fender = await start_fender(CONFIG.format(up=await upstream(aiohttp_server)), assemble=True)
    proxy = fender.proxy_url

    async with http.get(proxy + "/flaky", headers={"Host": "flaky"}) as resp:
        assert resp.status == 200 and resp.headers["x-fender-attempts"] == "2"
    for expected in (500, 500, 503):
        async with http.get(proxy + "/broken", headers={"Host": "broken"}) as resp:
            assert resp.status == expected
    assert resp.headers["x-fender-error"] == "circuit_open"
    for expected in (200, 429):
        async with http.get(proxy + "/", headers={"Host": "limited"}) as resp:
            assert resp.status == expected
    async with http.request("PURGE", proxy + "/", headers={"Host": "flaky"}) as resp:
        assert resp.status == 200

    text = await scrape(http, fender.metrics_url)
    admin = samples(await scrape(http, fender.admin_url))  # the admin listener serves the same registry
    assert value(admin, "fender_retries_total", route="flaky", reason="5xx") == 1
    proc = await asyncio.create_subprocess_exec(
        tool, "check", "metrics", stdin=PIPE, stdout=PIPE, stderr=STDOUT
    )
    report, _ = await asyncio.wait_for(proc.communicate(text.encode()), 30)
    assert proc.returncode == 0, report.decode()  # 1: parse error, 3: lint problems

    found = samples(text)
    assert value(found, "fender_retries_total", route="flaky", reason="5xx") == 1
    assert value(found, "fender_upstream_attempts_total", route="flaky", result="5xx") == 1
    assert value(found, "fender_upstream_attempts_total", route="flaky", result="2xx") == 2
    assert value(found, "fender_requests_total", route="flaky", method="GET", code="200", outcome="success") == 1
    assert value(found, "fender_requests_total", route="flaky", method="OTHER", code="200", outcome="success") == 1
    assert value(found, "fender_circuit_breaker_state", route="broken", policy="circuit_breaker") == 2
    assert value(found, "fender_circuit_breaker_transitions_total", route="broken", policy="circuit_breaker", to="open") == 1
    assert value(found, "fender_requests_total", route="broken", method="GET", code="500", outcome="upstream_error") == 2
    assert value(found, "fender_requests_total", route="broken", method="GET", code="503", outcome="circuit_open") == 1
    assert value(found, "fender_rate_limited_total", route="limited", policy="rate_limit") == 1
    assert value(found, "fender_requests_total", route="limited", method="GET", code="429", outcome="rate_limited") == 1
    assert value(found, "fender_request_duration_seconds_count", route="broken") == 3
    assert value(found, "fender_inflight_requests", route="flaky") == 0
    assert value(found, "fender_config_info", hash=fender.app.runtime.hash) == 1
    # no label carries a path, an id or a raw method
    for name, labels in found:
        assert set(dict(labels)) <= {"route", "method", "code", "outcome", "result", "reason", "policy", "to",
                                     "hash", "status", "phase", "le"}, name


async def test_inflight_gauge_counts_requests_in_progress(aiohttp_server, start_fender, http):
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/", slow)
    server = await aiohttp_server(app)
    fender = await start_fender(
        f"routes:\n  - name: slow\n    upstream: http://127.0.0.1:{server.port}\n", assemble=True
    )
    request = asyncio.ensure_future(http.get(fender.proxy_url + "/", headers={"Host": "x"}))
    await asyncio.wait_for(entered.wait(), 5)
    assert value(samples(await scrape(http, fender.metrics_url)), "fender_inflight_requests", route="slow") == 1
    release.set()
    resp = await request
    assert resp.status == 200
    resp.release()
    assert value(samples(await scrape(http, fender.metrics_url)), "fender_inflight_requests", route="slow") == 0


async def test_config_reloads_are_counted_and_the_hash_follows(aiohttp_server, start_fender, http):
    up = await upstream(aiohttp_server)
    fender = await start_fender(f"routes:\n  - name: a\n    upstream: {up}\n", assemble=True)
    first = fender.app.runtime.hash
    fender.config_path.write_text("routes:\n  - name: a\n    upstream: {nope\n")
    assert not (await fender.app.reload("test")).ok
    fender.config_path.write_text(f"routes:\n  - name: b\n    upstream: {up}\n")
    assert (await fender.app.reload("test")).ok
    assert (await fender.app.reload("test")).unchanged  # (the same edit, seen twice)
    found = samples(await scrape(http, fender.metrics_url))
    assert value(found, "fender_config_reloads_total", result="failure") == 1
    assert value(found, "fender_config_reloads_total", result="success") == 1
    assert value(found, "fender_config_reloads_total", result="unchanged") == 1
    assert value(found, "fender_config_info", hash=fender.app.runtime.hash) == 1
    assert value(found, "fender_config_info", hash=first) is None


def test_saga_observer_feeds_saga_metrics():
    metrics = FenderMetrics()
    saga = SagaTelemetry(metrics, None)
    saga.saga_started("s1")
    saga.saga_started("s2")
    headers: dict[str, str] = {}
    saga.call_started("s1", "reserve", "action", headers)
    assert headers == {}  # no tracing, nothing injected
    saga.step_finished("s1", "reserve", "action", 0.02, "ok")
    saga.step_finished("s1", "charge", "action", 0.0, "template_error")  # no call made: not timed
    saga.step_finished("s1", "reserve", "compensation", 3.0, "ok")
    saga.saga_finished("s1", "compensated")
    found = samples(metrics.render()[0].decode())
    assert value(found, "fender_sagas_in_progress") == 1
    assert value(found, "fender_sagas_total", status="compensated") == 1
    assert value(found, "fender_saga_step_duration_seconds_count", phase="action") == 1
    assert value(found, "fender_saga_step_duration_seconds_bucket", phase="compensation", le="2.5") == 0
    assert value(found, "fender_saga_step_duration_seconds_bucket", phase="compensation", le="5.0") == 1


def test_bounded_label_words():
    assert normalize_method("GET") == "GET"
    assert normalize_method("PURGE") == "OTHER"
    assert normalize_method("get") == "OTHER"
    assert attempt_result(204, None) == "2xx"
    assert attempt_result(None, asyncio.CancelledError()) == "cancelled"
    from policies.errors import UpstreamReset, UpstreamUnavailable

    assert attempt_result(None, UpstreamUnavailable("x")) == "connect_failure"
    assert attempt_result(None, UpstreamReset("x")) == "reset"


def test_histogram_buckets_are_inclusive_and_cumulative():
    metrics = FenderMetrics()
    for duration in (0.0005, 0.0007, 31.0):
        metrics.request_started("r")
        metrics.request_finished("r", "GET", 200, "success", duration)
    found = samples(metrics.render()[0].decode())
    bucket = "fender_request_duration_seconds_bucket"
    assert value(found, bucket, route="r", le="0.0005") == 1
    assert value(found, bucket, route="r", le="0.001") == 2
    assert value(found, bucket, route="r", le="30.0") == 2
    assert value(found, bucket, route="r", le="+Inf") == 3
    assert value(found, "fender_request_duration_seconds_sum", route="r") == pytest.approx(31.0012)
    assert value(found, "fender_inflight_requests", route="r") == 0


def test_a_saga_stopped_without_a_terminal_status_leaves_the_in_progress_gauge():
    metrics = FenderMetrics()
    saga = SagaTelemetry(metrics, None)
    saga.saga_started("s1")
    saga.saga_stopped("s1")  # journal error, shutdown or lease lost: driving ended
    found = samples(metrics.render()[0].decode())
    assert value(found, "fender_sagas_in_progress") == 0


async def test_a_body_that_breaks_off_is_counted_with_the_status_the_client_got(start_fender, http):
    async def half(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabcde")
        await writer.drain()
        writer.transport.abort()

    server, port = await raw_server(half)
    fender = await start_fender(f"routes: [{{name: r, upstream: 'http://127.0.0.1:{port}'}}]", assemble=True)
    async with http.get(fender.proxy_url + "/", headers={"Host": "x"}) as resp:
        assert resp.status == 502
    found = samples(await scrape(http, fender.metrics_url))
    assert value(found, "fender_requests_total", route="r", method="GET", code="502", outcome="upstream_reset") == 1
    assert value(found, "fender_requests_total", route="r", method="GET", code="200", outcome="upstream_reset") is None
    server.close()
