"""Metrics, traces and the access log (SPEC section 9), plugged into a FenderApp by `install`.

    app.load_initial()
    telemetry = install(app)   # observer on the data plane, EventBus subscriber, /metrics
    await app.start()

Policies never call into this package: they emit `policies.events`, which the
observer counts and attaches to the request's span. The saga coordinator's
observer is left on `app.saga_observer` for the saga wiring to pick up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proxy.telemetry.access_log import AccessLog, stdout_writer
from proxy.telemetry.metrics import FenderMetrics, breaker_states
from proxy.telemetry.observer import SagaTelemetry, TelemetryObserver
from proxy.telemetry.peers import SnapshotWriter, read_peers
from proxy.telemetry.tracing_switch import tracing_configured
from proxy.workers import shared_directory

if TYPE_CHECKING:
    from proxy.telemetry.tracing import Tracing

__all__ = ["Telemetry", "install"]


class Telemetry:
    """What `install` built; a FenderApp service, so stopping the app flushes logs and spans."""

    def __init__(self, metrics: FenderMetrics, tracing: Tracing | None, access_log: AccessLog | None) -> None:
        self.metrics = metrics
        self.tracing = tracing
        self.access_log = access_log
        self.observer = TelemetryObserver(metrics, tracing, access_log)
        self.saga_observer = SagaTelemetry(metrics, tracing)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        if self.access_log is not None:
            self.access_log.flush()
        if self.tracing is not None:
            await self.tracing.shutdown()


def _tracing() -> Tracing | None:
    """Tracing as the OTEL_* variables ask, importing OpenTelemetry only if traces are exported."""
    if not tracing_configured():
        return None
    from proxy.telemetry.tracing import Tracing

    return Tracing.from_env(_version())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fender")
    except PackageNotFoundError:
        return ""


def install(app: Any, *, access_log_write: Any = None) -> Telemetry:
    """Wire telemetry into `app` (a `proxy.app.FenderApp`) before it starts.

    `access_log_write` replaces the stdout writer (a callable taking bytes), for tests.
    """
    access_log = None
    if app.settings.access_log:
        access_log = AccessLog(access_log_write or stdout_writer())
    telemetry = Telemetry(FenderMetrics(), _tracing(), access_log)
    metrics = telemetry.metrics

    def config_hash() -> str | None:
        return app.holder.current.hash if app.holder is not None else None

    def breakers() -> Any:
        return breaker_states(app.holder.current.routes) if app.holder is not None else ()

    metrics.add_live_state(config_hash, breakers)
    _share_between_workers(app, metrics)
    app.reload_listeners.append(lambda result: metrics.config_reloaded(result.result))
    app.metrics_text = metrics.render
    app.set_observer(telemetry.observer)
    app.bus.subscribe(telemetry.observer.on_event)
    app.services.append(telemetry)
    app.telemetry = telemetry
    app.saga_observer = telemetry.saga_observer  # read by the saga wiring
    return telemetry


def _share_between_workers(app: Any, metrics: FenderMetrics) -> None:
    """With `--workers N`: worker 0's /metrics adds the other workers' numbers (`peers`)."""
    shared = shared_directory(app.settings)
    if shared is None:
        return
    directory, index = shared
    if index == 0:
        workers = app.settings.workers
        metrics.add_peers(lambda: read_peers(directory, workers))
    else:
        app.worker_services.append(SnapshotWriter(metrics, directory, index))
