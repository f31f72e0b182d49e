"""Warnings for chains that are valid but probably not what the author meant.

`fender check` prints them prefixed `warning:`; they never reject a config.
Each names the chain item it is about (`routes[1].chain[2]`), or the
`defaults.chain` item when the route inherits the default chain.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from config.loader import ConfigIssue
from config.models import ChainItem, FenderConfig
from config.policy_models import (
    BulkheadModel,
    PolicyModel,
    RateLimitModel,
    RetryModel,
    TimeoutModel,
)

__all__ = ["warnings", "redis_without_url"]

_NON_IDEMPOTENT = ("POST", "PATCH", "CONNECT")


@dataclass(frozen=True, slots=True)
class _Item:
    loc: str
    label: str
    model: PolicyModel

    @property
    def kind(self) -> str:
        return self.model.kind


def warnings(config: FenderConfig, *, redis_configured: bool | None = None) -> list[ConfigIssue]:
    """Risky orders and settings. `redis_configured=False` also flags `backend: redis`."""
    found: list[ConfigIssue] = []
    seen: set[tuple[str, str]] = set()
    for items in _chains(config):
        for issue in _check_chain(items, redis_configured):
            if (issue.loc, issue.msg) not in seen:  # a default chain is reported once
                seen.add((issue.loc, issue.msg))
                found.append(issue)
    return found


_NO_REDIS = (
    "{label} uses backend redis but FENDER_REDIS_URL is not set; `fender run` refuses this "
    "config (a per-replica bucket would admit N times the limit)"
)


def redis_without_url(config: FenderConfig) -> list[ConfigIssue]:
    """Errors for `backend: redis` rate limits when no Redis is configured."""
    found: dict[str, ConfigIssue] = {}
    for items in _chains(config):
        for item in items:
            params = item.model.params
            if isinstance(params, RateLimitModel) and params.backend == "redis":
                found.setdefault(item.loc, ConfigIssue(item.loc, _NO_REDIS.format(label=item.label)))
    return list(found.values())


def _chains(config: FenderConfig) -> Iterator[list[_Item]]:
    """Every chain that runs: the default one (when some route uses it) and the routes' own."""
    if config.defaults.chain and any(r.chain is None for r in config.routes):
        yield _resolve(config, config.defaults.chain, "defaults.chain")
    for i, route in enumerate(config.routes):
        if route.chain is not None:
            yield _resolve(config, route.chain, f"routes[{i}].chain")


def _resolve(config: FenderConfig, chain: Sequence[ChainItem], loc: str) -> list[_Item]:
    items = []
    for j, item in enumerate(chain):
        if isinstance(item, str):
            model = config.policies.get(item)
            if model is not None:
                items.append(_Item(f"{loc}[{j}]", item, model))
        else:
            items.append(_Item(f"{loc}[{j}]", item.kind, item))
    return items


def _check_chain(items: list[_Item], redis_configured: bool | None) -> Iterator[ConfigIssue]:
    retries = [n for n, it in enumerate(items) if it.kind == "retry"]
    first_retry = retries[0] if retries else None
    for n, item in enumerate(items):
        kind = item.kind
        outside_retry = first_retry is not None and n < first_retry
        if kind == "rate_limit" and first_retry is not None and n > first_retry:
            yield ConfigIssue(
                item.loc,
                f"{item.label} sits inside retry, so every retry takes a token and a refusal is "
                "not retried; put rate_limit before retry",
            )
        if kind == "circuit_breaker" and outside_retry:
            yield ConfigIssue(
                item.loc,
                f"{item.label} sits outside retry, so it sees one result per request after all "
                "retries and the retries keep hitting a failing upstream; put it inside retry",
            )
        if kind == "fallback" and first_retry is not None and n > first_retry:
            yield ConfigIssue(
                item.loc,
                "fallback sits inside retry: it turns failures into responses, so retry (and any "
                "breaker outside it) never sees them; put fallback first",
            )
        if kind == "fallback" and any(o.kind == "circuit_breaker" for o in items[:n]):
            yield ConfigIssue(
                item.loc,
                "fallback sits inside circuit_breaker, which then never sees the failures it "
                "replaces; put fallback outside the breaker",
            )
        if kind == "retry":
            yield from _check_retry(items, n, item)
        if kind == "rate_limit":
            params = item.model.params
            assert isinstance(params, RateLimitModel)
            if params.backend == "redis" and redis_configured is False:
                yield ConfigIssue(item.loc, _NO_REDIS.format(label=item.label))
        if kind == "bulkhead":
            params_b = item.model.params
            assert isinstance(params_b, BulkheadModel)
            total = any(o.kind == "timeout" for o in items[:n])
            if params_b.max_queue > 0 and params_b.queue_timeout == 0 and not total:
                yield ConfigIssue(
                    item.loc,
                    f"{item.label} queues without queue_timeout and no timeout precedes it, so a "
                    "queued request can wait forever",
                )


def _check_retry(items: list[_Item], n: int, item: _Item) -> Iterator[ConfigIssue]:
    params = item.model.params
    assert isinstance(params, RetryModel)
    totals = [_duration(o) for o in items[:n] if o.kind == "timeout"]
    inner = [o for o in items[n + 1:] if o.kind == "timeout"]
    if any(o.kind == "retry" for o in items[n + 1:]):
        yield ConfigIssue(
            item.loc,
            f"{item.label} wraps another retry, so attempts multiply; keep one retry per chain",
        )
    if "timeout" in params.on and not inner:
        yield ConfigIssue(
            item.loc,
            f"{item.label} retries on timeout but no timeout sits inside it, so a per-attempt "
            "timeout never fires; add `timeout` after retry",
        )
    if totals:
        total = min(totals)
        for o in inner:
            per_attempt = _duration(o)
            if per_attempt >= total:
                yield ConfigIssue(
                    o.loc,
                    f"per-attempt timeout {per_attempt:g}s is not shorter than the total timeout "
                    f"{total:g}s outside retry, so no retry can ever happen after a timeout",
                )
    risky = [m for m in params.methods if m in _NON_IDEMPOTENT]
    if risky:
        yield ConfigIssue(
            item.loc,
            f"{item.label} retries {', '.join(risky)}, which are not idempotent; a retry can "
            "repeat a side effect the upstream already performed (clients can send "
            "Idempotency-Key instead)",
        )
    if params.backoff.base > 0 and totals and params.backoff.base >= min(totals):
        yield ConfigIssue(
            item.loc,
            f"{item.label} backoff.base is not shorter than the total timeout, so it cannot retry",
        )


def _duration(item: _Item) -> float:
    params = item.model.params
    assert isinstance(params, TimeoutModel)
    return params.duration
