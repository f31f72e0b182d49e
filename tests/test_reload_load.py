"""Reloads under continuous load: no request is dropped, invalid files never take effect."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

CONCURRENCY = 16
MIN_REQUESTS = 2000
RELOADS = 20


def valid(version: int, port: int) -> str:
    return f"""
version: 1
policies:
  svc-breaker:
    circuit_breaker: {{consecutive_failures: 20, open_for: 30s}}
routes:
  - name: v{version}
    match: {{host: svc}}
    upstream: http://127.0.0.1:{port}
    chain:
      - rate_limit: {{rate: 100000/s}}
      - timeout: 5s
      - retry: {{attempts: 2}}
      - svc-breaker
      - timeout: {1 + version % 3}s
"""


def invalid(version: int, port: int) -> str:
    """Four kinds of broken file; each would route to `bad<n>` if it ever took effect."""
    good = valid(version, port).replace(f"name: v{version}", f"name: bad{version}")
    kind = (version // 2) % 4
    if kind == 0:
        return good + "  - name: [unclosed\n"  # YAML syntax
    if kind == 1:
        return good.replace("retry: {attempts: 2}", "retry: {attempts: -1}")  # schema
    if kind == 2:
        return good.replace("- svc-breaker", "- no-such-breaker")  # unknown policy name
    return good + f"  - name: bad{version}\n    upstream: http://127.0.0.1:{port}\n"  # duplicate route


async def test_reloads_under_load_drop_nothing_and_reject_invalid_files(
    start_fender: Any, aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FENDER_CONFIG_WATCH_INTERVAL", "0")  # POST is the only trigger here

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    upstream_app = web.Application()
    upstream_app.router.add_get("/{tail:.*}", ok)
    upstream = await aiohttp_server(upstream_app)
    fender = await start_fender(valid(0, upstream.port), assemble=True)
    app = fender.app

    failures: list[str] = []
    routes_seen: dict[str, int] = {}
    done = asyncio.Event()
    count = 0

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal count
        while not done.is_set() or count < MIN_REQUESTS:
            try:
                async with http.get(f"{fender.proxy_url}/item", headers={"Host": "svc"}) as resp:
                    body = await resp.read()
                    if resp.status != 200 or body != b"ok":
                        failures.append(f"{resp.status} {resp.headers.get('x-fender-error')} {body[:200]!r}")
                    route = resp.headers.get("x-fender-route", "")
                    routes_seen[route] = routes_seen.get(route, 0) + 1
            except aiohttp.ClientError as exc:
                failures.append(repr(exc))
            count += 1

    rejected_hashes: set[str] = set()
    accepted = 0

    async def reloader(http: aiohttp.ClientSession) -> None:
        nonlocal accepted
        for n in range(1, RELOADS + 1):
            await asyncio.sleep(0.15)
            text = valid(n, upstream.port) if n % 2 == 0 else invalid(n, upstream.port)
            fender.config_path.write_text(text)
            async with http.post(f"{fender.admin_url}/config/reload") as resp:
                body = await resp.json()
                if n % 2 == 0:
                    assert resp.status == 200 and body["ok"], body
                    assert app.runtime.routes.keys() == {f"v{n}"}
                    accepted += 1
                else:
                    assert resp.status == 400 and not body["ok"], body
                    assert body["errors"] and all(e["loc"] for e in body["errors"]), body
                    assert app.last_reload is not None
                    rejected_hashes.add(_hash(text))
                    assert app.runtime.routes.keys() == {f"v{n - 1}"}
        done.set()

    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as http, aiohttp.ClientSession() as admin:
        await asyncio.gather(reloader(admin), *(client(http) for _ in range(CONCURRENCY)))
    elapsed = time.monotonic() - started

    print(f"{count} requests in {elapsed:.1f}s; routes {routes_seen}")
    assert count >= MIN_REQUESTS
    assert elapsed >= 3.0, "the load spans several seconds"
    assert failures == [], failures[:5]
    assert accepted == RELOADS // 2 and len(rejected_hashes) == RELOADS // 2
    assert not any(route.startswith("bad") for route in routes_seen), routes_seen
    assert set(routes_seen) <= {f"v{n}" for n in range(0, RELOADS + 1, 2)}
    assert len(routes_seen) >= 5, f"reloads took effect while requests ran: {routes_seen}"
    assert app.runtime.hash not in rejected_hashes


def _hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]
