"""Black-box: `fender run` as a subprocess against a real upstream process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import aiohttp
import pytest

from tests.support.processes import FenderProcess, Upstream

pytestmark = pytest.mark.e2e

CONFIG = """
version: 1
routes:
  - name: payments
    match: {{host: payments}}
    upstream: {up}
  - name: bulk
    match: {{host: bulk}}
    upstream: {up}
    chain:
      - timeout: 120s
      - retry: {{attempts: 2}}
"""


@pytest.fixture(scope="module")
def upstream():
    up = Upstream()
    yield up
    up.stop()


@pytest.fixture
def fender(tmp_path, upstream):
    path = tmp_path / "fender.yaml"
    path.write_text(CONFIG.format(up=upstream.url))
    proc = FenderProcess(path, tmp_path / "data")
    yield proc
    proc.stop()


def test_http_proxy_clients_work_unchanged(fender):
    env = dict(os.environ, HTTP_PROXY=fender.proxy, http_proxy=fender.proxy, NO_PROXY="", no_proxy="")
    # urllib reads HTTP_PROXY, curl reads http_proxy: both are real clients that send absolute-form targets
    out = subprocess.run(
        ["curl", "-s", "-D", "-", "http://payments/echo?via=curl"], env=env, capture_output=True, text=True, timeout=20
    )
    head, _, body = out.stdout.partition("\n\n")  # text mode turned CRLF into LF
    assert head.startswith("HTTP/1.1 200"), out.stdout + out.stderr
    assert "x-fender-route: payments" in head.lower()
    assert json.loads(body)["path"] == "/echo?via=curl"

    code = (
        "import urllib.request, json;"
        "r = urllib.request.urlopen('http://payments/echo?via=urllib', timeout=10);"
        "print(r.status, r.headers['x-fender-attempts'], json.load(r)['path'])"
    )
    out = subprocess.run(["python3", "-c", code], env=env, capture_output=True, text=True, timeout=20)
    assert out.stdout.split() == ["200", "1", "/echo?via=urllib"], out.stderr


def test_unknown_host_is_not_proxied(fender):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": fender.proxy}))
    with pytest.raises(urllib.error.HTTPError) as info:
        opener.open("http://example.org/", timeout=10)
    assert info.value.code == 404
    assert info.value.headers["x-fender-error"] == "no_route"


def test_sigterm_drains_in_flight_requests_then_exits_zero(fender):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": fender.proxy}))
    result: dict = {}

    def slow_call():
        try:
            with opener.open("http://payments/slow?s=1.5", timeout=20) as resp:
                result["status"] = resp.status
                result["body"] = json.load(resp)
        except Exception as exc:  # recorded for the assertion below
            result["error"] = exc

    thread = threading.Thread(target=slow_call)
    thread.start()
    time.sleep(0.5)  # the request is in flight at the upstream
    fender.terminate(signal.SIGTERM)
    time.sleep(0.3)
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as info:
        direct.open(fender.metrics + "/readyz", timeout=5)
    assert info.value.code == 503
    with pytest.raises(OSError):
        direct.open(fender.proxy + "/echo", timeout=2)  # no longer accepting
    thread.join(20)
    assert result.get("status") == 200, result
    assert result["body"] == {"slept": 1.5}
    assert fender.proc.wait(15) == 0


GIB = 1024**3


async def test_one_gib_each_way_streams_in_bounded_memory(fender):
    chunk = b"\1" * (256 * 1024)

    async def body():
        for _ in range(GIB // len(chunk)):
            yield chunk

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(fender.proxy + "/sink", data=body(), headers={"Host": "bulk"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["received"] == GIB
        received = 0
        async with session.get(fender.proxy + f"/bytes/{GIB}", headers={"Host": "bulk"}) as resp:
            assert resp.status == 200
            async for data in resp.content.iter_any():
                received += len(data)
        assert received == GIB
    peak_mib = fender.rss_peak_kib() / 1024
    assert peak_mib < 150, f"Fender's peak RSS was {peak_mib:.0f} MiB"
