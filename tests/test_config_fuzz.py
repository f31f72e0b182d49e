"""Random mutations of a valid config never crash `fender check` or a running Fender's reload.

Each mutated file is either accepted or rejected with errors that say where.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import json
import os
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.settings import Settings
from proxy.app import FenderApp
from proxy.cli import main

BASE: dict[str, Any] = {
    "version": 1,
    "defaults": {"chain": [{"timeout": "2s"}, {"retry": {"attempts": 2}}]},
    "policies": {
        "shared-breaker": {"circuit_breaker": {"consecutive_failures": 5, "open_for": "30s"}},
        "rate-breaker": {"circuit_breaker": {"failure_rate": 0.5, "window": "10s", "min_calls": 5}},
        "limit": {"rate_limit": {"rate": "100/s", "burst": 10, "key": "header:x-tenant"}},
    },
    "routes": [
        {
            "name": "payments",
            "match": {"host": "payments", "path_prefix": "/v1", "methods": ["GET", "POST"],
                      "headers": {"x-tenant": "acme"}},
            "upstream": {"url": "http://127.0.0.1:{port}", "connect_timeout": "1s", "max_connections": 10,
                         "tls": {"verify": False}},
            "strip_prefix": True,
            "chain": [
                "limit",
                {"bulkhead": {"max_concurrent": 5, "max_queue": 2, "queue_timeout": "100ms"}},
                {"timeout": "3s"},
                {"retry": {"attempts": 3, "on": ["connect-failure", "5xx", 429],
                           "backoff": {"base": "10ms", "max": "100ms"}, "budget": {"ratio": 0.2}}},
                "shared-breaker",
                {"timeout": {"duration": "500ms"}},
                {"fallback": {"on": ["circuit_open"], "status": 503, "body": {"error": "down"}}},
            ],
        },
        {"name": "catalog", "match": {"host": "*.catalog"}, "upstream": "http://127.0.0.1:{port}",
         "chain": ["rate-breaker"]},
        {"name": "default", "upstream": "http://127.0.0.1:{port}"},
    ],
    "sagas": {
        "order": {
            "steps": [
                {"name": "pay", "action": {"route": "payments", "method": "POST", "path": "/charge",
                                           "body": {"amount": "{{input.amount}}"}},
                 "compensation": {"route": "payments", "method": "DELETE",
                                  "path": "/charge/{{steps.pay.response.body.id}}"},
                 "timeout": "5s"},
            ],
            "deadline": "60s",
        }
    },
}

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "5s", "-1s", "0ms", "1h", "10/s", "0/s", "abc", "5xx", "GET", "payments",
                     "shared-breaker", "limit", "http://", "http://x:99999", "ftp://h", "/",
                     "header:", "{{input.x}}", "{{steps.nope.response.status}}", "Bad Name", "*.*"]),
    st.text(max_size=12),
)
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["name", "timeout", "retry", "x", "url", "steps", "on"]) | st.text(max_size=6),
                        inner, max_size=3),
    ),
    max_leaves=6,
)


def base_config(port: int) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(json.dumps(BASE).replace("{port}", str(port)))
    return doc


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from paths(value, (*prefix, index))


def mutate(doc: Any, data: st.DataObject) -> Any:
    """One random edit at one random place of the document."""
    where = data.draw(st.sampled_from(list(paths(doc))))
    op = data.draw(st.sampled_from(["replace", "delete", "add-key", "duplicate", "reorder"]))
    if not where:
        return data.draw(JUNK) if op == "replace" else doc
    parent = doc
    for part in where[:-1]:
        parent = parent[part]
    last = where[-1]
    target = parent[last]
    if op == "replace":
        parent[last] = data.draw(JUNK)
    elif op == "delete":
        del parent[last]
    elif op == "add-key" and isinstance(target, dict):
        target[data.draw(st.sampled_from(["extra", "name", "chain", "timeout", "retry", "upstream"]))] = data.draw(JUNK)
    elif op == "duplicate" and isinstance(target, list) and target:
        target.append(copy.deepcopy(target[data.draw(st.integers(0, len(target) - 1))]))
    elif op == "reorder" and isinstance(target, list):
        target.reverse()
    return doc


@st.composite
def mutated_texts(draw: st.DrawFn, port: int = 9) -> str:
    data = draw(st.data())
    doc: Any = base_config(port)
    for _ in range(draw(st.integers(1, 3))):
        doc = mutate(doc, data)
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    if draw(st.integers(0, 5)) == 0:  # sometimes break the YAML itself
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(["\t", ": :", "[", "}", "&a *b", "\x00", "- -", "'"])) + text[at:]
    return text


# FENDER_FUZZ_SCALE=20 for a long exploratory run; the default keeps the suite fast
SCALE = max(1, int(os.environ.get("FENDER_FUZZ_SCALE", "1")))

def assert_located(lines: list[str]) -> None:
    """`fender check` prints `<location>: <message>`; the whole document's location is its path."""
    assert lines, "a rejected config says why"
    for line in lines:
        loc, sep, msg = line.partition(": ")
        assert sep and loc and msg, line
        assert "internal error" not in line, line


