"""Upstreams that speak raw bytes, for the edge cases a real HTTP server would not produce."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def raw_server(handle: Handler) -> tuple[asyncio.Server, int]:
    """`handle(reader, writer)` per connection, on a free loopback port."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]
