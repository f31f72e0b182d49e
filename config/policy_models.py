"""Validated, frozen models of every policy of SPEC section 4. No behaviour here."""

from __future__ import annotations

import math
import re
from collections import deque
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from config.units import DURATION_SCHEMA, Duration, Rate, Size

__all__ = [
    "Frozen",
    "or_shorthand",
    "TimeoutModel",
    "BackoffModel",
    "RetryAfterModel",
    "RetryBudgetModel",
    "RetryModel",
    "CircuitBreakerModel",
    "RateLimitModel",
    "BulkheadModel",
    "FallbackModel",
    "check_token",
    "check_methods",
    "check_header_fields",
    "check_json_value",
    "PolicyModel",
    "POLICY_KINDS",
    "RETRY_CONDITIONS",
]

RETRY_CONDITIONS = ("connect-failure", "reset", "timeout", "gateway-error", "5xx")
FALLBACK_KINDS = (
    "circuit_open", "timeout", "rate_limited", "bulkhead_full",
    "upstream_unavailable", "upstream_reset", "5xx",
)
_STATUS_CLASS = re.compile(r"^[1-5]xx$")
_MAX_OPEN_FOR = 300.0


class Frozen(BaseModel):
    # (no infinity or NaN: JSON has neither, and the admin API shows the config as JSON)
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def or_shorthand(shorthand: JsonSchemaValue, core: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
    """A model's JSON Schema that also admits the scalar its `mode="before"` validator expands
    (`fender schema` must accept every file `fender check` does)."""
    return {"anyOf": [shorthand, handler(core)]}


class TimeoutModel(Frozen):
    duration: Duration = Field(gt=0)

    @model_validator(mode="before")
    @classmethod
    def _scalar(cls, value: Any) -> Any:
        # `timeout: 5s` is shorthand for `timeout: {duration: 5s}`
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return {"duration": value}
        return value

    @classmethod
    def __get_pydantic_json_schema__(cls, core: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return or_shorthand(DURATION_SCHEMA, core, handler)


class BackoffModel(Frozen):
    base: Duration = 0.025
    max: Duration = 0.25

    @model_validator(mode="after")
    def _ordered(self) -> BackoffModel:
        if self.max < self.base:
            raise ValueError("backoff.max must not be smaller than backoff.base")
        return self


class RetryAfterModel(Frozen):
    honor: bool = True
    max: Duration = 10.0


class RetryBudgetModel(Frozen):
    ratio: float = Field(0.2, ge=0, le=1)
    min_per_second: float = Field(10, ge=0)
    window: Duration = Field(10.0, gt=0)


def _check_status_or_class(item: str | int) -> str | int:
    if isinstance(item, int):
        if not 100 <= item <= 599:
            raise ValueError(f"status {item} is not between 100 and 599")
        return item
    if _STATUS_CLASS.match(item):
        return item
    raise ValueError(f"{item!r} is not a status code or a class such as '5xx'")


class RetryModel(Frozen):
    attempts: int = Field(3, ge=1, le=100)
    on: tuple[str | int, ...] = ("connect-failure", "reset", "gateway-error")
    methods: tuple[str, ...] = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE")
    backoff: BackoffModel = BackoffModel()
    retry_after: RetryAfterModel = RetryAfterModel()
    budget: RetryBudgetModel = RetryBudgetModel()
    max_body: Size = 64 * 1024

    @field_validator("on", mode="after")
    @classmethod
    def _conditions(cls, value: tuple[str | int, ...]) -> tuple[str | int, ...]:
        for item in value:
            if isinstance(item, int):
                _check_status_or_class(item)
            elif item not in RETRY_CONDITIONS:
                if item.isdigit():
                    _check_status_or_class(int(item))
                    continue
                raise ValueError(
                    f"unknown retry condition {item!r}; use one of {', '.join(RETRY_CONDITIONS)} or a status code"
                )
        return tuple(int(i) if isinstance(i, str) and i.isdigit() else i for i in value)

    @field_validator("methods", mode="after")
    @classmethod
    def _methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_methods(value)


def _max_open_for_schema(schema: dict[str, Any]) -> None:
    schema.pop("default", None)  # (None stands for "computed", which JSON Schema cannot say)
    schema["description"] = "default: 5m, or open_for if that is longer"


class CircuitBreakerModel(Frozen):
    consecutive_failures: int | None = Field(None, ge=1)
    failure_rate: float | None = Field(None, gt=0, le=1)
    window: Duration | None = Field(None, gt=0)
    window_calls: int | None = Field(None, ge=1)
    min_calls: int = Field(20, ge=1)
    slow_call_duration: Duration | None = Field(None, gt=0)
    slow_call_rate: float = Field(1.0, gt=0, le=1)
    open_for: Duration = Field(30.0, gt=0)
    # unset: 5m, or open_for if that is longer (`open_for: 10m` alone is not an error)
    max_open_for: Duration = Field(None, gt=0, json_schema_extra=_max_open_for_schema)  # type: ignore[assignment]
    half_open_calls: int = Field(1, ge=1)
    failure_statuses: tuple[str | int, ...] = ("5xx",)

    @field_validator("failure_statuses", mode="after")
    @classmethod
    def _statuses(cls, value: tuple[str | int, ...]) -> tuple[str | int, ...]:
        return tuple(_check_status_or_class(int(i) if isinstance(i, str) and i.isdigit() else i) for i in value)

    @model_validator(mode="after")
    def _mode(self) -> CircuitBreakerModel:
        if self.consecutive_failures is not None and self.mode == "rate":
            raise ValueError(
                "choose either consecutive_failures or failure-rate mode "
                "(failure_rate, window, window_calls, min_calls, slow_call_duration, slow_call_rate), not both"
            )
        if self.window is not None and self.window_calls is not None:
            raise ValueError("choose either window (time) or window_calls (count), not both")
        if self.max_open_for is None:
            object.__setattr__(self, "max_open_for", max(_MAX_OPEN_FOR, self.open_for))  # (frozen)
        elif self.max_open_for < self.open_for:
            raise ValueError("max_open_for must not be smaller than open_for")
        return self

    @property
    def mode(self) -> Literal["consecutive", "rate"]:
        """Any failure-rate knob selects that mode; the others then take SPEC's defaults."""
        rate_knobs = (self.failure_rate, self.window, self.window_calls, self.slow_call_duration)
        if any(knob is not None for knob in rate_knobs):
            return "rate"
        # the two with a number for a default count only when written: `{slow_call_rate: 0.5}`
        # alone asks for rate mode, rather than being dropped by the consecutive breaker
        return "rate" if self.model_fields_set & {"min_calls", "slow_call_rate"} else "consecutive"


class RateLimitModel(Frozen):
    rate: Rate
    burst: float | None = Field(None, ge=1)  # (a bucket under one token never grants one)
    key: str = "route"
    wait: Duration = 0.0
    shadow: bool = False
    backend: Literal["local", "redis"] = "local"
    on_backend_error: Literal["allow", "deny"] = "allow"

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        if value in ("route", "client_ip"):
            return value
        if value.startswith("header:") and len(value) > len("header:"):
            return "header:" + value[len("header:"):].lower()
        raise ValueError("key is 'route', 'client_ip' or 'header:<name>'")

    @property
    def effective_burst(self) -> float:
        return self.burst if self.burst is not None else max(1.0, self.rate)


class BulkheadModel(Frozen):
    max_concurrent: int = Field(100, ge=1)
    max_queue: int = Field(0, ge=0)
    queue_timeout: Duration = 0.0


# RFC 9110 section 5.6.2: header names and methods are tokens
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 section 5.5: a field value holds no control character but HTAB. CR or LF would
# split the head (encode_head refuses them, but only once a client is waiting for the answer).
_FIELD_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def check_token(value: str, what: str) -> str:
    """`value` if it is an HTTP token, else ValueError naming it as `what` (say "method")."""
    if _TOKEN.fullmatch(value) is None:
        raise ValueError(f"{what} {value!r} is not an HTTP token (letters, digits and !#$%&'*+-.^_`|~)")
    return value


def check_methods(methods: tuple[str, ...]) -> tuple[str, ...]:
    """`methods` upper-cased if each is an HTTP token, else ValueError naming the first that is not."""
    return tuple(check_token(m, "method").upper() for m in methods)


def check_header_fields(headers: dict[str, str]) -> dict[str, str]:
    """`headers` if every name is a token and no value holds a control character, else ValueError."""
    for name, value in headers.items():
        check_token(name, "header name")
        if _FIELD_CONTROL.search(value):
            # the value is not repeated: it may be a credential, and errors are shown by the admin API
            raise ValueError(f"the value of header {name!r} holds a control character (only tab is allowed)")
    return headers


_JSON_SCALARS = (str, int, float, type(None))  # (bool is an int)
_YAML_NAMES = {"date": "timestamp", "datetime": "timestamp", "bytes": "binary", "set": "set"}


def check_json_value(value: Any) -> Any:
    """`value` if JSON can hold it, else ValueError naming where: no infinite or NaN number, and
    nothing of YAML's explicit tags (`!!timestamp`, `!!binary`, `!!set`) that JSON has no form for
    (the admin API shows the config as JSON, and bodies are sent as JSON)."""
    queue: deque[tuple[tuple[str | int, ...], Any]] = deque([((), value)])
    while queue:
        loc, item = queue.popleft()
        problem = None
        if isinstance(item, float) and not math.isfinite(item):
            problem = ".inf or .nan"
        elif isinstance(item, dict):
            queue.extend(((*loc, str(k)), k) for k in item if not isinstance(k, _JSON_SCALARS))
            queue.extend(((*loc, str(k)), v) for k, v in item.items())
        elif isinstance(item, list):
            queue.extend(((*loc, i), v) for i, v in enumerate(item))
        elif not isinstance(item, _JSON_SCALARS):
            name = type(item).__name__
            problem = f"a YAML {_YAML_NAMES.get(name, name)}"
        if problem is not None:
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
            raise ValueError(f"{where + ': ' if where else ''}{problem}, which JSON has no form for")
    return value


class FallbackModel(Frozen):
    on: tuple[str, ...] = ("circuit_open", "timeout", "5xx")
    status: int = Field(200, ge=200, le=599)  # (a 1xx is no final answer: the client would wait on)
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | dict[str, Any] | list[Any] = ""

    @field_validator("on")
    @classmethod
    def _kinds(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            if item not in FALLBACK_KINDS:
                raise ValueError(f"unknown failure kind {item!r}; use one of {', '.join(FALLBACK_KINDS)}")
        return value

    @field_validator("body")
    @classmethod
    def _body(cls, value: str | dict[str, Any] | list[Any]) -> str | dict[str, Any] | list[Any]:
        check_json_value(value)
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        if any(name.lower() == "transfer-encoding" for name in value):
            # the server frames the body with Content-Length: both would desync the client
            raise ValueError("Transfer-Encoding is not a fallback header: Fender frames the body itself")
        return check_header_fields(value)


POLICY_KINDS: dict[str, type[Frozen]] = {
    "timeout": TimeoutModel,
    "retry": RetryModel,
    "circuit_breaker": CircuitBreakerModel,
    "rate_limit": RateLimitModel,
    "bulkhead": BulkheadModel,
    "fallback": FallbackModel,
}


class PolicyModel(Frozen):
    """`{kind: params}` with exactly one kind."""

    timeout: TimeoutModel | None = None
    retry: RetryModel | None = None
    circuit_breaker: CircuitBreakerModel | None = None
    rate_limit: RateLimitModel | None = None
    bulkhead: BulkheadModel | None = None
    fallback: FallbackModel | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_params(cls, value: Any) -> Any:
        # `- retry:` (no params) or `- retry: {}` both mean all defaults
        if isinstance(value, dict):
            return {k: ({} if v is None and k != "timeout" else v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> PolicyModel:
        kinds = [k for k in POLICY_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                "a policy is one mapping {kind: params} with kind one of " + ", ".join(POLICY_KINDS)
            )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in POLICY_KINDS if getattr(self, k) is not None)

    @property
    def params(self) -> Frozen:
        value = getattr(self, self.kind)
        assert isinstance(value, Frozen)
        return value
