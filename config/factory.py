"""Validated config -> policy objects, once per config version.

Named policies (under `policies:`) are shared: every route that names one gets
the same instance, so one breaker can guard several routes. Inline policies
belong to their route (a `defaults.chain` item gives each route its own).

Across reloads a `PolicyFactory` hands back the instance it built last time
when a policy's identity and parameters did not change, so breakers keep their
state and buckets their tokens; anything changed starts fresh.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from config.models import FenderConfig
from config.policy_models import (
    BulkheadModel,
    CircuitBreakerModel,
    FallbackModel,
    Frozen,
    PolicyModel,
    RateLimitModel,
    RetryModel,
    TimeoutModel,
)
from policies.backoff import FullJitterBackoff
from policies.base import Policy
from policies.breaker_state import BreakerStateMachine, CountWindow, SlidingWindow, TimeWindow
from policies.bulkhead import BulkheadPolicy
from policies.circuit_breaker import CircuitBreakerPolicy
from policies.clock import SYSTEM_CLOCK, Clock
from policies.fallback import FallbackPolicy
from policies.rate_limit import RateLimitPolicy
from policies.retry import RetryPolicy
from policies.retry_budget import RetryBudget
from policies.timeout import TimeoutPolicy
from policies.token_bucket import BucketStore

__all__ = ["PolicyFactory", "RouteChain", "DEFAULT_WINDOW_CALLS"]

DEFAULT_WINDOW_CALLS = 100  # failure-rate mode without window or window_calls
DEFAULT_SLOW_CALL = 2.0  # failure-rate mode: a call this long counts as slow (SPEC section 4)


@dataclass(frozen=True, slots=True)
class RouteChain:
    """What one route runs: its policies outermost first, and how much body to buffer."""

    route: str
    policies: tuple[tuple[str, Policy], ...]
    buffer_limit: int  # request-body bytes to buffer for replay; 0 when nothing retries

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for label, policy in self.policies:
            describe = getattr(policy, "describe", None)
            info = describe() if callable(describe) else {"kind": type(policy).__name__}
            out.append({"label": label, **info})
        return out


_Key = tuple[str, ...]


class PolicyFactory:
    def __init__(
        self,
        *,
        clock: Clock = SYSTEM_CLOCK,
        settings: Any = None,
        rng: Callable[[], float] = random.random,
        redis_store: BucketStore | None = None,
        max_keys: int = 10_000,
    ) -> None:
        """`redis_store` serves `backend: redis` rate limits; without it they keep local buckets."""
        self.clock = clock
        self.settings = settings
        self.rng = rng
        self.redis_store = redis_store
        self.max_keys = max_keys
        self._built: dict[_Key, Policy] = {}
        self.named: dict[str, Policy] = {}
        self.chains: dict[str, RouteChain] = {}

    def build(self, config: FenderConfig) -> dict[str, RouteChain]:
        """Every route's chain. Reuses unchanged policies of the previous build."""
        built: dict[_Key, Policy] = {}
        named: dict[str, Policy] = {}
        chains: dict[str, RouteChain] = {}
        for route in config.routes:
            items = config.chain_of(route)
            policies: list[tuple[str, Policy]] = []
            seen: dict[str, int] = {}
            buffer_limit = 0
            for item in items:
                if isinstance(item, str):
                    model = config.policies[item]
                    label = item
                    key: _Key = ("named", item, model.kind, _params(model))
                    scope = item
                else:
                    model = item
                    count = seen.get(model.kind, 0) + 1
                    seen[model.kind] = count
                    label = model.kind if count == 1 else f"{model.kind}-{count}"
                    # by label, not index: a policy that only moved in its chain keeps its state
                    key = ("inline", route.name, label, model.kind, _params(model))
                    scope = f"{route.name}.{label}"
                policy = built.get(key) or self._built.get(key)
                if policy is None:
                    policy = self._create(model, label, scope)
                built[key] = policy
                if isinstance(item, str):
                    named[item] = policy
                if isinstance(model.params, RetryModel):
                    buffer_limit = max(buffer_limit, model.params.max_body)
                policies.append((label, policy))
            chains[route.name] = RouteChain(route.name, tuple(policies), buffer_limit)
        self._built, self.named, self.chains = built, named, chains
        return chains

    def breaker(self, name: str) -> CircuitBreakerPolicy | None:
        """A breaker by its policy name, or `<route>.<label>` for an inline one."""
        policy = self.named.get(name)
        if policy is None and "." in name:
            route, _, label = name.partition(".")
            chain = self.chains.get(route)
            policy = next((p for lbl, p in chain.policies if lbl == label), None) if chain else None
        return policy if isinstance(policy, CircuitBreakerPolicy) else None

    def breakers(self) -> Mapping[str, CircuitBreakerPolicy]:
        out: dict[str, CircuitBreakerPolicy] = {}
        for name, policy in self.named.items():
            if isinstance(policy, CircuitBreakerPolicy):
                out[name] = policy
        for route, chain in self.chains.items():
            for label, policy in chain.policies:
                if isinstance(policy, CircuitBreakerPolicy) and label not in self.named:
                    out[f"{route}.{label}"] = policy
        return out

    def _create(self, model: PolicyModel, label: str, scope: str) -> Policy:
        params = model.params
        clock = self.clock
        if isinstance(params, TimeoutModel):
            return TimeoutPolicy(params.duration, name=label, clock=clock)
        if isinstance(params, RetryModel):
            return RetryPolicy(
                attempts=params.attempts,
                on=params.on,
                methods=params.methods,
                backoff=FullJitterBackoff(params.backoff.base, params.backoff.max, self.rng),
                honor_retry_after=params.retry_after.honor,
                retry_after_max=params.retry_after.max,
                budget=RetryBudget(params.budget.ratio, params.budget.min_per_second, params.budget.window),
                max_body=params.max_body,
                name=label,
                clock=clock,
            )
        if isinstance(params, CircuitBreakerModel):
            return CircuitBreakerPolicy(
                _machine(params), failure_statuses=params.failure_statuses, name=label, clock=clock
            )
        if isinstance(params, RateLimitModel):
            store = self.redis_store if params.backend == "redis" else None
            return RateLimitPolicy(
                params.rate,
                params.effective_burst,
                key=params.key,
                wait=params.wait,
                shadow=params.shadow,
                store=store,
                on_backend_error=params.on_backend_error,
                max_keys=self.max_keys,
                name=label,
                scope=scope,
                clock=clock,
            )
        if isinstance(params, BulkheadModel):
            return BulkheadPolicy(
                params.max_concurrent, params.max_queue, params.queue_timeout, name=label, clock=clock
            )
        if isinstance(params, FallbackModel):
            return FallbackPolicy(params.on, params.status, params.headers, params.body, name=label)
        raise ValueError(f"no policy for kind {model.kind!r}")


