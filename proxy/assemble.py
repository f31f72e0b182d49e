"""Plugs the optional parts (telemetry, admin API, saga coordinator) into a FenderApp.

Each part is imported lazily so that a missing one (during development) does not
stop the data plane from running.
"""

from __future__ import annotations

import logging

from proxy.app import FenderApp

__all__ = ["assemble"]

log = logging.getLogger("fender")


def assemble(app: FenderApp) -> FenderApp:
    for name in ("proxy.telemetry.install", "proxy.admin_api.install", "saga.wiring.install"):
        module_name, _, func = name.rpartition(".")
        try:
            module = __import__(module_name, fromlist=[func])
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue
            raise
        install = getattr(module, func, None)
        if install is None:
            log.warning("%s has no %s(); skipped", module_name, func)
            continue
        install(app)
    return app
