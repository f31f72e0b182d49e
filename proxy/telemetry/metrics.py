"""Every Prometheus metric Fender exports (SPEC section 9), declared in one place.

The hot path only bumps numbers in plain dicts keyed by label values: no locks, no
label validation, no string formatting (everything runs on the event loop's thread,
and so does the scrape). At scrape time a collector turns them into metric families
of Fender's own `CollectorRegistry`, together with the state read live: breaker
states and the loaded config's hash.

Label values are bounded: route and policy names come from the config, `code` is a
status number, `method` is one of the standard methods or `OTHER`, and
reasons/results/outcomes/statuses are fixed words.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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
    "METRICS",
    "normalize_method",
    "attempt_result",
    "breaker_states",
    "BREAKER_STATE_VALUES",
]

# A sidecar adds well under a millisecond; upstream calls and sagas take up to tens of seconds.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
_LE = tuple(floatToGoString(b) for b in LATENCY_BUCKETS) + ("+Inf",)  # type: ignore[no-untyped-call]

# name -> (type, help, labels): the whole list, in exposition order
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "fender_requests_total": (
        "counter", "Requests handled by a route, by final status and outcome.", ("route", "method", "code", "outcome")),
    "fender_request_duration_seconds": (
        "histogram", "Time from receiving a request to the end of its response.", ("route",)),
    "fender_upstream_attempts_total": (
        "counter", "Calls made to upstreams (first tries and retries), by result.", ("route", "result")),
    "fender_retries_total": (
        "counter", "Retries scheduled, by the reason the previous attempt failed.", ("route", "reason")),
    "fender_retry_budget_exhausted_total": (
        "counter", "Retries not made because the retry budget was spent.", ("route",)),
    "fender_circuit_breaker_state": (
        "gauge", "Circuit breaker state: 0 closed, 1 half-open, 2 open.", ("route", "policy")),
    "fender_circuit_breaker_transitions_total": (
        "counter", "Circuit breaker state changes, by the new state.", ("route", "policy", "to")),
    "fender_rate_limited_total": (
        "counter", "Requests over a rate limit (shadow-mode hits included).", ("route", "policy")),
    "fender_rate_limit_backend_errors_total": (
        "counter", "Requests a shared rate limit backend (Redis) could not decide; on_backend_error did.",
        ("route", "policy")),
    "fender_bulkhead_rejected_total": (
        "counter", "Requests rejected by a full bulkhead.", ("route", "policy")),
    "fender_inflight_requests": ("gauge", "Requests in progress on a route.", ("route",)),
    "fender_config_reloads_total": ("counter", "Config reloads, by result.", ("result",)),
    "fender_config_info": ("gauge", "The config in use (value 1), by its hash.", ("hash",)),
    "fender_sagas_total": ("counter", "Sagas that reached a terminal status.", ("status",)),
    "fender_sagas_in_progress": ("gauge", "Sagas being driven by this process.", ()),
    "fender_saga_step_duration_seconds": (
        "histogram", "Duration of saga step calls, actions and compensations.", ("phase",)),
}

# the families `on_event` counts into (keys of `_events` start with one of these)
_EVENT_FAMILIES = frozenset((
    "fender_retries_total", "fender_circuit_breaker_transitions_total", "fender_rate_limited_total",
    "fender_bulkhead_rejected_total", "fender_rate_limit_backend_errors_total",
    "fender_retry_budget_exhausted_total",
))

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


class _Histogram:
    """Non-cumulative bucket counts and a sum; cumulated when scraped."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, value)] += 1  # le is inclusive: bisect_left
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for le, count in zip(_LE, self.counts, strict=True):
            total += count
            out.append((le, float(total)))
        return out


class FenderMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._requests: dict[tuple[str, str, int, str], int] = {}  # raw method; normalised when scraped
        self._durations: dict[str, _Histogram] = {}
        self._inflight: dict[str, int] = {}
        self._attempts: dict[tuple[str, int | str], int] = {}  # status, or a word when there was none
        self._events: dict[tuple[str, ...], int] = {}  # (metric name, *label values)
        self._reloads = {"success": 0, "failure": 0, "unchanged": 0}
        self._sagas: dict[str, int] = {}
        self._sagas_in_progress = 0
        self._steps: dict[str, _Histogram] = {}
        self._config_hash: Callable[[], str | None] = lambda: None
        self._breakers: Callable[[], Iterable[tuple[str, str, str]]] = lambda: ()
        self._peers: Callable[[], list[dict[str, Any]]] = list
        self.registry.register(_Exposition(self))

    @property
    def inflight(self) -> _InflightView:
        """`fender_inflight_requests` alone, with prometheus_client's `collect()` (GET /routes reads it)."""
        return _InflightView(self._inflight)

    # -- the data plane ---------------------------------------------------------------
    def request_started(self, route: str) -> None:
        inflight = self._inflight
        inflight[route] = inflight.get(route, 0) + 1

    def request_finished(self, route: str, method: str, status: int, outcome: str, duration: float) -> None:
        inflight = self._inflight
        if route in inflight:
            inflight[route] -= 1
        key = (route, method, status, outcome)
        requests = self._requests
        requests[key] = requests.get(key, 0) + 1
        histogram = self._durations.get(route)
        if histogram is None:
            histogram = self._durations[route] = _Histogram()
        histogram.observe(duration)

    def attempt_finished(self, route: str, status: int | None, error: BaseException | None) -> None:
        key = (route, status if status is not None else attempt_result(None, error))
        attempts = self._attempts
        attempts[key] = attempts.get(key, 0) + 1

    def on_event(self, event: Event, route: str) -> None:
        """Count policy decisions; events that are not counted are ignored."""
        if isinstance(event, RetryScheduled):
            key: tuple[str, ...] = ("fender_retries_total", route, event.reason)
        elif isinstance(event, BreakerTransitioned):
            key = ("fender_circuit_breaker_transitions_total", route, event.policy, event.to_state)
        elif isinstance(event, RateLimitHit):
            key = ("fender_rate_limited_total", route, event.policy)
        elif isinstance(event, BulkheadRejected):
            key = ("fender_bulkhead_rejected_total", route, event.policy)
        elif isinstance(event, RateLimitBackendError):
            key = ("fender_rate_limit_backend_errors_total", route, event.policy)
        elif isinstance(event, RetryBudgetExhausted):
            key = ("fender_retry_budget_exhausted_total", route)
        else:
            return
        events = self._events
        events[key] = events.get(key, 0) + 1

    # -- config and sagas -------------------------------------------------------------
    def config_reloaded(self, result: str) -> None:
        """Count a reload by `ReloadResult.result`: success, failure or unchanged.

        An unchanged file is not a success: one edit is often reloaded twice (the watcher
        and an API call, or every worker's SIGHUP), and only the first changes anything.
        """
        self._reloads[result] += 1

    def saga_started(self) -> None:
        self._sagas_in_progress += 1

    def saga_stopped(self) -> None:
        self._sagas_in_progress -= 1

    def saga_finished(self, status: str) -> None:
        self._sagas_in_progress -= 1
        self._sagas[status] = self._sagas.get(status, 0) + 1

    def saga_step(self, phase: str, duration: float) -> None:
        histogram = self._steps.get(phase)
        if histogram is None:
            histogram = self._steps[phase] = _Histogram()
        histogram.observe(duration)

    # -- scrape -----------------------------------------------------------------------
    def add_live_state(
        self,
        config_hash: Callable[[], str | None],
        breakers: Callable[[], Iterable[tuple[str, str, str]]],
    ) -> None:
        """State read at scrape time: the loaded config's hash and each breaker's (route, policy, state)."""
        self._config_hash = config_hash
        self._breakers = breakers

    def add_peers(self, read: Callable[[], list[dict[str, Any]]]) -> None:
        """Other workers' `snapshot()`s, read at scrape time and added to this one's numbers."""
        self._peers = read

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE

    def snapshot(self) -> dict[str, Any]:
        """This process's data-plane numbers as JSON values, for the worker that serves /metrics.

        (Sagas, reloads and the config hash are left out: only worker 0 drives sagas, and a
        reload reaches every worker, so worker 0's count is the number of reloads.)
        """
        return {
            "requests": [[*key, count] for key, count in self._requests.items()],
            "attempts": [[*key, count] for key, count in self._attempts.items()],
            "events": [[*key, count] for key, count in self._events.items()],
            "inflight": dict(self._inflight),
            "durations": {route: [h.counts, h.sum] for route, h in self._durations.items()},
            "breakers": [list(row) for row in self._breakers()],
        }

    def families(self) -> Iterator[Metric]:
        out = {name: _family(name) for name in METRICS}
        snapshots = [self.snapshot(), *self._peers()]

        # counters and the in-flight gauge add up over workers (a malformed snapshot must not
        # fail the scrape: what it held is left out from where it went wrong)
        requests: dict[tuple[str, str, str, str], int] = {}
        attempts: dict[tuple[str, str], int] = {}
        events: dict[tuple[str, ...], int] = {}
        inflight: dict[str, int] = {}
        durations: dict[str, _Histogram] = {}
        breakers: dict[tuple[str, str], int] = {}
        for snap in snapshots:
            try:
                _merge(snap, requests, attempts, events, inflight, durations, breakers)
            except Exception:  # noqa: BLE001 - whatever a file held, the scrape goes on
                continue
        for labels, count in requests.items():
            out["fender_requests_total"].add_metric(labels, count)
        for labels2, count in attempts.items():
            out["fender_upstream_attempts_total"].add_metric(labels2, count)
        for (name, *event_labels), count in events.items():
            out[name].add_metric(event_labels, count)
        for route, value in inflight.items():
            out["fender_inflight_requests"].add_metric((route,), value)
        for route, histogram in durations.items():
            _observe(out["fender_request_duration_seconds"], (route,), histogram)
        for result, count in self._reloads.items():
            out["fender_config_reloads_total"].add_metric((result,), count)
        current = self._config_hash()
        if current is not None:
            out["fender_config_info"].add_metric((current,), 1)
        for (route, policy), value in breakers.items():
            out["fender_circuit_breaker_state"].add_metric((route, policy), value)
        for saga_status, count in self._sagas.items():
            out["fender_sagas_total"].add_metric((saga_status,), count)
        out["fender_sagas_in_progress"].add_metric((), self._sagas_in_progress)
        for phase, histogram in self._steps.items():
            _observe(out["fender_saga_step_duration_seconds"], (phase,), histogram)
        return iter(out.values())


