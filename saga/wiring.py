"""Plugs the saga coordinator into a FenderApp (called by `proxy.assemble`).

Telemetry subscribes by setting `app.saga_observer` (a `saga.observer.SagaObserver`)
before this runs, or later with `app.saga_service.set_observer(...)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from config.saga_models import SagaTemplateModel
from saga.observer import NULL_OBSERVER, SagaObserver
from saga.service import SagaService

if TYPE_CHECKING:
    from proxy.app import FenderApp

__all__ = ["install"]


def install(app: FenderApp) -> SagaService:
    from proxy.invoker import ChainInvoker

    def templates() -> Mapping[str, SagaTemplateModel]:
        # the live config: templates change with a reload; running sagas keep their own copy
        return app.runtime.loaded.config.sagas if app.holder is not None else {}

    observer: SagaObserver = getattr(app, "saga_observer", None) or NULL_OBSERVER
    service = SagaService(
        app.settings.saga_store_url, ChainInvoker(app), templates, clock=app.clock, observer=observer
    )
    app.services.append(service)
    app.admin_routes.extend(service.routes())
    app.saga_service = service  # type: ignore[attr-defined]
    return service
