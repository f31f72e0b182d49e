"""`--workers N`: worker 0's /metrics counts every worker's requests."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest

from policies.events import RetryScheduled
from proxy.telemetry.metrics import FenderMetrics
from proxy.telemetry.observer import SagaTelemetry
from proxy.telemetry.peers import SnapshotWriter, read_peers
from tests.support.processes import FenderProcess, Upstream
from tests.test_proxy_edge_cases import raw_upstream
from tests.test_telemetry_metrics import samples, value


def _served(metrics: FenderMetrics, route: str, status: int, duration: float, times: int = 1) -> None:
    for _ in range(times):
        metrics.request_started(route)
        metrics.attempt_finished(route, status, None)
        metrics.request_finished(route, "GET", status, "success", duration)


def test_the_other_workers_numbers_add_to_worker_0s():
    zero, one = FenderMetrics(), FenderMetrics()
    _served(zero, "r", 200, 0.0007, times=2)
    _served(one, "r", 200, 0.003, times=3)
    _served(one, "s", 503, 0.2)
    one.request_started("r")  # in flight on worker 1
    one.on_event(RetryScheduled(reason="5xx", attempt=2, delay=0.0), "s")
    zero.config_reloaded("success")
    one.config_reloaded("success")  # the same reload, in worker 1: every worker gets each reload
    zero.add_live_state(lambda: "abc", lambda: [("s", "cb", "closed")])
    one.add_live_state(lambda: "abc", lambda: [("s", "cb", "open")])
    SagaTelemetry(zero, None).saga_started("x")
    snapshot = json.loads(json.dumps(one.snapshot()))  # as it travels: a JSON file
    zero.add_peers(lambda: [snapshot])

    found = samples(zero.render()[0].decode())
    assert value(found, "fender_requests_total", route="r", method="GET", code="200", outcome="success") == 5
    assert value(found, "fender_requests_total", route="s", method="GET", code="503", outcome="success") == 1
    assert value(found, "fender_upstream_attempts_total", route="r", result="2xx") == 5
    assert value(found, "fender_retries_total", route="s", reason="5xx") == 1
    assert value(found, "fender_inflight_requests", route="r") == 1
    bucket = "fender_request_duration_seconds_bucket"
    assert value(found, bucket, route="r", le="0.001") == 2
    assert value(found, bucket, route="r", le="0.005") == 5
    assert value(found, "fender_request_duration_seconds_count", route="r") == 5
    assert value(found, "fender_request_duration_seconds_sum", route="r") == pytest.approx(0.0104)
    assert value(found, "fender_config_reloads_total", result="success") == 1
    # each worker has its own breaker: the worst state shows
    assert value(found, "fender_circuit_breaker_state", route="s", policy="cb") == 2
    assert value(found, "fender_config_info", hash="abc") == 1
    assert value(found, "fender_sagas_in_progress") == 1  # worker 0's alone: it drives the sagas


def test_a_malformed_snapshot_does_not_fail_the_scrape():
    zero = FenderMetrics()
    _served(zero, "r", 200, 0.001)
    zero.add_peers(lambda: [
        {"requests": "nonsense"},
        {"requests": [], "attempts": [], "events": [], "inflight": []},  # a list where a mapping goes
        {"requests": [], "attempts": [], "inflight": {}, "durations": {"r": [[1], 0.1]}},
        # only event families come through `events`: no second series of another family
        {"requests": [], "attempts": [], "events": [["fender_requests_total", "r", "GET", "200", "success", 5]],
         "inflight": {}, "durations": {}, "breakers": []},
    ])
    text = zero.render()[0].decode()
    found = samples(text)
    assert value(found, "fender_requests_total", route="r", method="GET", code="200", outcome="success") == 1
    assert text.count('fender_requests_total{code="200",method="GET",outcome="success",route="r"}') == 1


def test_worker_0_reads_the_files_of_workers_1_to_n_minus_1(tmp_path):
    (tmp_path / "worker-0.json").write_text(json.dumps({"own": True}))
    (tmp_path / "worker-1.json").write_text(json.dumps({"peer": 1}))
    (tmp_path / "worker-2.json").write_text("{not json")
    (tmp_path / "worker-3.json").write_text("[]")
    (tmp_path / "worker-4.tmp").write_text(json.dumps({"half": True}))
    (tmp_path / "worker-5.json").write_text(json.dumps({"peer": 5}))
    (tmp_path / "worker-6.json").write_text(json.dumps({"of a run with more workers": 6}))
    assert read_peers(tmp_path, 6) == [{"peer": 1}, {"peer": 5}]
    assert read_peers(tmp_path / "gone", 6) == []


async def test_a_worker_writes_its_numbers_at_start_and_again_when_it_stops(tmp_path):
    metrics = FenderMetrics()
    writer = SnapshotWriter(metrics, tmp_path, 1)
    await writer.start()
    assert json.loads((tmp_path / "worker-1.json").read_text())["requests"] == []
    _served(metrics, "r", 200, 0.001)
    await writer.stop()
    assert json.loads((tmp_path / "worker-1.json").read_text())["requests"] == [["r", "GET", 200, "success", 1]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["worker-1.json"]


def test_fender_with_two_workers_counts_every_request_once(tmp_path):
    upstream = Upstream()
    config = tmp_path / "f.yaml"
    config.write_text(f"routes: [{{name: r, upstream: '{upstream.url}'}}]\n")
    data = tmp_path / "d"
    stale = data / "workers-1"  # what a killed run left (in a container the supervisor is pid 1)
    stale.mkdir(parents=True)
    (stale / "worker-1.json").write_text(json.dumps(
        {"requests": [["r", "GET", 200, "success", 1000]], "attempts": [], "events": [], "inflight": {"r": 3},
         "durations": {}, "breakers": []}))
    fender = FenderProcess(config, data, FENDER_WORKERS="2")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        time.sleep(0.5)  # (worker 1 may still be starting: it has no readiness of its own)
        sent = 24
        for _ in range(sent):
            # a connection each (urllib's way): the kernel spreads connections over the workers
            with opener.open(fender.proxy + "/echo", timeout=5) as resp:
                assert resp.status == 200
        time.sleep(1.3)  # the other worker's numbers are at most a second old
        with opener.open(fender.metrics + "/metrics", timeout=5) as resp:
            found = samples(resp.read().decode())
        assert value(found, "fender_requests_total", route="r", method="GET", code="200", outcome="success") == sent
        assert value(found, "fender_upstream_attempts_total", route="r", result="2xx") == sent
        assert value(found, "fender_inflight_requests", route="r") == 0
        shared = [d for d in data.glob("workers-*") if d != stale]
        assert len(shared) == 1 and (shared[0] / "worker-1.json").exists()
    finally:
        fender.stop()
        upstream.stop()
    assert fender.proc.returncode == 0, fender.proc.stderr.read() if fender.proc.stderr else ""
    # the supervisor cleans up after its own run, and removed the killed run's at start
    assert list(data.glob("workers-*")) == []


@pytest.fixture
async def stuck(start_fender, tmp_path):
    """A worker 1 (its snapshot in tmp_path) with one request waiting on an upstream that never answers."""

    async def never_answers(reader, writer, head):
        await asyncio.sleep(5)
        return "close"

    server, port = await raw_upstream(never_answers)
    fender = await start_fender(f"routes: [{{name: r, upstream: 'http://127.0.0.1:{port}'}}]", assemble=True,
                                drain_timeout=0.2)
    fender.app.worker_services.append(SnapshotWriter(fender.app.telemetry.metrics, tmp_path, 1))
    _, client = await asyncio.open_connection(*fender.app.addresses["proxy"])
    client.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await client.drain()
    await asyncio.sleep(0.2)
    yield fender
    client.close()
    server.close()


async def test_the_last_snapshot_counts_requests_the_shutdown_cut(stuck, tmp_path):
    await stuck.app.drain_and_stop()  # the drain window passes: the request is cut
    snap = json.loads((tmp_path / "worker-1.json").read_text())
    assert snap["inflight"] == {"r": 0}
    assert [row[2:] for row in snap["requests"]] == [[499, "client_abort", 1]]


async def test_the_last_snapshot_counts_a_client_that_left_just_before_the_stop(stuck, tmp_path):
    (conn,) = stuck.app._proxy.connections
    conn.transport.abort()  # the client's connection is gone; its serving task is cancelled, not yet run
    await asyncio.sleep(0)
    await stuck.app.stop()  # no connection left to cut: the listener still waits for that task
    snap = json.loads((tmp_path / "worker-1.json").read_text())
    assert [row[2:] for row in snap["requests"]] == [[499, "client_abort", 1]]
