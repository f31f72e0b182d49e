"""A saga's running state, its journal form (plain JSON dicts) and its API record.

The definition (what to call) is immutable once the saga is created and lives in
the journal beside the state, so a saga finishes the steps it started with even
if its template changes in a config reload.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from config.saga_models import SagaTemplateModel

__all__ = [
    "SAGA_STATUSES",
    "STEP_STATUSES",
    "TERMINAL",
    "UNKNOWN_OUTCOME",
    "Compensation",
    "StepState",
    "Saga",
    "definition_hash",
    "iso",
    "loads_json",
]

SAGA_STATUSES = ("pending", "running", "compensating", "completed", "compensated", "failed")
TERMINAL = frozenset({"completed", "compensated", "failed"})
STEP_STATUSES = (
    "pending", "running", "succeeded", "failed", "timed_out",
    "compensating", "compensated", "compensation_failed", "skipped",
)
# Failure kinds after which the participant may have acted although we saw no answer.
UNKNOWN_OUTCOME = frozenset({"timeout", "deadline_exceeded", "upstream_reset", "cancelled", "interrupted", "error"})


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    try:
        when = datetime.fromtimestamp(ts, UTC)
    except (OverflowError, ValueError, OSError):
        # (a journal written before durations were bounded may hold a deadline past year 9999:
        # its record must still show; config.units now refuses such a duration)
        when = datetime.max.replace(tzinfo=UTC) if ts > 0 else datetime.min.replace(tzinfo=UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # (`1e999` is JSON, but no float: Python's decoder makes it inf)
        raise ValueError(f"{text} is past the range of a number")
    return value


def loads_json(text: str | bytes) -> Any:
    """`json.loads` without the NaN and Infinity Python's decoder takes (nor the inf it makes
    of a number past the float range): JSON has neither, and a record holding one would be
    answered as invalid JSON."""
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)


def definition_hash(payload: dict[str, Any]) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(slots=True)
class Compensation:
    status: str = "pending"  # pending | running | succeeded | failed
    attempts: int = 0
    response: dict[str, Any] | None = None
    error: dict[str, str] | None = None  # journal only: the last attempt's failure
    round_start: int = 0  # journal only: `attempts` when the current round of retries began

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status, "attempts": self.attempts, "response": self.response, "error": self.error,
            "round_start": self.round_start,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Compensation:
        return cls(data["status"], data["attempts"], data.get("response"), data.get("error"), data.get("round_start", 0))


@dataclass(slots=True)
class StepState:
    name: str
    status: str = "pending"
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    response: dict[str, Any] | None = None
    error: dict[str, str] | None = None  # {kind, message}
    compensation: Compensation | None = None

    @property
    def needs_compensation(self) -> bool:
        """Succeeded, or its outcome is unknown, or its compensation already began."""
        if self.status in ("succeeded", "timed_out", "compensating", "compensation_failed"):
            return True
        return self.status == "failed" and self.error is not None and self.error["kind"] in UNKNOWN_OUTCOME

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "status": self.status, "attempts": self.attempts,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "response": self.response, "error": self.error,
            "compensation": self.compensation.to_json() if self.compensation else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepState:
        comp = data.get("compensation")
        return cls(
            data["name"], data["status"], data["attempts"], data.get("started_at"),
            data.get("finished_at"), data.get("response"), data.get("error"),
            Compensation.from_json(comp) if comp else None,
        )

    def record(self) -> dict[str, Any]:
        comp = self.compensation
        return {
            "name": self.name,
            "status": self.status,
            "attempts": self.attempts,
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "response": self.response,
            "compensation": (
                {"status": comp.status, "attempts": comp.attempts, "response": comp.response} if comp else None
            ),
            "error": self.error,
        }


@dataclass(slots=True)
class Saga:
    id: str
    template: str | None
    input: dict[str, Any]
    definition: dict[str, Any]  # SagaTemplateModel.model_dump(mode="json")
    def_hash: str
    status: str
    created_at: float
    updated_at: float
    deadline_at: float | None
    steps: list[StepState]
    error: dict[str, Any] | None = None
    cause: dict[str, Any] | None = None  # journal only: what started compensation (error may later say parked)
    _parsed: SagaTemplateModel | None = field(default=None, repr=False)
    # steps changed in memory whose journal write rides on the next save (see SagaCoordinator._save)
    unsaved: set[int] = field(default_factory=set, repr=False)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def spec(self) -> SagaTemplateModel:
        if self._parsed is None:
            self._parsed = SagaTemplateModel.model_validate(self.definition)
        return self._parsed

    def header_json(self) -> dict[str, Any]:
        """Everything but the definition and the steps: rewritten on each journal write."""
        return {
            "template": self.template, "input": self.input, "created_at": self.created_at,
            "updated_at": self.updated_at, "deadline_at": self.deadline_at, "error": self.error,
            "cause": self.cause,
        }

    @classmethod
    def from_journal(
        cls, saga_id: str, status: str, def_hash: str, definition: dict[str, Any],
        header: dict[str, Any], steps: list[dict[str, Any]],
    ) -> Saga:
        return cls(
            id=saga_id, template=header.get("template"), input=header.get("input") or {},
            definition=definition, def_hash=def_hash, status=status,
            created_at=header["created_at"], updated_at=header["updated_at"],
            deadline_at=header.get("deadline_at"), steps=[StepState.from_json(s) for s in steps],
            error=header.get("error"), cause=header.get("cause"),
        )

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "template": self.template,
            "input": self.input,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "deadline_at": iso(self.deadline_at),
            "steps_executed": sum(1 for s in self.steps if s.attempts > 0),
            "total_steps": len(self.steps),
            "error": self.error,
            "steps": [s.record() for s in self.steps],
        }
