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
    """A connection pool to one upstream URL."""

    def __init__(self, model: UpstreamModel, observer: Any = None) -> None:
        self.model = model
        self.base = model.url
        self.host_header = URL(model.url).raw_authority
        self._session: aiohttp.ClientSession | None = None
        self._observer = observer

    @property
    def session(self) -> aiohttp.ClientSession:
        # created lazily: a ClientSession must be made inside the running loop
        if self._session is None or self._session.closed:
            self._session = self._make_session()
        return self._session

    def _make_session(self) -> aiohttp.ClientSession:
        model = self.model
        ssl_ctx: ssl.SSLContext | bool = True
        if model.url.startswith("https://"):
            if not model.tls.verify:
                ssl_ctx = False
            elif model.tls.ca_file:
                ssl_ctx = ssl.create_default_context(cafile=model.tls.ca_file)
        connector = aiohttp.TCPConnector(
            limit=model.max_connections,
            limit_per_host=0,
            ssl=ssl_ctx,
            ttl_dns_cache=30,
            enable_cleanup_closed=False,
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=model.connect_timeout),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            raise_for_status=False,
        )

    async def send(self, ctx: RequestContext) -> Outcome:
        """The terminal call of a chain: one attempt, 5xx included, as an Outcome."""
        req: OutboundRequest = ctx.request
        ctx.attempts += 1
        body = req.body
        if body is not None and not isinstance(body, bytes | bytearray) and ctx.attempts > 1:
            # a streamed body was consumed by the first attempt; the retry policy should not get here
            raise UpstreamReset("request body was streamed and cannot be replayed")
        url = URL(self.base + req.path_qs, encoded=True)
        observer = self._observer
        token = observer.attempt_started(ctx, req.method, url, req.headers) if observer else None
        try:
            response = await self.session._request(
                req.method, url, headers=req.headers, data=body,
                allow_redirects=False, compress=None, chunked=None,
            )
        except aiohttp.ClientConnectorError as exc:
            error: Exception = UpstreamUnavailable(f"cannot connect to {self.base}: {_reason(exc)}")
        except (aiohttp.ConnectionTimeoutError, aiohttp.ServerTimeoutError):
            error = UpstreamUnavailable(f"connecting to {self.base} timed out")
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError,
                aiohttp.ClientResponseError) as exc:
            error = UpstreamReset(f"{self.base} closed the connection before a full response: {_reason(exc)}")
        except asyncio.CancelledError:
            if observer:
                observer.attempt_finished(ctx, token, None, asyncio.CancelledError())
            raise
        else:
            if observer:
                observer.attempt_finished(ctx, token, response.status, None)
            return Outcome(response.status, response.headers, response, None, response.close)
        if observer:
            observer.attempt_finished(ctx, token, None, error)
        raise error

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


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
