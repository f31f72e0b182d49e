"""One pooled aiohttp client per upstream, and the innermost call of every chain."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from config.models import UpstreamModel
from policies.base import Outcome, RequestContext
from policies.errors import UpstreamReset, UpstreamUnavailable
from proxy.h1client import ConnectFailed, ConnectionPool, ResponseFailed

__all__ = ["Upstream", "UpstreamPool", "OutboundRequest"]


class OutboundRequest:
    """What the forwarder needs to send one call; built once per inbound request."""

    __slots__ = ("method", "path_qs", "headers", "body")

    def __init__(
        self,
        method: str,
        path_qs: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | aiohttp.StreamReader | None,
    ) -> None:
        self.method = method
        self.path_qs = path_qs
        self.headers = headers
        self.body = body


class Upstream:
    """A keep-alive connection pool to one upstream URL."""

    def __init__(self, model: UpstreamModel, observer: Any = None) -> None:
        self.model = model
        self._url = url = URL(model.url)
        public = url.with_user(None)  # for Host, messages and spans: never the credentials
        self.base = str(public)
        self._prefix = url.raw_path.rstrip("/")  # an upstream URL may carry a base path
        self.host_header = public.raw_authority  # keeps IPv6 brackets and an explicit port
        # `http://user:pass@host` sends Basic credentials, unless the caller brought its own
        self._authorization = (
            aiohttp.BasicAuth(url.user or "", url.password or "").encode() if url.user is not None else None
        )
        self._pool: ConnectionPool | None = None
        self._observer = observer

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None:
            self._pool = self._make_pool()
        return self._pool

    def _make_pool(self) -> ConnectionPool:
        model = self.model
        url = self._url
        ssl_ctx: ssl.SSLContext | None = None
        if url.scheme == "https":
            ssl_ctx = ssl.create_default_context(cafile=model.tls.ca_file)
            if not model.tls.verify:
                ssl_ctx.check_hostname = False
                ssl_ctx.verify_mode = ssl.CERT_NONE
        return ConnectionPool(
            url.raw_host or "",
            url.port or (443 if url.scheme == "https" else 80),
            ssl_context=ssl_ctx,
            server_hostname=model.tls.server_name or url.raw_host,
            connect_timeout=model.connect_timeout,
            limit=model.max_connections,
        )

    async def send(self, ctx: RequestContext) -> Outcome:
        """The terminal call of a chain: one attempt, 5xx included, as an Outcome."""
        req: OutboundRequest = ctx.request
        ctx.attempts += 1
        body = req.body
        if body is not None and not isinstance(body, bytes | bytearray) and ctx.attempts > 1:
            # a streamed body was consumed by the first attempt; the retry policy should not get here
            raise UpstreamReset("request body was streamed and cannot be replayed")
        if self._authorization is not None and "authorization" not in req.headers:
            req.headers["Authorization"] = self._authorization
        observer = self._observer
        token = None
        if observer is not None:
            # a string: only tracing parses it into a URL (a yarl URL per attempt costs a microsecond)
            token = observer.attempt_started(ctx, req.method, self.base + req.path_qs, req.headers)
        try:
            response = await self.pool.request(req.method, self._prefix + req.path_qs, req.headers, body)
        except ConnectFailed as exc:
            error: Exception = UpstreamUnavailable(f"cannot connect to {self.base}: {exc}")
        except ResponseFailed as exc:
            error = UpstreamReset(f"{self.base}: {exc} before a full response")
        except asyncio.CancelledError:
            if observer is not None:
                observer.attempt_finished(ctx, token, None, asyncio.CancelledError())
            raise
        else:
            if observer is not None:
                observer.attempt_finished(ctx, token, response.status, None)
            return Outcome(response.status, response.headers, response, None, response.release)
        if observer is not None:
            observer.attempt_finished(ctx, token, None, error)
        try:
            raise error
        finally:
            del error  # the traceback holds this frame: a frame holding it back would be a reference cycle

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


class UpstreamPool:
    """Upstream clients keyed by their settings, so a reload keeps warm pools."""

    def __init__(self, observer: Any = None) -> None:
        self._by_key: dict[str, Upstream] = {}
        self._observer = observer

    def set_observer(self, observer: Any) -> None:
        self._observer = observer
        for upstream in self._by_key.values():
            upstream._observer = observer

    def get(self, model: UpstreamModel) -> Upstream:
        key = model.model_dump_json()
        upstream = self._by_key.get(key)
        if upstream is None:
            upstream = self._by_key[key] = Upstream(model, self._observer)
        return upstream

    def retain_only(self, models: list[UpstreamModel]) -> list[Upstream]:
        """Forget upstreams no longer configured; returns them so the caller closes them later."""
        keep = {m.model_dump_json() for m in models}
        dropped = [u for k, u in self._by_key.items() if k not in keep]
        self._by_key = {k: u for k, u in self._by_key.items() if k in keep}
        return dropped

    async def close(self) -> None:
        for upstream in self._by_key.values():
            await upstream.close()
        self._by_key.clear()
