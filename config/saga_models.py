"""Saga definitions (SPEC section 8): templates under `sagas:` and `POST /v1/sagas` bodies.

Both are validated by the same step models, so a config file and an API call get
the same located errors. What needs more than one field (duplicate step names,
routes that must exist, placeholders naming earlier steps) is checked by
`definition_issues`, which the config loader and the saga API both call.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from config.policy_models import Frozen, check_json_value
from config.units import Duration
from saga.template import placeholders, references, strings_in

__all__ = [
    "CallModel",
    "CompensationRetryModel",
    "StepModel",
    "SagaTemplateModel",
    "SagaRequestModel",
    "definition_issues",
    "STEP_NAME_PATTERN",
    "SAGA_ID_PATTERN",
]

STEP_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,63}$"
SAGA_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._~-]{0,127}$"
_ROUTE_NAME = r"^[a-z0-9_-]+$"
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_STATUS_CLASS = re.compile(r"^[1-5]xx$")


def _check_templates(value: Any) -> None:
    for loc, text in strings_in(value):
        try:
            placeholders(text)
        except ValueError as exc:
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
            raise ValueError(f"{where.lstrip('.')}: {exc}" if where else str(exc)) from None


class CallModel(Frozen):
    """One HTTP call through a configured route (an action or a compensation)."""

    route: str = Field(pattern=_ROUTE_NAME)
    method: str = "POST"
    path: str = "/"
    headers: dict[str, str] = Field(default_factory=dict)
    body: Any = None

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if not _TOKEN.match(value):
            raise ValueError(f"{value!r} is not an HTTP method")
        return value.upper()

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("path must start with '/'")
        _check_templates(value)
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _TOKEN.match(name):
                raise ValueError(f"{name!r} is not a header name")
        _check_templates(value)
        return value

    @field_validator("body")
    @classmethod
    def _body(cls, value: Any) -> Any:
        _check_templates(value)
        return check_json_value(value)


class CompensationRetryModel(Frozen):
    """How a failing compensation is retried before the saga is parked as `failed`."""

    attempts: int = Field(10, ge=1, le=1000)
    base: Duration = 0.1
    max: Duration = 30.0

    @model_validator(mode="after")
    def _ordered(self) -> CompensationRetryModel:
        if self.max < self.base:
            raise ValueError("compensation_retry.max must not be smaller than base")
        return self


class StepModel(Frozen):
    name: str = Field(pattern=STEP_NAME_PATTERN)
    action: CallModel
    compensation: CallModel | None = None
    timeout: Duration = Field(30.0, gt=0)
    success: tuple[str | int, ...] = Field(("2xx",), min_length=1)
    compensation_retry: CompensationRetryModel | None = None

    @field_validator("success", mode="after")
    @classmethod
    def _success(cls, value: tuple[str | int, ...]) -> tuple[str | int, ...]:
        out: list[str | int] = []
        for item in value:
            code = int(item) if isinstance(item, str) and item.isdigit() else item
            if isinstance(code, int):
                if not 100 <= code <= 599:
                    raise ValueError(f"status {code} is not between 100 and 599")
            elif not _STATUS_CLASS.match(code):
                raise ValueError(f"{code!r} is not a status code or a class such as '2xx'")
            out.append(code)
        return tuple(out)

    def is_success(self, status: int) -> bool:
        for item in self.success:
            if item == status or (isinstance(item, str) and status // 100 == int(item[0])):
                return True
        return False


OnRecovery = Literal["compensate", "resume"]


def _some_steps(steps: tuple[StepModel, ...] | None) -> tuple[StepModel, ...] | None:
    # not Field(min_length=1): pydantic checks that on the steps that validated, so one
    # invalid step also reported a bogus "steps: at least 1 item" beside its own error
    if steps is not None and not steps:
        raise ValueError("give at least one step")
    return steps


class SagaTemplateModel(Frozen):
    """A saga under `sagas:` in the config; also the normalised definition a saga runs."""

    steps: tuple[StepModel, ...] = Field(max_length=100, json_schema_extra={"minItems": 1})
    deadline: Duration | None = Field(None, gt=0)
    on_recovery: OnRecovery = "compensate"
    compensation_retry: CompensationRetryModel = CompensationRetryModel()

    _steps = field_validator("steps")(_some_steps)

    def issues(self, route_exists: Callable[[str], bool] | None = None) -> list[tuple[str, str]]:
        return list(definition_issues(self.steps, route_exists))


class SagaRequestModel(Frozen):
    """The body of `POST /v1/sagas`. Fields given here override the template's."""

    id: str | None = Field(None, pattern=SAGA_ID_PATTERN)
    template: str | None = None
    input: dict[str, Any] = Field(default_factory=dict)
    steps: tuple[StepModel, ...] | None = Field(None, max_length=100, json_schema_extra={"minItems": 1})
    deadline: Duration | None = Field(None, gt=0)
    on_recovery: OnRecovery | None = None
    compensation_retry: CompensationRetryModel | None = None

    _steps = field_validator("steps")(_some_steps)

    @model_validator(mode="after")
    def _source(self) -> SagaRequestModel:
        if self.template is None and self.steps is None:
            raise ValueError("give either 'template' (a saga under sagas: in the config) or 'steps'")
        return self

    def definition(self, template: SagaTemplateModel | None) -> SagaTemplateModel:
        """The saga to run: the template with this request's fields on top."""
        steps = self.steps if self.steps is not None else (template.steps if template else ())
        return SagaTemplateModel(
            steps=steps,
            deadline=self.deadline if self.deadline is not None else (template.deadline if template else None),
            on_recovery=self.on_recovery or (template.on_recovery if template else "compensate"),
            compensation_retry=self.compensation_retry
            or (template.compensation_retry if template else CompensationRetryModel()),
        )


def _loc(parts: Sequence[str | int]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def definition_issues(
    steps: Sequence[StepModel], route_exists: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, str]]:
    """(location, message) for what one step cannot check alone.

    Placeholders of an action may name earlier steps only; a compensation may also
    name its own step (whose response it undoes).
    """
    first: dict[str, int] = {}
    for i, step in enumerate(steps):
        if step.name in first:
            yield _loc(("steps", i, "name")), f"duplicate step name {step.name!r} (first at steps[{first[step.name]}])"
        else:
            first.setdefault(step.name, i)
    for i, step in enumerate(steps):
        for part in ("action", "compensation"):
            call: CallModel | None = getattr(step, part)
            if call is None:
                continue
            if route_exists is not None and not route_exists(call.route):
                yield _loc(("steps", i, part, "route")), f"unknown route {call.route!r}"
            fields = {"path": call.path, "headers": call.headers, "body": call.body}
            for field, value in fields.items():
                for where, name in references(value):
                    j = first.get(name)
                    allowed = j is not None and (j < i or (part == "compensation" and j == i))
                    if not allowed:
                        what = "a later step" if j is not None else "an unknown step"
                        yield _loc(("steps", i, part, field, *where)), f"placeholder names {what} {name!r}"