def _merge(
    snap: dict[str, Any],
    requests: dict[tuple[str, str, str, str], int],
    attempts: dict[tuple[str, str], int],
    events: dict[tuple[str, ...], int],
    inflight: dict[str, int],
    durations: dict[str, _Histogram],
    breakers: dict[tuple[str, str], int],
) -> None:
    """Add one worker's snapshot to the totals (labels normalised as they are exported)."""
    for route, method, status, outcome, count in snap["requests"]:
        labels = (route, normalize_method(method), str(status), outcome)
        requests[labels] = requests.get(labels, 0) + int(count)
    for route, result, count in snap["attempts"]:
        labels2 = (route, attempt_result(result, None) if isinstance(result, int) else str(result))
        attempts[labels2] = attempts.get(labels2, 0) + int(count)
    for *key, count in snap["events"]:
        if key and key[0] in _EVENT_FAMILIES:
            events[tuple(key)] = events.get(tuple(key), 0) + int(count)
    for route, value in snap["inflight"].items():
        inflight[route] = inflight.get(route, 0) + int(value)
    for route, (counts, total) in snap["durations"].items():
        histogram = durations.get(route)
        if histogram is None:
            histogram = durations[route] = _Histogram()
        if len(counts) != len(histogram.counts):
            raise ValueError("another bucket layout")
        histogram.counts = [a + int(b) for a, b in zip(histogram.counts, counts, strict=True)]
        histogram.sum += float(total)
    for route, policy, state in snap["breakers"]:
        # each worker has its own breaker: the worst state shows (an open breaker anywhere refuses calls)
        value = BREAKER_STATE_VALUES.get(state, 0)
        breakers[(route, policy)] = max(breakers.get((route, policy), 0), value)


def _family(name: str) -> Any:
    kind, help_text, labels = METRICS[name]
    if kind == "counter":
        return CounterMetricFamily(name, help_text, labels=labels)
    if kind == "gauge":
        return GaugeMetricFamily(name, help_text, labels=labels)
    return HistogramMetricFamily(name, help_text, labels=labels)


def _observe(family: Any, labels: tuple[str, ...], histogram: _Histogram) -> None:
    family.add_metric(labels, histogram.buckets(), histogram.sum)


class _InflightView:
    def __init__(self, counts: Mapping[str, int]) -> None:
        self._counts = counts

    def collect(self) -> list[Metric]:
        family = _family("fender_inflight_requests")
        for route, value in self._counts.items():
            family.add_metric((route,), value)
        return [family]


class _Exposition(Collector):
    def __init__(self, metrics: FenderMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics.families()


def breaker_states(routes: Mapping[str, Any]) -> Iterable[tuple[str, str, str]]:
    """(route, policy label, state word) for every breaker in the live chains."""
    for name, route in routes.items():
        for label, policy in getattr(route, "policies", ()):
            machine = getattr(policy, "machine", None)
            if getattr(policy, "kind", None) == "circuit_breaker" and machine is not None:
                yield name, label, machine.state.value
