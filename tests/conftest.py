"""Shared fixtures: an in-process Fender on free ports, in-process upstreams, service checks."""

from __future__ import annotations

import os
import socket
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from config.settings import Settings
from proxy.app import FenderApp

REQUIRE_SERVICES = os.environ.get("FENDER_REQUIRE_SERVICES") == "1"


def service_available(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip locally when a service is absent; fail in CI (FENDER_REQUIRE_SERVICES=1)."""
    if service_available(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if REQUIRE_SERVICES:
        pytest.fail(message + " and FENDER_REQUIRE_SERVICES=1")
    pytest.skip(message)


class EmptyChainFactory:
    """A factory that gives every route an empty chain (tests of the bare data plane)."""

    def build(self, config: Any) -> dict[str, Any]:
        return {r.name: SimpleNamespace(policies=[], buffer_limit=0) for r in config.routes}


def _real_factory_available() -> bool:
    try:
        import config.factory  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


class RunningFender:
    def __init__(self, app: FenderApp, config_path: Path) -> None:
        self.app = app
        self.config_path = config_path
        host, port = app.addresses["proxy"]
        self.proxy_url = f"http://{host}:{port}"
        ahost, aport = app.addresses["admin"]
        self.admin_url = f"http://{ahost}:{aport}"
        mhost, mport = app.addresses["metrics"]
        self.metrics_url = f"http://{mhost}:{mport}"


@pytest.fixture
async def start_fender(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """`await start_fender(yaml_text, **settings)` -> RunningFender, stopped after the test."""
    started: list[FenderApp] = []

    async def start(yaml_text: str, *, assemble: bool = False, factory: Any = None, **settings: Any) -> RunningFender:
        path = tmp_path / "fender.yaml"
        path.write_text(textwrap.dedent(yaml_text))
        values = {
            "config": str(path),
            "proxy_addr": "127.0.0.1:0",
            "admin_addr": "127.0.0.1:0",
            "metrics_addr": "127.0.0.1:0",
            "data_dir": str(tmp_path / "data"),
            "access_log": False,
        }
        values.update(settings)
        if factory is None and not _real_factory_available():
            factory = EmptyChainFactory()
        app = FenderApp(Settings(**values), factory=factory)
        app.load_initial()
        if assemble:
            from proxy.assemble import assemble as do_assemble

            do_assemble(app)
        await app.start()
        started.append(app)
        return RunningFender(app, path)

    yield start
    for app in started:
        await app.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest.fixture(name="env")
async def saga_env(tmp_path: Path) -> AsyncIterator[Any]:
    """A saga service on a scripted participant (tests.test_saga_coordinator.Env), started."""
    from tests.test_saga_coordinator import Env  # (a test module: imported only when asked for)

    env = Env(tmp_path)
    await env.service.start()
    yield env
    await env.service.stop()
