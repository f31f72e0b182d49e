"""`fender demo`: a deliberately unreliable upstream with Fender in front of it.

The upstream listens on 127.0.0.1:18080 (the `demo` route of config/fender.yaml):
  /            200 always
  /flaky       503 half of the time (the route retries 5xx, so most calls succeed)
  /slow?ms=N   answers after N milliseconds (the route's per-attempt timeout is 500ms)
  /broken      500 always (three calls trip the `demo-breaker`; then 503 circuit_open)
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys

from aiohttp import web

__all__ = ["run_demo", "demo_upstream"]

INSTRUCTIONS = """
Fender demo: upstream on 127.0.0.1:{port}, proxy on {proxy}, admin on {admin}.
Try (each line shows status, attempts and any Fender error):

  export http_proxy=http://{proxy} HTTP_PROXY=http://{proxy}   # curl reads the lower-case one
  curl -si http://demo/flaky | grep -iE '^HTTP|x-fender'     # 503s retried away
  curl -si http://demo/slow?ms=800 | grep -iE '^HTTP|x-fender'  # per-attempt timeout -> 504
  for i in 1 2 3 4; do curl -si http://demo/broken | grep -iE '^HTTP|x-fender'; done  # breaker opens
  curl -s http://{admin}/routes                                # live breaker state
  curl -si http://nowhere/ | head -1                          # 404 no_route: not an open proxy

Stop with Ctrl-C.
"""


def demo_upstream(fail_ratio: float = 0.5) -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "path": request.path})

    async def flaky(request: web.Request) -> web.Response:
        if random.random() < fail_ratio:
            return web.json_response({"ok": False, "why": "flaky on purpose"}, status=503)
        return web.json_response({"ok": True})

    async def slow(request: web.Request) -> web.Response:
        try:
            ms = int(request.query.get("ms", "1000"))
        except ValueError:
            return web.json_response({"error": "ms must be an integer"}, status=400)
        await asyncio.sleep(min(ms, 60_000) / 1000)
        return web.json_response({"ok": True, "slept_ms": ms})

    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"ok": False, "why": "broken on purpose"}, status=500)

    app = web.Application()
    app.add_routes([web.get("/", ok), web.get("/flaky", flaky), web.get("/slow", slow), web.get("/broken", broken)])
    return app


async def _demo(port: int) -> int:
    from config.settings import Settings
    from proxy.app import FenderApp
    from proxy.assemble import assemble

    runner = web.AppRunner(demo_upstream(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    app = FenderApp(Settings())
    app.load_initial()
    assemble(app)
    await app.start()
    proxy = "{}:{}".format(*app.addresses["proxy"])
    admin = "{}:{}".format(*app.addresses["admin"])
    print(INSTRUCTIONS.format(port=port, proxy=proxy, admin=admin), file=sys.stderr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await app.drain_and_stop()
    await runner.cleanup()
    return 0


def run_demo(port: int) -> int:
    try:
        return asyncio.run(_demo(port))
    except OSError as exc:  # most often: a port already in use (the demo upstream's or a listener's)
        print(f"fender demo: cannot start: {exc.strerror or exc} (the demo route of the config "
              f"expects its upstream on port {port}; --upstream-port moves the upstream only)",
              file=sys.stderr)
        return 1
