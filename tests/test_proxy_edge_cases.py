"""Edge cases of the forwarding path: interim responses, early answers, stalls, pool hand-offs."""

from __future__ import annotations

import asyncio
import subprocess
import time
from types import SimpleNamespace

import aiohttp
import pytest
from multidict import CIMultiDict

from bench.procs import free_port
from proxy.h1client import ConnectionPool
from proxy.observer import NullObserver
from tests.support.processes import FENDER
from tests.support.raw_server import raw_server


async def raw_upstream(script):
    """An upstream that speaks raw bytes: `script(reader, writer, head)` per connection."""

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if await script(reader, writer, head) == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await raw_server(handle)


async def test_interim_103_is_skipped_and_the_final_response_relayed(start_fender, http):
    async def script(reader, writer, head):
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()

    server, port = await raw_upstream(script)
    fender = await start_fender(f"routes: [{{name: hints, upstream: 'http://127.0.0.1:{port}'}}]")
    for _ in range(2):  # and the connection stays usable
        async with http.get(fender.proxy_url + "/", headers={"Host": "x"}) as resp:
            assert resp.status == 200
            assert await resp.text() == "hello"
    server.close()


async def test_early_final_response_to_a_streamed_upload_is_relayed(start_fender, http):
    async def script(reader, writer, head):
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!")
        await writer.drain()
        await asyncio.sleep(0.5)
        return "close"

    server, port = await raw_upstream(script)
    fender = await start_fender(f"routes: [{{name: small, upstream: 'http://127.0.0.1:{port}'}}]")

    async def body():
        for _ in range(256):
            yield b"z" * 65536
            await asyncio.sleep(0)

    async with http.post(fender.proxy_url + "/upload", data=body(), headers={"Host": "x"}) as resp:
        assert resp.status == 413
        assert await resp.text() == "too big!"
    server.close()


