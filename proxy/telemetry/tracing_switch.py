"""Whether traces are exported, decided from the environment without importing OpenTelemetry.

The SDK and its exporter are some 70 modules and 1.5 MB of a sidecar's idle memory
(README: Benchmarks, goal 60 MB), so `proxy.telemetry` imports `tracing` only when
this says yes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["tracing_configured"]


def tracing_configured(environ: Mapping[str, str] = os.environ) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
