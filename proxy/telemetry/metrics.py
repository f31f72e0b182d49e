"""Every Prometheus metric Fender exports (SPEC section 9), declared in one place.

Metrics live in their own `CollectorRegistry`, so several Fender apps in one
process (tests) do not share counters, and nothing else in the process leaks
into `/metrics`. Label values are bounded: route and policy names come from the
config, `code` is a status number, `method` is one of the standard methods or
`OTHER`, and reasons/results/outcomes are fixed words.

Children of labelled metrics are cached in plain dicts keyed by their label
values, because `labels()` validates and locks on every call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from policies.events import (
    BreakerTransitioned,
    BulkheadRejected,
    Event,
    RateLimitBackendError,
    RateLimitHit,
    RetryBudgetExhausted,
    RetryScheduled,
)

__all__ = [
    "FenderMetrics",
    "LATENCY_BUCKETS",
    "normalize_method",
    "attempt_result",
    "BREAKER_STATE_VALUES",
]

# `*_created` series double the size of the scrape and nobody here uses them
disable_created_metrics()  # type: ignore[no-untyped-call]

# A sidecar adds well under a millisecond; upstream calls and sagas take up to tens of seconds.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)

_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"))

BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes; understood by every Prometheus


def normalize_method(method: str) -> str:
    return method if method in _METHODS else "OTHER"


def attempt_result(status: int | None, error: BaseException | None) -> str:
    """A bounded word for one upstream attempt: `2xx`..`5xx`, `connect_failure`, `reset`, `cancelled`."""
    if status is not None:
        return f"{status // 100}xx"
    kind = getattr(error, "kind", None)
    if kind == "upstream_unavailable":
        return "connect_failure"
    if kind == "upstream_reset":
        return "reset"
    return "cancelled"  # a timeout around the attempt, or the client went away


class FenderMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "fender_requests_total", "Requests handled by a route, by final status and outcome.",
            ("route", "method", "code", "outcome"), registry=r,
        )
        self.request_duration = Histogram(
            "fender_request_duration_seconds", "Time from receiving a request to the end of its response.",
            ("route",), buckets=LATENCY_BUCKETS, registry=r,
        )
        self.upstream_attempts = Counter(
            "fender_upstream_attempts_total", "Calls made to upstreams (first tries and retries), by result.",
            ("route", "result"), registry=r,
        )
        self.retries = Counter(
            "fender_retries_total", "Retries scheduled, by the reason the previous attempt failed.",
            ("route", "reason"), registry=r,
        )
        self.retry_budget_exhausted = Counter(
            "fender_retry_budget_exhausted_total", "Retries not made because the retry budget was spent.",
            ("route",), registry=r,
        )
        self.breaker_transitions = Counter(
            "fender_circuit_breaker_transitions_total", "Circuit breaker state changes, by the new state.",
            ("route", "policy", "to"), registry=r,
        )
        self.rate_limited = Counter(
            "fender_rate_limited_total", "Requests over a rate limit (shadow-mode hits included).",
            ("route", "policy"), registry=r,
        )
        self.rate_limit_backend_errors = Counter(
            "fender_rate_limit_backend_errors_total",
            "Requests a shared rate limit backend (Redis) could not decide; on_backend_error did.",
            ("route", "policy"), registry=r,
        )
        self.bulkhead_rejected = Counter(
            "fender_bulkhead_rejected_total", "Requests rejected by a full bulkhead.",
            ("route", "policy"), registry=r,
        )
        self.inflight = Gauge(
            "fender_inflight_requests", "Requests in progress on a route.", ("route",), registry=r,
        )
        self.config_reloads = Counter(
            "fender_config_reloads_total", "Config reloads, by result.", ("result",), registry=r,
        )
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
        self.sagas = Counter(
            "fender_sagas_total", "Sagas that reached a terminal status.", ("status",), registry=r,
        )
        self.sagas_in_progress = Gauge(
            "fender_sagas_in_progress", "Sagas being driven by this process.", registry=r,
        )
        self.saga_step_duration = Histogram(
            "fender_saga_step_duration_seconds", "Duration of saga step calls, actions and compensations.",
            ("phase",), buckets=LATENCY_BUCKETS, registry=r,
        )
        self._requests: dict[tuple[str, str, int, str], Any] = {}
        self._durations: dict[str, Any] = {}
        self._inflight: dict[str, Any] = {}
        self._attempts: dict[tuple[str, str], Any] = {}
        self._children: dict[tuple[Any, ...], Any] = {}

    # -- the data plane ---------------------------------------------------------------
    def request_started(self, route: str) -> None:
        gauge = self._inflight.get(route)
        if gauge is None:
            gauge = self._inflight[route] = self.inflight.labels(route)
        gauge.inc()

    def request_finished(self, route: str, method: str, status: int, outcome: str, duration: float) -> None:
        gauge = self._inflight.get(route)
        if gauge is not None:
            gauge.dec()
        key = (route, method, status, outcome)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = self.requests.labels(route, normalize_method(method), str(status), outcome)
        counter.inc()
        histogram = self._durations.get(route)
        if histogram is None:
            histogram = self._durations[route] = self.request_duration.labels(route)
        histogram.observe(duration)

    def attempt_finished(self, route: str, status: int | None, error: BaseException | None) -> None:
        result = attempt_result(status, error)
        key = (route, result)
        counter = self._attempts.get(key)
        if counter is None:
            counter = self._attempts[key] = self.upstream_attempts.labels(route, result)
        counter.inc()

    def on_event(self, event: Event, route: str) -> None:
        """Count policy decisions; events that are not counted are ignored."""
        if isinstance(event, RetryScheduled):
            self._bump(self.retries, route, event.reason)
        elif isinstance(event, BreakerTransitioned):
            self._bump(self.breaker_transitions, route, event.policy, event.to_state)
        elif isinstance(event, RateLimitHit):
            self._bump(self.rate_limited, route, event.policy)
        elif isinstance(event, BulkheadRejected):
            self._bump(self.bulkhead_rejected, route, event.policy)
        elif isinstance(event, RateLimitBackendError):
            self._bump(self.rate_limit_backend_errors, route, event.policy)
        elif isinstance(event, RetryBudgetExhausted):
            self._bump(self.retry_budget_exhausted, route)

    def _bump(self, metric: Counter, *labels: str) -> None:
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        child.inc()

    # -- config and sagas -------------------------------------------------------------
    def config_reloaded(self, ok: bool) -> None:
        self.config_reloads.labels("success" if ok else "failure").inc()

    def saga_started(self) -> None:
        self.sagas_in_progress.inc()

    def saga_finished(self, status: str) -> None:
        self.sagas_in_progress.dec()
        self.sagas.labels(status).inc()

    def saga_step(self, phase: str, duration: float) -> None:
        self.saga_step_duration.labels(phase).observe(duration)

    # -- scrape -----------------------------------------------------------------------
    def add_live_state(
        self,
        config_hash: Callable[[], str | None],
        breakers: Callable[[], Iterable[tuple[str, str, str]]],
    ) -> None:
        """State read at scrape time: the loaded config's hash and each breaker's state."""
        self.registry.register(_LiveState(config_hash, breakers))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE


class _LiveState(Collector):
    def __init__(
        self,
        config_hash: Callable[[], str | None],
        breakers: Callable[[], Iterable[tuple[str, str, str]]],
    ) -> None:
        self._config_hash = config_hash
        self._breakers = breakers

    def describe(self) -> Iterable[Any]:
        return ()  # the families depend on the live config; nothing to check at registration

    def collect(self) -> Iterable[Any]:
        info = GaugeMetricFamily("fender_config_info", "The config in use (value 1), by its hash.", labels=("hash",))
        current = self._config_hash()
        if current is not None:
            info.add_metric((current,), 1.0)
        yield info
        state = GaugeMetricFamily(
            "fender_circuit_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            labels=("route", "policy"),
        )
        seen: set[tuple[str, str]] = set()
        for route, policy, value in self._breakers():
            if (route, policy) not in seen:
                seen.add((route, policy))
                state.add_metric((route, policy), float(BREAKER_STATE_VALUES.get(value, 0)))
        yield state


def breaker_states(routes: Mapping[str, Any]) -> Iterable[tuple[str, str, str]]:
    """(route, policy label, state word) for every breaker in the live chains."""
    for name, route in routes.items():
        for label, policy in getattr(route, "policies", ()):
            machine = getattr(policy, "machine", None)
            if getattr(policy, "kind", None) == "circuit_breaker" and machine is not None:
                yield name, label, machine.state.value