async def test_client_leaving_mid_body_does_not_strand_the_only_connection(start_fender, http):
    async def script(reader, writer, head):
        if head.startswith(b"GET /stall"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
            await writer.drain()
            await asyncio.sleep(30)
            return "close"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    server, port = await raw_upstream(script)
    fender = await start_fender(
        f"routes: [{{name: one, upstream: {{url: 'http://127.0.0.1:{port}', max_connections: 1}}}}]"
    )
    reader, writer = await asyncio.open_connection(*fender.app.addresses["proxy"])
    writer.write(b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.transport.abort()  # the client gives up while Fender waits for the body
    await asyncio.sleep(0.1)
    async with asyncio.timeout(3):
        async with http.get(fender.proxy_url + "/ok", headers={"Host": "x"}) as resp:
            assert await resp.text() == "ok"
    server.close()


async def test_route_timeout_bounds_the_response_body(start_fender, http):
    async def script(reader, writer, head):
        size = 100 if head.startswith(b"GET /small") else 10_000_000
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"a" * min(size // 2, 100_000))
        await writer.drain()
        await asyncio.sleep(30)
        return "close"

    server, port = await raw_upstream(script)
    fender = await start_fender(
        f"routes: [{{name: slow, upstream: 'http://127.0.0.1:{port}', chain: [{{timeout: 300ms}}]}}]"
    )
    started = time.monotonic()
    async with http.get(fender.proxy_url + "/small", headers={"Host": "x"}) as resp:
        assert resp.status == 504
        assert resp.headers["x-fender-error"] == "timeout"
    async with http.get(fender.proxy_url + "/large", headers={"Host": "x"}) as resp:
        assert resp.status == 200  # the head went out before the body stalled
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert time.monotonic() - started < 3
    server.close()


async def test_a_freed_slot_is_passed_on_when_its_waiter_is_cancelled(monkeypatch):
    pool = ConnectionPool("127.0.0.1", 9, ssl_context=None, server_hostname=None, connect_timeout=1, limit=1)
    connected = []

    async def fake_connect():
        pool._open += 1
        connected.append(True)
        return "connection"

    monkeypatch.setattr(pool, "_connect", fake_connect)
    pool._open = 1  # somebody holds the only connection
    b = asyncio.ensure_future(pool.acquire())
    c = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0)
    pool._slot_freed()  # that connection died: B is told to connect
    b.cancel()  # ... but B gives up in the same tick
    async with asyncio.timeout(2):
        assert await c == "connection"
    assert connected == [True]


def test_listener_address_in_use_is_one_line_and_exit_1(tmp_path):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    config = tmp_path / "f.yaml"
    config.write_text("routes: []\n")
    env = {
        "FENDER_PROXY_ADDR": f"127.0.0.1:{port}",
        "FENDER_ADMIN_ADDR": f"127.0.0.1:{free_port()}",
        "FENDER_METRICS_ADDR": f"127.0.0.1:{free_port()}",
        "FENDER_DATA_DIR": str(tmp_path / "data"),
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run([FENDER, "run", "--config", str(config)], env=env, capture_output=True, text=True, timeout=30)
    taken.close()
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.startswith("fender:")]
    assert lines and "in use" in lines[0] and str(port) in lines[0], out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("listener", ["proxy", "admin", "metrics"])
async def test_a_taken_address_stops_the_start_before_any_service_starts(tmp_path, listener):
    """A second Fender on the same ports must not resume the first one's sagas before it fails."""
    import socket

    from config.settings import Settings
    from proxy.app import FenderApp

    started = []

    class Service:
        async def start(self) -> None:
            started.append(self)

        async def stop(self) -> None:
            pass

    config = tmp_path / "f.yaml"
    config.write_text("routes: []\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        addrs = {f"{name}_addr": "127.0.0.1:0" for name in ("proxy", "admin", "metrics")}
        addrs[f"{listener}_addr"] = f"127.0.0.1:{port}"
        app = FenderApp(Settings(config=str(config), data_dir=str(tmp_path / "d"), **addrs))
        app.services.append(Service())
        with pytest.raises(OSError, match=f"{listener} listener 127.0.0.1:{port}: .*in use"):
            await app.start()
    assert started == []


async def test_stray_bytes_on_an_idle_connection_retire_it(start_fender, http):
    connections = 0

    async def handle(reader, writer):
        nonlocal connections
        connections += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")  # half an answer to nothing
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")  # a reused connection would get here
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nwrong")
            await writer.drain()
            await asyncio.sleep(1)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server, port = await raw_server(handle)
    fender = await start_fender(f"routes: [{{name: s, upstream: 'http://127.0.0.1:{port}'}}]")
    async with http.get(fender.proxy_url + "/", headers={"Host": "x"}) as resp:
        assert await resp.text() == "first"
    await asyncio.sleep(0.2)
    async with http.get(fender.proxy_url + "/", headers={"Host": "x"}) as resp:
        assert resp.status == 200
        assert await resp.text() == "first"  # from a fresh connection
    assert connections == 2
    server.close()


@pytest.mark.parametrize("name", ["Content-Length", "content-length", "CONTENT-length"])
async def test_the_callers_content_length_in_any_case_gives_way_to_the_body_sent(name):
    # (a saga step's headers are the user's: their Content-Length may be stale, in any case)
    heads: list[bytes] = []

    async def script(reader, writer, head):
        heads.append(head)
        body = await reader.readexactly(len(b"hello"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()

    server, port = await raw_upstream(script)
    pool = ConnectionPool("127.0.0.1", port, ssl_context=None, server_hostname=None, connect_timeout=1, limit=1)
    try:
        headers = CIMultiDict({"Host": "up", name: "999", "X-Other": "kept"})
        response = await pool.request("POST", "/x", headers, b"hello")
        assert await response.read() == b"hello"
        response.release()
        fields = heads[0].lower().split(b"\r\n")
        assert [f for f in fields if f.startswith(b"content-length")] == [b"content-length: 5"]
        assert b"x-other: kept" in fields
        assert heads[0].startswith(b"POST /x HTTP/1.1\r\n") and heads[0].endswith(b"\r\n\r\n")
    finally:
        await pool.close()
        server.close()


async def test_a_bug_in_a_chain_is_recorded_as_internal_error(start_fender, http, monkeypatch):
    recorded: list[tuple[int, str]] = []

    def request_finished(self, ctx, method, path, status, outcome, duration):
        recorded.append((status, outcome))

    monkeypatch.setattr(NullObserver, "request_finished", request_finished)

    async def broken(inner, ctx):  # a policy with a bug
        raise RuntimeError("a bug")

    class Factory:
        def build(self, config):
            return {r.name: SimpleNamespace(policies=[("broken", broken)], buffer_limit=0) for r in config.routes}

    fender = await start_fender(f"routes: [{{name: r, upstream: 'http://127.0.0.1:{free_port()}'}}]",
                                factory=Factory())
    async with http.get(fender.proxy_url + "/", headers={"Host": "x"}) as resp:
        assert resp.status == 500 and resp.headers["x-fender-error"] == "internal_error"
    assert recorded == [(500, "internal_error")]  # (it was counted as a success)
