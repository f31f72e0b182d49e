"""What the coordinator adds per step: `python -m saga.bench [--steps 10] [--sagas 200]`.

Starts an upstream in its own process and an in-process Fender with one route to it,
then times, per call or step:

  proxy     an HTTP client -> Fender's proxy listener -> upstream (the direct path)
  invoker   the same route called in-process, as the coordinator calls it (no journal)
  saga/*    sequential sagas of N steps through the coordinator, per step, for each
            journal durability (synchronous=FULL, the default, and NORMAL)
  saga/*/c32  32 sagas at a time (group commit): steps per second

Overhead per step = saga per-step time - invoker per-call time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

UPSTREAM = """
import sys
from aiohttp import web
async def ok(request):
    await request.read()
    return web.json_response({"id": "x"})
app = web.Application()
app.router.add_route("*", "/{tail:.*}", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _saga(i: int, steps: int, prefix: str) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{i}",
        "steps": [
            {"name": f"s{k}", "action": {"route": "up", "method": "POST", "path": f"/a/{k}", "body": {"k": k}},
             "compensation": {"route": "up", "method": "DELETE", "path": f"/a/{k}"}}
            for k in range(steps)
        ],
    }


def _start_upstream(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", UPSTREAM, str(port)])


async def _wait_port(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.025)
    raise RuntimeError(f"nothing listens on {port}")


async def run(steps: int, sagas: int, calls: int) -> list[tuple[str, str]]:
    from config.settings import Settings
    from proxy.app import FenderApp
    from proxy.invoker import ChainInvoker
    from saga.service import SagaService

    port = _free_port()
    upstream = _start_upstream(port)
    rows: list[tuple[str, str]] = []
    try:
        await _wait_port(port)
        with tempfile.TemporaryDirectory(dir=os.environ.get("SAGA_BENCH_DIR")) as tmp:
            config = Path(tmp) / "fender.yaml"
            config.write_text(
                "version: 1\nroutes:\n  - name: up\n    match: {host: up}\n"
                f"    upstream: http://127.0.0.1:{port}\n    chain: [{{timeout: 5s}}]\n"
            )
            settings = Settings(
                config=str(config), proxy_addr="127.0.0.1:0", admin_addr="", metrics_addr="",
                data_dir=tmp, access_log=False,
            )
            app = FenderApp(settings)
            app.load_initial()
            await app.start()
            invoker = ChainInvoker(app)
            host, pport = app.addresses["proxy"]
            async with aiohttp.ClientSession() as session:
                url = f"http://{host}:{pport}/a/0"
                for _ in range(50):
                    async with session.post(url, json={"k": 0}, headers={"Host": "up"}) as r:
                        await r.read()
                t = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    async with session.post(url, json={"k": 0}, headers={"Host": "up"}) as r:
                        await r.read()
                    t.append(time.perf_counter() - t0)
                rows.append(("proxy (HTTP client -> proxy -> upstream), per call", _fmt(t)))
            headers = {"Content-Type": "application/json", "Idempotency-Key": "k"}
            t = []
            for _ in range(calls):
                t0 = time.perf_counter()
                await invoker.invoke("up", "POST", "/a/0", headers, b'{"k":0}')
                t.append(time.perf_counter() - t0)
            rows.append(("invoker (in-process route call, no journal), per call", _fmt(t)))
            invoker_median = statistics.median(t)

            for sync in ("full", "normal"):
                service = SagaService(f"sqlite:///{tmp}/sagas-{sync}.db?synchronous={sync}", invoker, dict)
                await service.start()
                coordinator = service.coordinator
                per_step = []
                for i in range(sagas):
                    saga, _ = await service.create(_saga(i, steps, "seq"))
                    t0 = time.perf_counter()
                    await coordinator.wait(saga.id, 60)
                    per_step.append((time.perf_counter() - t0) / steps)
                    assert (await coordinator.get(saga.id)).status == "completed"  # type: ignore[union-attr]
                rows.append((f"saga/{sync}: sequential sagas of {steps} steps, per step", _fmt(per_step)))
                rows.append((f"saga/{sync}: overhead per step (median - invoker median)",
                             f"{(statistics.median(per_step) - invoker_median) * 1e6:.0f} us"))
                t0 = time.perf_counter()
                sem = asyncio.Semaphore(32)

                async def one(i: int, svc: SagaService = service, sem: asyncio.Semaphore = sem) -> None:
                    async with sem:
                        saga, _ = await svc.create(_saga(i, steps, "par"))
                        await svc.coordinator.wait(saga.id, 60)

                await asyncio.gather(*(one(i) for i in range(sagas)))
                elapsed = time.perf_counter() - t0
                rows.append((f"saga/{sync}/c32: {sagas} sagas x {steps} steps, 32 at a time",
                             f"{sagas * steps / elapsed:.0f} steps/s"))
                await service.stop()
            await app.stop()
    finally:
        upstream.terminate()
        upstream.wait(10)
    return rows


def _fmt(samples: list[float]) -> str:
    samples = sorted(samples)
    p50 = samples[len(samples) // 2]
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return f"p50 {p50 * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us (n={len(samples)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sagas", type=int, default=200)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    for name, value in asyncio.run(run(args.steps, args.sagas, args.calls)):
        print(f"{name:62} {value}")


if __name__ == "__main__":
    main()
