"""What the coordinator tells telemetry. Metrics and tracing subscribe; the default does nothing.

`saga_started` is told each time the coordinator starts driving a saga (created,
recovered after a restart, or retried after being parked) and `saga_finished`
when it stops at a terminal status, so started minus finished is the number of
sagas in progress. `call_started` may add headers (e.g. `traceparent`) to the call.
An observer may also have `saga_stopped(saga_id)`, told instead of `saga_finished`
when driving ends without a terminal status (shutdown, another replica took the
saga over, the journal failed): the saga is no longer in progress here.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Literal, Protocol

__all__ = ["Phase", "SagaObserver", "NullSagaObserver", "NULL_OBSERVER"]

Phase = Literal["action", "compensation"]


class SagaObserver(Protocol):
    def saga_started(self, saga_id: str) -> None: ...

    def call_started(self, saga_id: str, step: str, phase: Phase, headers: MutableMapping[str, str]) -> None: ...

    def step_finished(self, saga_id: str, step: str, phase: Phase, duration: float, outcome: str) -> None:
        """`outcome` is `ok` or the failure kind (`status`, `timeout`, `template_error`, ...)."""

    def saga_finished(self, saga_id: str, status: str) -> None: ...


class NullSagaObserver:
    __slots__ = ()

    def saga_started(self, saga_id: str) -> None:
        pass

    def call_started(self, saga_id: str, step: str, phase: Phase, headers: MutableMapping[str, str]) -> None:
        pass

    def step_finished(self, saga_id: str, step: str, phase: Phase, duration: float, outcome: str) -> None:
        pass

    def saga_finished(self, saga_id: str, status: str) -> None:
        pass

    def saga_stopped(self, saga_id: str) -> None:
        pass


NULL_OBSERVER: SagaObserver = NullSagaObserver()
