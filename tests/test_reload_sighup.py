"""SIGHUP reloads a `fender run` process; a broken file is rejected and the old config serves on."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bench.procs import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def config(name: str, port: int) -> str:
    return f"""
version: 1
routes:
  - name: {name}
    match: {{host: svc}}
    upstream: http://127.0.0.1:{port}
    chain: [{{timeout: 2s}}]
"""


async def eventually(check: Any, timeout: float = 15.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            result = await check()
        except aiohttp.ClientError:
            result = None
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError("fender did not reach the expected state")
        await asyncio.sleep(0.05)


async def test_sighup_reloads_a_running_fender(aiohttp_server: Any, tmp_path: Path) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    upstream_app = web.Application()
    upstream_app.router.add_get("/{tail:.*}", hello)
    upstream = await aiohttp_server(upstream_app)

    path = tmp_path / "fender.yaml"
    path.write_text(config("first", upstream.port))
    proxy, admin, metrics = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "FENDER_PROXY_ADDR": f"127.0.0.1:{proxy}",
        "FENDER_ADMIN_ADDR": f"127.0.0.1:{admin}",
        "FENDER_METRICS_ADDR": f"127.0.0.1:{metrics}",
        "FENDER_DATA_DIR": str(tmp_path / "data"),
        "FENDER_ACCESS_LOG": "false",
        "FENDER_CONFIG_WATCH_INTERVAL": "0",  # only the signal may trigger the reload
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.cli", "run", "--config", str(path),
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as http:

            async def config_view() -> Any:
                async with http.get(f"http://127.0.0.1:{admin}/config") as resp:
                    return await resp.json() if resp.status == 200 else None

            async def route_name() -> str:
                async with http.get(f"http://127.0.0.1:{proxy}/", headers={"Host": "svc"}) as resp:
                    assert await resp.text() == "hello"
                    return resp.headers["x-fender-route"]

            first = await eventually(config_view)
            assert await route_name() == "first"

            path.write_text(config("second", upstream.port))
            process.send_signal(signal.SIGHUP)

            async def reloaded() -> Any:
                view = await config_view()
                return view if view and view["hash"] != first["hash"] else None

            second = await eventually(reloaded, timeout=10)
            assert second["last_reload"]["ok"] is True
            assert second["last_reload"]["trigger"] == "sighup"
            assert await route_name() == "second"

            path.write_text("version: 1\nroutes:\n  - name: Not Valid\n")
            process.send_signal(signal.SIGHUP)

            async def rejected() -> Any:
                view = await config_view()
                return view if view and view["last_reload"]["ok"] is False else None

            third = await eventually(rejected, timeout=10)
            assert third["hash"] == second["hash"]
            locs = {e["loc"] for e in third["last_reload"]["errors"]}
            assert {"routes[0].name", "routes[0].upstream"} <= locs
            assert await route_name() == "second"
            assert process.returncode is None, "a rejected reload does not stop fender"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = await asyncio.wait_for(process.communicate(), 15)
        except TimeoutError:
            process.kill()
            _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert b"routes[0].name" in stderr, "the rejection is logged"


async def test_api_reload_reaches_every_worker(aiohttp_server: Any, tmp_path: Path) -> None:
    """With --workers 2 only worker 0 serves the admin API; the reload must reach worker 1 too."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    upstream_app = web.Application()
    upstream_app.router.add_get("/{tail:.*}", hello)
    upstream = await aiohttp_server(upstream_app)
    path = tmp_path / "fender.yaml"
    path.write_text(config("first", upstream.port))
    proxy, admin, metrics = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "FENDER_PROXY_ADDR": f"127.0.0.1:{proxy}",
        "FENDER_ADMIN_ADDR": f"127.0.0.1:{admin}",
        "FENDER_METRICS_ADDR": f"127.0.0.1:{metrics}",
        "FENDER_DATA_DIR": str(tmp_path / "data"),
        "FENDER_ACCESS_LOG": "false",
        "FENDER_CONFIG_WATCH_INTERVAL": "0",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.cli", "run", "--config", str(path), "--workers", "2",
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as admin_http:

            async def ready() -> Any:
                async with admin_http.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                    return resp.status == 200

            async def routes_seen(n: int) -> set[str]:
                seen = set()
                for _ in range(n):
                    # a new connection each time, so SO_REUSEPORT spreads them over the workers
                    async with aiohttp.ClientSession() as http, http.get(
                        f"http://127.0.0.1:{proxy}/", headers={"Host": "svc"}
                    ) as resp:
                        seen.add(resp.headers["x-fender-route"])
                return seen

            await eventually(ready)
            await eventually(lambda: _nonempty(routes_seen(1)))
            path.write_text(config("second", upstream.port))
            async with admin_http.post(f"http://127.0.0.1:{admin}/config/reload") as resp:
                assert resp.status == 200

            async def all_second() -> bool:
                return await routes_seen(40) == {"second"}

            await eventually(all_second, timeout=10)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.communicate(), 15)
        except TimeoutError:
            process.kill()
            await process.communicate()


async def _nonempty(result: Any) -> bool:
    return bool(await result)
