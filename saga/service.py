"""The saga coordinator as the admin listener sees it: store + coordinator + HTTP routes.

    service = SagaService(settings.saga_store_url, invoker, lambda: runtime.config.sagas)
    await service.start()          # opens the journal, resumes unfinished sagas
    admin_app.add_routes(service.routes())
    ...
    await service.stop()           # stops driving; the journal keeps what was in flight
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from config.loader import validation_issues
from config.redact import mask_url_password, redact_url
from config.saga_models import SagaRequestModel, SagaTemplateModel
from policies.clock import SYSTEM_CLOCK, Clock
from saga.coordinator import SagaCoordinator
from saga.invoker import RouteInvoker
from saga.model import Saga, StepState, definition_hash
from saga.observer import NULL_OBSERVER, SagaObserver
from saga.store import SagaStore, StoreOpenFailed, open_store

__all__ = ["SagaService", "SagaInvalid", "SagaExists"]


class SagaInvalid(Exception):
    def __init__(self, errors: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{e['loc']}: {e['msg']}" if e["loc"] else e["msg"] for e in errors))
        self.errors = errors


class SagaExists(Exception):
    """Same id, different definition (HTTP 409)."""


def validation_errors(exc: ValidationError) -> list[dict[str, str]]:
    return [issue.as_dict() for issue in validation_issues(exc)]


MAX_DEPTH = 64  # JSON objects and arrays within one another, in a POST /v1/sagas body


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether JSON `value` nests objects/arrays more than `limit` deep (without recursing)."""
    level = [value] if isinstance(value, dict | list) else []
    for _ in range(limit):  # (after k turns, `level` holds the containers k+1 deep)
        if not level:
            return False
        level = [child for item in level for child in (item.values() if isinstance(item, dict) else item)
                 if isinstance(child, dict | list)]
    return bool(level)


class SagaService:
    def __init__(
        self,
        store_url: str,
        invoker: RouteInvoker,
        templates: Callable[[], Mapping[str, SagaTemplateModel]],
        clock: Clock = SYSTEM_CLOCK,
        observer: SagaObserver = NULL_OBSERVER,
        store: SagaStore | None = None,
    ) -> None:
        self.store_url = store_url
        self.invoker = invoker
        self.templates = templates
        self.clock = clock
        self.store = store if store is not None else open_store(store_url)
        self.coordinator = SagaCoordinator(self.store, invoker, clock, observer)

    def set_observer(self, observer: SagaObserver) -> None:
        self.coordinator.observer = observer

    async def start(self) -> None:
        try:
            await self.store.open()
        except Exception as exc:
            # (a driver's message may quote a piece of the password it misread as a host or a port)
            reason = mask_url_password(" ".join((str(exc) or type(exc).__name__).split()), self.store_url)
            raise StoreOpenFailed(f"FENDER_SAGA_STORE {redact_url(self.store_url)}: cannot open the saga journal: {reason}") from exc
        await self.coordinator.recover()
        takeover = getattr(self.store, "run_takeover", None)  # a shared store: scan for expired leases
        if takeover is not None:
            self._takeover = asyncio.create_task(takeover(self.coordinator), name="saga-takeover")

    async def stop(self) -> None:
        takeover = getattr(self, "_takeover", None)
        if takeover is not None:
            takeover.cancel()
            await asyncio.gather(takeover, return_exceptions=True)
        await self.coordinator.stop()
        await self.store.close()

    def routes(self) -> list[web.RouteDef]:
        from saga.api import saga_routes

        return saga_routes(self)

    def build(self, body: Any) -> Saga:
        """Validate a `POST /v1/sagas` body into a new saga; SagaInvalid with located errors."""
        if not isinstance(body, dict):
            raise SagaInvalid([{"loc": "", "msg": "the body must be a JSON object"}])
        if _deeper_than(body, MAX_DEPTH):
            # (the journal serialises the definition: beyond some depth that fails, and it
            # must fail here, as the client's error, not later as the store's)
            raise SagaInvalid([{"loc": "", "msg": f"the body nests deeper than {MAX_DEPTH} levels"}])
        try:
            request = SagaRequestModel.model_validate(body)
        except ValidationError as exc:
            raise SagaInvalid(validation_errors(exc)) from None
        template = None
        if request.template is not None:
            template = self.templates().get(request.template)
            if template is None:
                raise SagaInvalid([{"loc": "template", "msg": f"unknown saga template {request.template!r}"}])
        try:
            definition = request.definition(template)
        except ValidationError as exc:
            raise SagaInvalid(validation_errors(exc)) from None
        issues = definition.issues(self.invoker.has_route)
        if issues:
            raise SagaInvalid([{"loc": loc, "msg": msg} for loc, msg in issues])
        now = self.clock.wall()
        return Saga(
            id=request.id or uuid.uuid4().hex,
            template=request.template,
            input=request.input,
            definition=definition.model_dump(mode="json"),
            def_hash=definition_hash(request.model_dump(mode="json", exclude={"id"})),
            status="pending",
            created_at=now,
            updated_at=now,
            deadline_at=now + definition.deadline if definition.deadline is not None else None,
            steps=[StepState(step.name) for step in definition.steps],
        )

    async def create(self, body: Any) -> tuple[Saga, bool]:
        """(saga, created). SagaInvalid, or SagaExists when the id holds another definition."""
        saga = self.build(body)
        stored, created = await self.coordinator.create(saga)
        if not created and stored.def_hash != saga.def_hash:
            raise SagaExists(f"saga {saga.id!r} already exists with a different definition")
        return stored, created
