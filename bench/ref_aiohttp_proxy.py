"""The Python reference: a bare aiohttp server + ClientSession pass-through on uvloop.

Usage: python -m bench.ref_aiohttp_proxy PORT UPSTREAM_URL. What a developer writes in a
few minutes: no policies, no streaming, hop-by-hop headers dropped.
"""

import sys

import aiohttp
import uvloop
from aiohttp import web

HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
       "upgrade", "host", "content-length"}


async def app(upstream: str) -> web.Application:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

    async def forward(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        body = await request.read()
        async with session.request(request.method, upstream + request.path_qs, headers=headers,
                                   data=body or None, allow_redirects=False) as resp:
            out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP}
            return web.Response(status=resp.status, headers=out, body=await resp.read())

    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", forward)
    application.on_cleanup.append(lambda _: session.close())
    return application


if __name__ == "__main__":
    web.run_app(app(sys.argv[2].rstrip("/")), host="127.0.0.1", port=int(sys.argv[1]),
                backlog=4096, access_log=None, print=None, loop=uvloop.new_event_loop())
