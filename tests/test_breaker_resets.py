"""`--workers N`: `POST /breakers/{name}/reset` on worker 0 closes every worker's breaker."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from proxy.breaker_resets import ResetAnnouncer, ResetFollower
from tests.support.processes import FenderProcess, Upstream
from tests.test_telemetry_metrics import samples, value


def test_a_follower_applies_each_announced_reset_once_in_order(tmp_path):
    announcer = ResetAnnouncer(tmp_path)
    applied: list[str] = []
    follower = ResetFollower(tmp_path, applied.append)
    assert follower.check() == 0  # nothing announced yet: no file
    announcer.announce("a")
    announcer.announce("b")
    assert follower.check() == 2 and applied == ["a", "b"]
    assert follower.check() == 0  # the same file again: nothing new
    announcer.announce("a")
    assert follower.check() == 1 and applied == ["a", "b", "a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["breaker-resets.json"]  # (no temporary left)


def test_a_follower_ignores_a_file_it_cannot_read(tmp_path):
    applied: list[str] = []
    follower = ResetFollower(tmp_path, applied.append)
    (tmp_path / "breaker-resets.json").write_text("{not json")
    assert follower.check() == 0
    (tmp_path / "breaker-resets.json").write_text(json.dumps({"resets": [[1, "a"]]}))
    assert follower.check() == 1 and applied == ["a"]


def test_an_announcer_that_cannot_write_says_so(tmp_path, caplog):
    announcer = ResetAnnouncer(tmp_path / "gone")
    assert announcer.announce("a") is False
    assert "not told of the breaker reset" in caplog.text


def _get(opener: urllib.request.OpenerDirector, url: str) -> int:
    try:
        with opener.open(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_reset_on_worker_0_closes_the_breaker_of_every_worker(tmp_path):
    upstream = Upstream()
    config = tmp_path / "f.yaml"
    config.write_text(
        f"routes:\n  - name: r\n    upstream: '{upstream.url}'\n    chain:\n"
        "      - circuit_breaker: {consecutive_failures: 1, open_for: 60s}\n"
        "      - timeout: 100ms\n"
    )
    fender = FenderProcess(config, tmp_path / "d", FENDER_WORKERS="2")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    probes = 24  # a connection each (urllib's way): the kernel spreads them over both workers

    def statuses(path: str) -> list[int]:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda _: _get(opener, fender.proxy + path), range(probes)))

    try:
        time.sleep(0.5)  # (worker 1 may still be starting: it has no readiness of its own)
        for _ in range(5):  # open the breaker of both workers: timeouts on connections to each
            statuses("/slow?s=1")
            if statuses("/echo") == [503] * probes:
                break
        assert statuses("/echo") == [503] * probes, "the breakers of both workers should be open"

        request = urllib.request.Request(fender.admin + "/breakers/r.circuit_breaker/reset", method="POST")
        with opener.open(request, timeout=5) as resp:
            assert json.loads(resp.read())["state"] == "closed"
        deadline = time.monotonic() + 3  # the other worker looks twice a second
        while (seen := statuses("/echo")) != [200] * probes and time.monotonic() < deadline:
            time.sleep(0.2)
        assert seen == [200] * probes

        time.sleep(1.3)  # worker 1's numbers reach worker 0's /metrics within a second
        with opener.open(fender.metrics + "/metrics", timeout=5) as resp:
            found = samples(resp.read().decode())
        assert value(found, "fender_circuit_breaker_state", route="r", policy="circuit_breaker") == 0
    finally:
        fender.stop()
        upstream.stop()
