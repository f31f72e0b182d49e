"""The aiohttp protocol base both ends of the proxy share, with quieter flow control."""

from __future__ import annotations

from typing import Any

from aiohttp.base_protocol import BaseProtocol

__all__ = ["ProxyProtocol", "drop_traceback"]


class ProxyProtocol(BaseProtocol):
    __slots__ = ()

    def resume_reading(self, *args: Any, **kwargs: Any) -> None:
        # aiohttp's StreamReader calls this after every read of a body; only a paused protocol
        # has anything to resume (aiohttp 3.14 would re-enter data_received each time)
        if self._reading_paused:
            super().resume_reading(*args, **kwargs)


def drop_traceback(error: BaseException) -> None:
    """Forget where a caught error was raised, once it is handled.

    Some errors are kept where they are raised from: aiohttp's StreamReader keeps the one it
    was given, and so does the future its read awaited; a write's drain keeps its error in a
    future, as asyncio's TLS handshake does. Their tracebacks hold the frames that hold the
    keepers: reference cycles, which would keep the request's frames, its connections and
    its task for the cyclic collector (which `fender run` keeps rare: proxy.cli). An error
    raised again gets a traceback again: each catch drops it.
    """
    error.__traceback__ = None
