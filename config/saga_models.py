"""Saga templates under `sagas:` (SPEC section 8). Owned by the saga work; see saga/."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from config.policy_models import Frozen

__all__ = ["SagaTemplateModel"]


class SagaTemplateModel(Frozen):
    steps: tuple[dict[str, Any], ...] = Field(min_length=1)
    deadline: str | float | None = None
    on_recovery: str = "compensate"
    compensation_retry: dict[str, Any] | None = None
