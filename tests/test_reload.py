"""Config reload (SPEC section 6): triggers, validation before swap, state kept across reloads."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config_watch import ConfigWatcher, fingerprint


class Upstream:
    """An in-process upstream that counts hits and can fail or hold requests."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.hits = 0
        self.release = asyncio.Event()
        self.held = asyncio.Event()
        self.server: Any = None

    async def start(self, aiohttp_server: Any) -> Upstream:
        async def handle(request: web.Request) -> web.Response:
            self.hits += 1
            if request.path == "/fail":
                return web.Response(status=500, text="boom")
            if request.path == "/hold":
                self.held.set()
                await self.release.wait()
            return web.Response(text=self.tag, headers={"x-upstream": self.tag})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self.server = await aiohttp_server(app)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    """Poll a condition that a background task (the file watcher) makes true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def route_yaml(name: str, upstream: str, host: str = "svc") -> str:
    return f"""
version: 1
routes:
  - name: {name}
    match: {{host: {host}}}
    upstream: {upstream}
"""


def watcher_of(app: Any) -> ConfigWatcher:
    return next(s for s in app.services if isinstance(s, ConfigWatcher))


# -- triggers -----------------------------------------------------------------------------


def configmap_dir(root: Path, text: str, stamp: str) -> Path:
    """The layout kubelet mounts: ..<stamp>/fender.yaml, ..data -> ..<stamp>, fender.yaml -> ..data/fender.yaml."""
    root.mkdir(exist_ok=True)
    data = root / f"..{stamp}"
    data.mkdir()
    (data / "fender.yaml").write_text(text)
    (root / "..data").symlink_to(data.name)
    (root / "fender.yaml").symlink_to("..data/fender.yaml")
    return root / "fender.yaml"


def configmap_update(root: Path, text: str, stamp: str) -> None:
    """What kubelet's atomic writer does: new dir, new ..data_tmp link renamed over ..data, old dir removed."""
    old = os.readlink(root / "..data")
    data = root / f"..{stamp}"
    data.mkdir()
    (data / "fender.yaml").write_text(text)
    (root / "..data_tmp").symlink_to(data.name)
    os.rename(root / "..data_tmp", root / "..data")
    for child in (root / old).iterdir():
        child.unlink()
    (root / old).rmdir()


async def test_configmap_symlink_swap_triggers_a_reload(
    start_fender: Any, aiohttp_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    http: aiohttp.ClientSession,
) -> None:
    monkeypatch.setenv("FENDER_CONFIG_WATCH_INTERVAL", "0.05")
    one = await Upstream("one").start(aiohttp_server)
    two = await Upstream("two").start(aiohttp_server)
    root = tmp_path / "configmap"
    path = configmap_dir(root, route_yaml("svc", one.url), "2026_11_21_08_00_00.000000001")
    fender = await start_fender("version: 1\n", assemble=True, config=str(path))
    app = fender.app
    assert "svc" in app.runtime.routes
    first_hash = app.runtime.hash
    link_before = os.lstat(path)

    configmap_update(root, route_yaml("svc", two.url), "2026_11_21_08_01_00.000000002")
    # the path and the symlink itself did not change: only what ..data points at
    assert os.lstat(path).st_ino == link_before.st_ino
    await wait_for(lambda: app.runtime.hash != first_hash)
    assert app.last_reload.ok and app.last_reload.trigger == "file"
    async with http.get(f"{fender.proxy_url}/", headers={"Host": "svc"}) as resp:
        assert await resp.text() == "two"

    # a broken update is rejected and the last good config keeps serving
    good_hash = app.runtime.hash
    configmap_update(root, "routes: [{name: Bad Name}", "2026_11_21_08_02_00.000000003")
    await wait_for(lambda: not app.last_reload.ok)
    assert app.last_reload.trigger == "file" and app.last_reload.errors
    assert app.runtime.hash == good_hash
    async with http.get(f"{fender.proxy_url}/", headers={"Host": "svc"}) as resp:
        assert await resp.text() == "two"


