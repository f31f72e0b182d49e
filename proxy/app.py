"""Fender as a process: config, runtime, the three listeners, reload and graceful drain."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from config.checks import redis_without_url
from config.loader import ConfigInvalid, ConfigIssue, LoadedConfig, load_file
from config.models import ListenersModel
from config.settings import Settings, split_addr
from policies.clock import SYSTEM_CLOCK, Clock
from policies.events import EventBus
from proxy.handler import InflightTracker, ProxyHandler
from proxy.observer import NullObserver, RequestObserver
from proxy.runtime import Runtime, RuntimeHolder, build_runtime
from proxy.server import ProxyListener
from proxy.upstream import UpstreamPool

__all__ = ["FenderApp", "ReloadResult", "check_listeners_free", "resolve_config_path"]

log = logging.getLogger("fender")


def resolve_config_path(path: str) -> str:
    """The configured path, or the packaged default when the default path is absent."""
    if Path(path).exists() or path != "config/fender.yaml":
        return path
    return str(resources.files("config").joinpath("fender.yaml"))


@dataclass(slots=True)
class ReloadResult:
    ok: bool
    at: float
    hash: str | None = None
    errors: list[ConfigIssue] = field(default_factory=list)
    trigger: str = "start"
    unchanged: bool = False  # the file's hash equals the config already serving

    @property
    def result(self) -> str:
        """`success`, `failure` or `unchanged` (the label of fender_config_reloads_total)."""
        if not self.ok:
            return "failure"
        return "unchanged" if self.unchanged else "success"

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "result": self.result,
            "at": self.at,
            "hash": self.hash,
            "trigger": self.trigger,
            "errors": [e.as_dict() for e in self.errors],
        }


class FenderApp:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = SYSTEM_CLOCK,
        observer: RequestObserver | None = None,
        factory: Any = None,
    ) -> None:
        redis_store = None
        if factory is None:
            from config.factory import PolicyFactory  # the policies' build step

            if settings.redis_url:  # `backend: redis` rate limits share their buckets there
                from policies.redis_bucket import RedisBucketStore

                redis_store = RedisBucketStore.from_url(settings.redis_url, clock=clock)
            factory = PolicyFactory(clock=clock, settings=settings, redis_store=redis_store)
        self.settings = settings
        self.clock = clock
        self.config_path = resolve_config_path(settings.config)
        self.bus = EventBus()
        self.observer: RequestObserver = observer or NullObserver()
        self.pool = UpstreamPool(self.observer)
        self.factory = factory
        self.inflight = InflightTracker()
        self.ready = False
        self.draining = False
        self.holder: RuntimeHolder | None = None
        self.last_reload: ReloadResult | None = None
        self.reload_listeners: list[Any] = []  # callables(ReloadResult), e.g. metrics
        self._reload_lock = asyncio.Lock()
        self._runners: dict[str, web.BaseRunner] = {}
        self._proxy: ProxyListener | None = None
        self.addresses: dict[str, tuple[str, int]] = {}
        self.services: list[Any] = []  # objects with async start()/stop(), e.g. the saga service
        # services of every worker of `--workers N` (the ones above run where the admin API is);
        # stopped once the proxy listener has drained, so they see every request
        self.worker_services: list[Any] = []
        if redis_store is not None:
            self.services.append(redis_store)  # stopped last: closes the Redis connections
        self.admin_routes: list[web.RouteDef] = []
        self.admin_middlewares: list[Any] = []
        self.metrics_text = _default_metrics_text

    def set_observer(self, observer: RequestObserver) -> None:
        """Install telemetry's observer on the data plane (before `start`)."""
        self.observer = observer
        self.pool.set_observer(observer)

    # -- config ---------------------------------------------------------------------------
    @property
    def runtime(self) -> Runtime:
        assert self.holder is not None, "config not loaded"
        return self.holder.current

    def load_initial(self) -> Runtime:
        """Load the config at start; raises ConfigInvalid (there is no last good config yet)."""
        loaded = load_file(self.config_path)
        runtime = self._build(loaded)
        self.holder = RuntimeHolder(runtime)
        self.last_reload = ReloadResult(ok=True, at=time.time(), hash=loaded.hash, trigger="start")
        return runtime

    def _build(self, loaded: LoadedConfig) -> Runtime:
        if self.factory_needs_redis_url():
            missing = redis_without_url(loaded.config)
            if missing:
                raise ConfigInvalid(missing, loaded.source)
        return build_runtime(loaded, self.factory, self.pool, self.bus)

    def factory_needs_redis_url(self) -> bool:
        return getattr(self.factory, "redis_store", True) is None

    async def reload(self, trigger: str = "api") -> ReloadResult:
        """Validate completely, then swap in one assignment; on error keep the last good config."""
        async with self._reload_lock:
            try:
                loaded = load_file(self.config_path)
                if self.holder is not None and loaded.hash == self.holder.current.hash:
                    result = ReloadResult(
                        ok=True, at=time.time(), hash=loaded.hash, trigger=trigger, unchanged=True
                    )
                else:
                    runtime = self._build(loaded)
                    assert self.holder is not None
                    if loaded.config.listeners != self.holder.current.loaded.config.listeners:
                        log.warning("listeners: changes take effect only after a restart")
                    self.holder.swap(runtime)
                    self._retire_upstreams(runtime)
                    result = ReloadResult(ok=True, at=time.time(), hash=loaded.hash, trigger=trigger)
                    log.info("config reloaded", extra={"hash": loaded.hash, "trigger": trigger})
            except ConfigInvalid as exc:
                result = ReloadResult(ok=False, at=time.time(), errors=exc.errors, trigger=trigger)
                log.error(
                    "config reload rejected; keeping the last good config",
                    extra={"trigger": trigger, "errors": [str(e) for e in exc.errors]},
                )
            except Exception as exc:  # a bug in building must not take the process down
                log.exception("config reload failed")
                result = ReloadResult(
                    ok=False, at=time.time(), errors=[ConfigIssue("", f"internal error: {exc}")], trigger=trigger
                )
            self.last_reload = result
            for listener in self.reload_listeners:
                try:
                    listener(result)
                except Exception:  # a broken subscriber must not hide the reload's outcome
                    log.exception("reload listener failed")
            return result

    def _retire_upstreams(self, runtime: Runtime) -> None:
        dropped = self.pool.retain_only([r.model.upstream for r in runtime.routes.values()])
        if dropped:
            # requests in flight on the old chain may still use these pools: close them later
            loop = asyncio.get_running_loop()
            delay = max(self.settings.drain_timeout, 30.0)
            for upstream in dropped:
                loop.call_later(delay, _close_later, upstream)

    # -- listeners ------------------------------------------------------------------------
    def proxy_handler(self) -> ProxyHandler:
        assert self.holder is not None
        return ProxyHandler(self.holder, bus=self.bus, observer=self.observer, inflight=self.inflight)

    def admin_app(self) -> web.Application:
        from proxy.admin import build_admin_app

        return build_admin_app(self)

    def metrics_app(self) -> web.Application:
        from proxy.health import health_routes

        app = web.Application()
        app.add_routes(health_routes(lambda: self.ready, lambda: self.metrics_text()))
        return app

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()  # whatever did start (services, listeners) stops again
            raise

    async def _start(self) -> None:
        if self.holder is None:
            self.load_initial()
        assert self.holder is not None
        proxy_addr, admin_addr, metrics_addr = self.settings.listeners(
            self.holder.current.loaded.config.listeners
        )
        reuse_port = self.settings.workers > 1
        for name, addr in _served(self.settings, self.holder.current.loaded.config.listeners):
            # before any service starts: a second Fender on the same ports and data dir must
            # fail here, not after it resumed the first one's sagas
            _check_bindable(name, addr, reuse_port)
        if self.settings.admin_addr != "":
            for service in self.services:
                await service.start()
        for service in self.worker_services:
            await service.start()
        drain = self.settings.drain_timeout
        handler = self.proxy_handler()
        listener = ProxyListener(handler, on_refused=handler.refused)
        host, port = split_addr(proxy_addr)
        try:
            bound = await listener.start(host, port, reuse_port=reuse_port, backlog=1024)
        except OSError as exc:
            raise _cannot_listen("proxy", proxy_addr, exc) from exc
        self._proxy = listener
        self.addresses["proxy"] = (host, bound)
        if self.settings.admin_addr != "":  # "" = not served (extra workers)
            await self._start_runner(
                "admin", web.AppRunner(self.admin_app(), shutdown_timeout=drain, access_log=None), admin_addr
            )
        if self.settings.metrics_addr != "":
            await self._start_runner(
                "metrics", web.AppRunner(self.metrics_app(), shutdown_timeout=1.0, access_log=None), metrics_addr
            )
        self.ready = True

    async def _start_runner(self, name: str, runner: web.BaseRunner, addr: str) -> None:
        host, port = split_addr(addr)
        await runner.setup()
        self._runners[name] = runner
        site = web.TCPSite(runner, host, port, reuse_port=self.settings.workers > 1, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            raise _cannot_listen(name, addr, exc) from exc
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname() if sockets else (host, port)
        self.addresses[name] = (host, int(bound[1]))

    async def drain_and_stop(self) -> None:
        """SIGTERM: not ready, stop accepting, let in-flight requests finish, then stop."""
        if self.draining:
            return
        self.draining = True
        self.ready = False
        log.info("draining", extra={"inflight": self.inflight.count})
        if self._proxy is not None:
            self._proxy.stop_accepting()
        runner = self._runners.get("admin")
        if runner is not None:
            for site in list(runner.sites):
                await site.stop()
        try:
            await asyncio.wait_for(self.inflight.wait_idle(), self.settings.drain_timeout)
        except TimeoutError:
            log.warning("drain timeout passed with requests in flight", extra={"inflight": self.inflight.count})
        for runner in self._runners.values():
            # the drain window is spent: cleanup should not wait a second one
            runner._shutdown_timeout = 0.5  # noqa: SLF001 - aiohttp has no public setter
        await self.stop()

    async def stop(self) -> None:
        self.ready = False
        if self._proxy is not None:
            await self._proxy.close(0.5 if self.draining else self.settings.drain_timeout)
            self._proxy = None
        for service in reversed(self.worker_services):
            await service.stop()
        self.worker_services.clear()  # (stop() runs again after a failed start)
        for name in ("admin", "metrics"):
            runner = self._runners.pop(name, None)
            if runner is not None:
                await runner.cleanup()
        for service in reversed(self.services):
            await service.stop()
        await self.pool.close()


def check_listeners_free(settings: Settings, file: ListenersModel) -> None:
    """`--workers N`, before forking: OSError if any process listens on one of the addresses.
    The workers bind with SO_REUSEPORT, which another Fender's workers would share without a
    word (each instance then gets some of the connections), so this binds without it."""
    for name, addr in _served(settings, file):
        _check_bindable(name, addr, reuse_port=False)


def _served(settings: Settings, file: ListenersModel) -> list[tuple[str, str]]:
    """The listeners this process serves, as (name, address): an address set to "" is not served
    (admin and metrics on the extra workers)."""
    served = zip(("proxy", "admin", "metrics"), settings.listeners(file), strict=True)
    return [(name, addr) for name, addr in served if getattr(settings, f"{name}_addr") != ""]


def _check_bindable(name: str, addr: str, reuse_port: bool) -> None:
    """OSError, as the listener would raise it, if `addr` cannot be bound (in use, say)."""
    host, port = split_addr(addr)
    if port == 0:
        return
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, sockaddr in found:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as asyncio's servers do)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(sockaddr)
    except OSError as exc:
        raise _cannot_listen(name, addr, exc) from exc


def _cannot_listen(name: str, addr: str, exc: OSError) -> OSError:
    """The error `fender run` prints (proxy.cli): which listener, where, and why."""
    return OSError(exc.errno, f"{name} listener {addr}: {exc.strerror or exc}")


def _close_later(upstream: Any) -> None:
    asyncio.ensure_future(upstream.close())


def _default_metrics_text() -> tuple[bytes, str]:
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
