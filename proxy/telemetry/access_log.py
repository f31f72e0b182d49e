"""The access log: one JSON line per request on stdout.

Lines are formatted by hand (only strings a client controls go through the JSON
string encoder) and collected in a list that is written out once per event-loop
tick, so a busy loop makes one `write` for many requests. Each write holds whole
lines of at most PIPE_BUF bytes where possible, so the lines of several workers
sharing one stdout pipe do not interleave.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _json_str

__all__ = ["AccessLog", "stdout_writer"]

_PIPE_BUF = 4096


def stdout_writer(fd: int | None = None) -> Callable[[bytes], None]:
    """Writes straight to the stdout file descriptor, past Python's text layer."""
    if fd is None:
        stream = sys.stdout
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # stdout replaced by something without a descriptor

            def write_text(data: bytes) -> None:
                stream.write(data.decode())
                stream.flush()

            return write_text
        stream.flush()

    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    return write


class AccessLog:
    __slots__ = ("_write", "_lines", "_size", "_loop", "_second", "_stamp", "_broken")

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self._lines: list[bytes] = []
        self._size = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._second = -1
        self._stamp = ""
        self._broken = False

    def log(
        self,
        route: str,
        method: str,
        path: str,
        status: int,
        attempts: int,
        duration: float,
        outcome: str,
        request_id: str | None,
        trace_id: str | None,
    ) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        millis = int((now - second) * 1000)
        route_json = f'"{route}"' if route else "null"  # no route matched: null
        line = (
            f'{{"time":"{self._stamp}.{millis:03d}Z","route":{route_json},"method":{_json_str(method)},'
            f'"path":{_json_str(path)},"status":{status},"attempts":{attempts},'
            f'"duration":{duration:.6f},"outcome":"{outcome}",'
            f'"request_id":{"null" if request_id is None else _json_str(request_id)},'
            f'"trace_id":{"null" if trace_id is None else _json_str(trace_id)}}}\n'
        ).encode()
        self.append(line)

    def append(self, line: bytes) -> None:
        if self._broken:
            return
        lines = self._lines
        lines.append(line)
        self._size += len(line)
        if len(lines) == 1:
            loop = self._loop
            if loop is None or loop.is_closed():
                try:
                    loop = self._loop = asyncio.get_running_loop()
                except RuntimeError:  # no loop (a synchronous caller): write now
                    self.flush()
                    return
            loop.call_soon(self.flush)
        elif self._size > 1 << 20:  # a tick that ends a great many requests
            self.flush()

    def flush(self) -> None:
        lines = self._lines
        if not lines:
            return
        self._lines = []
        self._size = 0
        chunk: list[bytes] = []
        size = 0
        try:
            for line in lines:
                if size and size + len(line) > _PIPE_BUF:
                    self._write(b"".join(chunk))
                    chunk, size = [], 0
                chunk.append(line)
                size += len(line)
            self._write(b"".join(chunk))
        except OSError as exc:  # stdout closed: stop logging rather than fail requests
            self._broken = True
            print(f"fender: access log disabled, cannot write to stdout: {exc}", file=sys.stderr)