async def test_plain_file_edits_trigger_a_reload(
    start_fender: Any, aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FENDER_CONFIG_WATCH_INTERVAL", "0.05")
    up = await Upstream("u").start(aiohttp_server)
    fender = await start_fender(route_yaml("first", up.url), assemble=True)
    app = fender.app
    fender.config_path.write_text(route_yaml("second", up.url))  # in place
    await wait_for(lambda: "second" in app.runtime.routes)
    tmp = fender.config_path.with_suffix(".tmp")
    tmp.write_text(route_yaml("third", up.url))
    os.replace(tmp, fender.config_path)  # as editors and config tools do
    await wait_for(lambda: "third" in app.runtime.routes)
    assert watcher_of(app).triggered == 2


async def test_watcher_ignores_a_missing_file_and_an_untouched_one(tmp_path: Path) -> None:
    path = tmp_path / "fender.yaml"
    path.write_text("version: 1\n")
    calls: list[str] = []

    async def reload(trigger: str) -> None:
        calls.append(trigger)

    watcher = ConfigWatcher(str(path), reload, interval=10)
    await watcher.start()
    try:
        assert not await watcher.check_now()
        path.unlink()
        assert fingerprint(str(path)) is None
        assert not await watcher.check_now()
        path.write_text("version: 1\nroutes: []\n")
        assert await watcher.check_now()
        assert not await watcher.check_now()
    finally:
        await watcher.stop()
    assert calls == ["file"]


def test_watch_interval_zero_turns_the_watcher_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from config.settings import Settings
    from proxy.admin_api import install
    from proxy.app import FenderApp

    monkeypatch.setenv("FENDER_CONFIG_WATCH_INTERVAL", "0")
    app = FenderApp(Settings(config="x.yaml"))
    install(app)
    assert not any(isinstance(s, ConfigWatcher) for s in app.services)


# -- validation before swap ----------------------------------------------------------------

INVALID = {
    "bad-yaml": ("routes:\n  - name: x\n    upstream: [unclosed\n", "line "),
    "schema": ("version: 1\nroutes:\n  - name: svc\n    upstream: http://127.0.0.1:1\n    chain:\n      - retry: {attempts: lots}\n", "routes[0].chain[0].retry.attempts"),
    "unknown-policy": ("version: 1\nroutes:\n  - name: svc\n    upstream: http://127.0.0.1:1\n    chain: [missing-breaker]\n", "routes[0].chain[0]"),
    "duplicate-route": ("version: 1\nroutes:\n  - name: svc\n    upstream: http://127.0.0.1:1\n  - name: svc\n    upstream: http://127.0.0.1:2\n", "routes[1].name"),
    "unknown-key": ("version: 1\nroutes:\n  - name: svc\n    upstream: http://127.0.0.1:1\n    retries: 3\n", "routes[0].retries"),
}


@pytest.mark.parametrize("kind", sorted(INVALID))
async def test_invalid_config_is_rejected_with_located_errors_everywhere(
    start_fender: Any, aiohttp_server: Any, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    up = await Upstream("good").start(aiohttp_server)
    fender = await start_fender(route_yaml("svc", up.url), assemble=True)
    app = fender.app
    outcomes: list[Any] = []
    app.reload_listeners.append(outcomes.append)
    good_hash = app.runtime.hash
    text, loc = INVALID[kind]
    fender.config_path.write_text(text)

    with caplog.at_level(logging.ERROR, logger="fender"):
        async with http.post(f"{fender.admin_url}/config/reload") as resp:
            assert resp.status == 400
            body = await resp.json()
    assert body["ok"] is False
    assert any(e["loc"].startswith(loc) for e in body["errors"]), body
    assert app.runtime.hash == good_hash
    async with http.get(f"{fender.admin_url}/config") as resp:
        view = await resp.json()
    assert view["hash"] == good_hash
    assert view["last_reload"]["ok"] is False and view["last_reload"]["errors"] == body["errors"]
    assert [o.result for o in outcomes] == ["failure"]
    assert any(loc in " ".join(getattr(r, "errors", [])) for r in caplog.records), "errors are logged"
    async with http.get(f"{fender.proxy_url}/", headers={"Host": "svc"}) as resp:
        assert resp.status == 200 and await resp.text() == "good"


# -- in-flight requests and policy state ------------------------------------------------


async def test_in_flight_request_finishes_on_the_chain_it_started_with(
    start_fender: Any, aiohttp_server: Any, http: aiohttp.ClientSession
) -> None:
    old = await Upstream("old").start(aiohttp_server)
    new = await Upstream("new").start(aiohttp_server)

    def version(upstream: str, timeout: str) -> str:
        return route_yaml("svc", upstream) + f"    chain: [{{timeout: {timeout}}}]\n"

    fender = await start_fender(version(old.url, "5s"), assemble=True)

    async def held_request() -> tuple[int, str]:
        async with http.get(f"{fender.proxy_url}/hold", headers={"Host": "svc"}) as resp:
            return resp.status, await resp.text()

    task = asyncio.create_task(held_request())
    await asyncio.wait_for(old.held.wait(), 5)
    fender.config_path.write_text(version(new.url, "50ms"))
    result = await fender.app.reload("api")
    assert result.ok and not result.unchanged
    async with http.get(f"{fender.proxy_url}/x", headers={"Host": "svc"}) as resp:
        assert await resp.text() == "new"
    await asyncio.sleep(0.2)  # longer than the new chain's 50ms timeout
    old.release.set()
    assert await asyncio.wait_for(task, 5) == (200, "old")


BREAKERS = """
version: 1
policies:
  pay-breaker:
    circuit_breaker: {{consecutive_failures: 2, open_for: 60s}}
routes:
  - name: pay
    match: {{host: pay}}
    upstream: {pay}
    chain:
      - rate_limit: {{rate: 1/h, burst: {burst}}}
      - retry: {{attempts: 2, on: [connect-failure]}}
      - pay-breaker
      - circuit_breaker: {{consecutive_failures: {inline}, open_for: 60s}}
  - name: ship
    match: {{host: ship}}
    upstream: {ship}
    chain: [{{timeout: {ship_timeout}}}]
"""


def breakers(pay: str, ship: str, *, burst: int = 100, inline: int = 50, ship_timeout: str = "5s") -> str:
    return BREAKERS.format(pay=pay, ship=ship, burst=burst, inline=inline, ship_timeout=ship_timeout)


async def test_open_breaker_stays_open_across_a_reload_of_another_route(
    start_fender: Any, aiohttp_server: Any, http: aiohttp.ClientSession
) -> None:
    pay = await Upstream("pay").start(aiohttp_server)
    ship = await Upstream("ship").start(aiohttp_server)
    fender = await start_fender(breakers(pay.url, ship.url), assemble=True)
    app = fender.app
    for _ in range(2):
        async with http.get(f"{fender.proxy_url}/fail", headers={"Host": "pay"}) as resp:
            assert resp.status == 500
    async with http.get(f"{fender.proxy_url}/x", headers={"Host": "pay"}) as resp:
        assert resp.status == 503 and resp.headers["x-fender-error"] == "circuit_open"
    hits = pay.hits

    fender.config_path.write_text(breakers(pay.url, ship.url, ship_timeout="2s"))
    result = await app.reload("api")
    assert result.ok and not result.unchanged
    async with http.get(f"{fender.proxy_url}/x", headers={"Host": "pay"}) as resp:
        assert resp.status == 503 and resp.headers["x-fender-error"] == "circuit_open"
    assert pay.hits == hits, "an open breaker forwards nothing"
    async with http.get(f"{fender.proxy_url}/x", headers={"Host": "ship"}) as resp:
        assert resp.status == 200

    # changing the breaker's own parameters gives a fresh (closed) breaker
    fender.config_path.write_text(
        breakers(pay.url, ship.url, ship_timeout="2s").replace("consecutive_failures: 2", "consecutive_failures: 3")
    )
    assert (await app.reload("api")).ok
    async with http.get(f"{fender.proxy_url}/x", headers={"Host": "pay"}) as resp:
        assert resp.status == 200 and pay.hits == hits + 1


async def test_unchanged_policies_keep_tokens_and_budget_changed_ones_start_fresh(
    start_fender: Any, aiohttp_server: Any, http: aiohttp.ClientSession
) -> None:
    pay = await Upstream("pay").start(aiohttp_server)
    ship = await Upstream("ship").start(aiohttp_server)
    fender = await start_fender(breakers(pay.url, ship.url, burst=3), assemble=True)
    app = fender.app
    policies_before = dict(app.runtime.routes["pay"].policies)
    for _ in range(3):
        async with http.get(f"{fender.proxy_url}/x", headers={"Host": "pay"}) as resp:
            assert resp.status == 200

    # another route changes, and the inline breaker of this one: tokens and budget stay
    fender.config_path.write_text(breakers(pay.url, ship.url, burst=3, inline=40, ship_timeout="1s"))
    assert (await app.reload("api")).ok
    policies_after = dict(app.runtime.routes["pay"].policies)
    assert policies_after["rate_limit"] is policies_before["rate_limit"]
    assert policies_after["retry"] is policies_before["retry"]
    assert policies_after["pay-breaker"] is policies_before["pay-breaker"]
    assert policies_after["circuit_breaker"] is not policies_before["circuit_breaker"]
    async with http.get(f"{fender.proxy_url}/x", headers={"Host": "pay"}) as resp:
        assert resp.status == 429, "the bucket kept its state: burst 3 was spent"
    async with http.get(f"{fender.admin_url}/routes") as resp:
        chain = {p["label"]: p for p in (await resp.json())["routes"][0]["chain"]}
    assert chain["retry"]["budget"]["requests"] == 3

    # a changed rate limit starts with a full bucket
    fender.config_path.write_text(breakers(pay.url, ship.url, burst=4, inline=40, ship_timeout="1s"))
    assert (await app.reload("api")).ok
    async with http.get(f"{fender.proxy_url}/x", headers={"Host": "pay"}) as resp:
        assert resp.status == 200


async def test_an_edit_between_load_and_start_is_not_missed(aiohttp_server: Any, tmp_path: Path) -> None:
    from config.settings import Settings
    from proxy.admin_api import install
    from proxy.app import FenderApp

    up = await Upstream("u").start(aiohttp_server)
    path = tmp_path / "edited.yaml"
    path.write_text(route_yaml("first", up.url))
    app = FenderApp(Settings(config=str(path)))
    app.load_initial()
    install(app)
    path.write_text(route_yaml("second", up.url) + "# longer, so the size differs too\n")
    watcher = watcher_of(app)
    watcher.interval = 3600  # polled by hand below
    await watcher.start()
    try:
        assert await watcher.check_now()
    finally:
        await watcher.stop()
    assert "second" in app.runtime.routes