def _params(model: PolicyModel) -> str:
    params: Frozen = model.params
    if isinstance(params, CircuitBreakerModel):
        # (min_calls or slow_call_rate written at its default selects rate mode without changing
        # the dump: a reload that only switched the mode would keep the other breaker)
        return f"{params.mode}:{params.model_dump_json()}"
    return params.model_dump_json()


def _machine(params: CircuitBreakerModel) -> BreakerStateMachine:
    common: dict[str, Any] = {
        "open_for": params.open_for,
        "max_open_for": params.max_open_for,
        "half_open_calls": params.half_open_calls,
    }
    if params.mode == "consecutive":
        return BreakerStateMachine(
            consecutive_failures=params.consecutive_failures or 5, window=None, **common
        )
    window: SlidingWindow
    if params.window is not None:
        window = TimeWindow(params.window)
    else:
        window = CountWindow(params.window_calls or DEFAULT_WINDOW_CALLS)
    return BreakerStateMachine(
        consecutive_failures=None,
        failure_rate=params.failure_rate if params.failure_rate is not None else 0.5,
        window=window,
        min_calls=params.min_calls,
        slow_call_duration=params.slow_call_duration if params.slow_call_duration is not None else DEFAULT_SLOW_CALL,
        slow_call_rate=params.slow_call_rate,
        **common,
    )