@settings(max_examples=300 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=mutated_texts())
def test_fender_check_accepts_or_locates_errors(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fender.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            code = main(["check", str(path)])
    lines = [line for line in out.getvalue().splitlines() if not line.startswith("warning:")]
    assert code in (0, 1)
    if code == 1:
        assert_located(lines)
    else:
        assert lines == []


class FenderThread:
    """A Fender (with an upstream) on its own event loop, so a sync hypothesis test can drive it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app: FenderApp | None = None
        self.upstream: web.AppRunner | None = None
        self.port = 0

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        async def ok(request: web.Request) -> web.Response:
            return web.Response(text="ok")

        upstream = web.Application()
        upstream.router.add_route("*", "/{tail:.*}", ok)
        self.upstream = web.AppRunner(upstream)
        await self.upstream.setup()
        site = web.TCPSite(self.upstream, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.path = self.tmp / "fender.yaml"
        self.base_text = yaml.safe_dump(base_config(self.port), sort_keys=False)
        self.path.write_text(self.base_text)
        app = FenderApp(Settings(
            config=str(self.path), proxy_addr="127.0.0.1:0", admin_addr="127.0.0.1:0",
            metrics_addr="127.0.0.1:0", data_dir=str(self.tmp / "data"), access_log=False,
        ))
        app.load_initial()
        from proxy.assemble import assemble

        assemble(app)
        await app.start()
        self.app = app

    async def _stop(self) -> None:
        if self.app is not None:
            await self.app.stop()
        if self.upstream is not None:
            await self.upstream.cleanup()

    def start(self) -> FenderThread:
        self.call(self._start())
        return self

    def stop(self) -> None:
        try:
            self.call(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


@pytest.fixture(scope="module")
def running_fender(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: Any) -> Iterator[FenderThread]:
    fender = FenderThread(tmp_path_factory.mktemp("fuzz")).start()
    yield fender
    fender.stop()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FENDER_CONFIG_WATCH_INTERVAL", "0")  # the test triggers every reload itself
        yield mp


def _get(url: str, host: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 - loopback only
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@settings(max_examples=120 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_running_fender_survives_mutated_reloads(running_fender: FenderThread, data: st.DataObject) -> None:
    fender = running_fender
    app = fender.app
    assert app is not None
    text = data.draw(mutated_texts(port=fender.port))
    fender.path.write_text(text, encoding="utf-8", errors="surrogatepass")
    before = app.runtime.hash
    result = fender.call(app.reload("api"))
    if result.ok:
        assert app.runtime.hash == result.hash
    else:
        assert app.runtime.hash == before, "a rejected config never takes effect"
        assert_located([str(e) for e in result.errors])
    admin_host, admin_port = app.addresses["admin"]
    for view in ("healthz", "config", "routes", "breakers"):
        assert _get(f"http://{admin_host}:{admin_port}/{view}") == 200, view
    proxy_host, proxy_port = app.addresses["proxy"]
    status = _get(f"http://{proxy_host}:{proxy_port}/v1/x", host="payments")
    assert 200 <= status < 600
    # back to the base config, which must always load again
    fender.path.write_text(fender.base_text)
    assert fender.call(app.reload("api")).ok


def test_mutations_reach_both_outcomes() -> None:
    """The strategy is not degenerate: it produces accepted and rejected files."""
    outcomes: set[int] = set()

    @settings(max_examples=80, deadline=None, database=None)
    @given(text=mutated_texts())
    def run(text: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "f.yaml"
            path.write_text(text, encoding="utf-8", errors="surrogatepass")
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                outcomes.add(main(["check", str(path)]))

    run()
    assert outcomes == {0, 1}
