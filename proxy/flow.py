"""The aiohttp protocol base both ends of the proxy share, with quieter flow control."""

from __future__ import annotations

from typing import Any

from aiohttp.base_protocol import BaseProtocol

__all__ = ["ProxyProtocol"]


class ProxyProtocol(BaseProtocol):
    __slots__ = ()

    def resume_reading(self, *args: Any, **kwargs: Any) -> None:
        # aiohttp's StreamReader calls this after every read of a body; only a paused protocol
        # has anything to resume (aiohttp 3.14 would re-enter data_received each time)
        if self._reading_paused:
            super().resume_reading(*args, **kwargs)
