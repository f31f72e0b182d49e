"""Drives sagas: actions forward, then compensations in reverse, journaling around every call.

One asyncio task per saga being driven. Before each call the step's intent
(`running`, attempts + 1) is committed to the store; after it, the outcome. So
after a crash the journal shows exactly which call may have been in flight, and
recovery either compensates it or re-sends it under the same Idempotency-Key.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from config.saga_models import CallModel
from policies.backoff import FullJitterBackoff
from policies.clock import SYSTEM_CLOCK, Clock
from policies.errors import FenderError
from saga.invoker import RouteInvoker, RouteResponse, UnknownRoute
from saga.model import Compensation, Saga, loads_json
from saga.observer import NULL_OBSERVER, Phase, SagaObserver
from saga.store import SagaGone, SagaStore, StoreRefused
from saga.template import TemplateError, quote_path_value, render_text, render_value

__all__ = ["SagaCoordinator", "SagaConflict", "PreparedCall", "response_record"]

log = logging.getLogger("fender.saga")

IDEMPOTENCY_KEY = "Idempotency-Key"
SAGA_ID_HEADER = "x-fender-saga-id"
CANCEL_ACK_TIMEOUT = 10.0
WAIT_POLL = 0.2  # how often `?wait=` reads a saga driven elsewhere from the store


class SagaConflict(Exception):
    """The saga is not in a status that allows the operation (HTTP 409)."""


class PreparedCall:
    __slots__ = ("route", "method", "path", "headers", "body")

    def __init__(self, route: str, method: str, path: str, headers: dict[str, str], body: bytes | None) -> None:
        self.route = route
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body


def response_record(response: RouteResponse) -> dict[str, Any]:
    """A response as the record shows it: JSON bodies parsed, others as text."""
    headers = {k.lower(): v for k, v in response.headers.items()}
    body: Any = None
    if response.body:
        text = response.body.decode("utf-8", errors="replace")
        try:
            body = loads_json(text)
        except ValueError:
            body = text
    return {"status": response.status, "headers": headers, "body": body}


def _scope(saga: Saga) -> dict[str, Any]:
    return {
        "input": saga.input,
        "saga": {"id": saga.id},
        "steps": {s.name: {"response": s.response} for s in saga.steps if s.response is not None},
    }


def prepare(saga: Saga, call: CallModel, step: str, phase: Phase) -> PreparedCall:
    """Render one call's templates; raises TemplateError."""
    scope = _scope(saga)
    path = render_text(call.path, scope, escape=quote_path_value)
    headers = {k: render_text(v, scope) for k, v in call.headers.items()}
    body: bytes | None = None
    if call.body is not None:
        value = render_value(call.body, scope)
        ctype = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
        if isinstance(value, str) and ctype is not None and "json" not in ctype.lower():
            body = value.encode()
        else:
            body = json.dumps(value, separators=(",", ":")).encode()
            if ctype is None:
                headers["Content-Type"] = "application/json"
    for name in [k for k in headers if k.lower() in ("idempotency-key", SAGA_ID_HEADER)]:
        del headers[name]
    headers[IDEMPOTENCY_KEY] = f"{saga.id}:{step}:{phase}"
    headers[SAGA_ID_HEADER] = saga.id
    _refuse_injection(path, headers)
    return PreparedCall(call.route, call.method, path, headers, body)


_UNSAFE = str.maketrans("", "", "\r\n\0")


def _refuse_injection(path: str, headers: dict[str, str]) -> None:
    """CR, LF or NUL in a rendered path or header would let input smuggle a request."""
    if path.translate(_UNSAFE) != path or " " in path:
        raise TemplateError(f"the rendered path {path!r} contains a space or a control character")
    for name, value in headers.items():
        if name.translate(_UNSAFE) != name or value.translate(_UNSAFE) != value or ":" in name:
            raise TemplateError(f"header {name!r} contains a control character once rendered")


def _error(kind: str, message: str) -> dict[str, str]:
    return {"kind": kind, "message": message}


_INTERRUPTED = _error("interrupted", "Fender stopped while this call was in flight; its outcome is unknown")


class _Runner:
    """The driving of one saga in this process."""

    __slots__ = ("saga", "task", "call", "cancel_requested", "stopped_forward", "done")

    def __init__(self, saga: Saga) -> None:
        self.saga = saga
        self.task: asyncio.Task[None] | None = None
        self.call: asyncio.Future[RouteResponse] | None = None
        self.cancel_requested = False
        self.stopped_forward = asyncio.Event()  # set once no more actions will run
        self.done = asyncio.Event()


class SagaCoordinator:
    def __init__(
        self,
        store: SagaStore,
        invoker: RouteInvoker,
        clock: Clock = SYSTEM_CLOCK,
        observer: SagaObserver = NULL_OBSERVER,
    ) -> None:
        self.store = store
        self.invoker = invoker
        self.clock = clock
        self.observer = observer
        self._runners: dict[str, _Runner] = {}
        # sagas an operation is about to drive (between its first await and _spawn):
        # claimed before any await, so two requests never both start driving one saga
        self._reserved: set[str] = set()
        self._closing = False

    # -- lifecycle ----------------------------------------------------------------------

    async def recover(self) -> int:
        """Resume every non-terminal saga in the journal; returns how many."""
        count = 0
        for saga in await self.store.unfinished():
            if self.busy(saga.id):
                continue
            self._reserved.add(saga.id)
            try:
                if saga.status in ("pending", "running") and saga.spec.on_recovery == "compensate":
                    in_flight = next((s for s in saga.steps if s.status == "running"), None)
                    if in_flight is not None:  # _begin_compensation marks it interrupted
                        await self._begin_compensation(saga, {"step": in_flight.name, **_INTERRUPTED}, ())
                self._spawn(saga)
            except SagaGone:
                continue
            finally:
                self._reserved.discard(saga.id)
            count += 1
        if count:
            log.info("resumed %d unfinished saga(s)", count)
        return count

    async def stop(self) -> None:
        """Stop driving. Calls in flight are abandoned; their intent stays in the journal."""
        self._closing = True
        tasks = [r.task for r in self._runners.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def abandon(self, saga_id: str) -> None:
        """Stop driving a saga at once, journaling nothing: another replica owns it now (fencing)."""
        runner = self._runners.get(saga_id)
        if runner is not None and runner.task is not None:
            runner.task.cancel()

    def busy(self, saga_id: str) -> bool:
        """Driven here, or about to be: such a saga must not be deleted or started again."""
        return saga_id in self._runners or saga_id in self._reserved

    # -- API operations -----------------------------------------------------------------

    async def create(self, saga: Saga) -> tuple[Saga, bool]:
        """Journal and start a new saga; or return the one already stored under its id."""
        existing = await self.store.create(saga)
        if existing is None:
            self._spawn(saga)
            return saga, True
        runner = self._runners.get(existing.id)
        return (runner.saga if runner else existing), False

    async def get(self, saga_id: str) -> Saga | None:
        runner = self._runners.get(saga_id)
        return runner.saga if runner is not None else await self.store.get(saga_id)

    async def wait(self, saga_id: str, seconds: float) -> None:
        """Until the saga is terminal (or gone), or `seconds` pass (real time: `?wait=N`).

        Driven here: until its runner is done. Driven by another replica sharing the
        store (or by nobody for now): the store is read every WAIT_POLL seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (remaining := deadline - loop.time()) > 0:
            runner = self._runners.get(saga_id)
            if runner is not None:
                try:
                    await asyncio.wait_for(runner.done.wait(), remaining)
                except TimeoutError:
                    return
                if runner.saga.terminal:
                    return
                continue  # stopped here without finishing (e.g. taken over): read the store
            saga = await self.store.get(saga_id)
            if saga is None or saga.terminal:
                return
            await asyncio.sleep(min(WAIT_POLL, remaining))

    async def cancel(self, saga_id: str) -> Saga | None:
        runner = self._runners.get(saga_id)
        if runner is None:
            if saga_id in self._reserved:
                raise SagaConflict(f"saga {saga_id!r} is being started by another request; try again")
            self._reserved.add(saga_id)
            try:
                saga = await self.store.get(saga_id)
                if saga is None:
                    return None
                if saga.terminal:
                    raise SagaConflict(f"saga {saga_id!r} is already {saga.status}")
                # journaled but not driven here (should not happen): compensate it now
                error = {"step": None, **_error("cancelled", "cancelled by request")}
                try:
                    await self._begin_compensation(saga, error, ())
                except SagaGone:
                    return None
                self._spawn(saga)
                return saga
            finally:
                self._reserved.discard(saga_id)
        saga = runner.saga
        if saga.status in ("pending", "running"):
            runner.cancel_requested = True
            if runner.call is not None:
                runner.call.cancel()
            waiters = [asyncio.ensure_future(runner.stopped_forward.wait()), asyncio.ensure_future(runner.done.wait())]
            try:
                await asyncio.wait(waiters, timeout=CANCEL_ACK_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
        if saga.status == "completed" or (saga.terminal and not runner.cancel_requested):
            raise SagaConflict(f"saga {saga_id!r} is already {saga.status}")
        return saga

    async def retry(self, saga_id: str) -> Saga | None:
        runner = self._runners.get(saga_id)
        if runner is not None:
            if runner.saga.status != "failed":
                raise SagaConflict(f"saga {saga_id!r} is {runner.saga.status}; only a failed saga can be retried")
            await runner.done.wait()  # it is being parked right now
        if self.busy(saga_id):  # another retry got here first
            raise SagaConflict(f"saga {saga_id!r} is already being retried or driven")
        self._reserved.add(saga_id)
        try:
            saga = await self.store.get(saga_id)
            if saga is None:
                return None
            if saga.status != "failed":
                raise SagaConflict(f"saga {saga_id!r} is {saga.status}; only a failed saga can be retried")
            saga.status = "compensating"
            try:
                await self._save(saga)
            except SagaGone:  # deleted since it was read: nothing to retry
                return None
            self._spawn(saga)
            return saga
        finally:
            self._reserved.discard(saga_id)

    # -- driving ------------------------------------------------------------------------

    def _spawn(self, saga: Saga) -> None:
        if self._closing:
            return
        runner = _Runner(saga)
        self._runners[saga.id] = runner
        runner.task = asyncio.create_task(self._drive(runner), name=f"saga:{saga.id}")

    async def _drive(self, runner: _Runner) -> None:
        saga = runner.saga
        self.observer.saga_started(saga.id)
        try:
            if saga.status in ("pending", "running"):
                await self._forward(runner)
            runner.stopped_forward.set()
            if saga.status == "compensating":
                await self._compensate(saga)
        except asyncio.CancelledError:
            raise
        except SagaGone:  # deleted under us: nothing left to drive or to journal
            log.info("saga %s: stopped driving: it was deleted", saga.id)
        except StoreRefused as exc:  # fenced off: another replica drives this saga now
            log.warning("saga %s: stopped driving: %s", saga.id, exc)
        except Exception:
            # a store failure: the journal still holds the last committed state,
            # which the next start resumes from
            log.exception("saga %s stopped: cannot continue", saga.id)
        finally:
            runner.stopped_forward.set()
            if self._runners.get(saga.id) is runner:
                del self._runners[saga.id]
            runner.done.set()
            if saga.terminal:
                self.observer.saga_finished(saga.id, saga.status)
            else:  # stopped, fenced off, or the journal failed: no longer driven here
                stopped = getattr(self.observer, "saga_stopped", None)
                if stopped is not None:
                    stopped(saga.id)

    async def _save(self, saga: Saga, steps: Iterable[int] = ()) -> None:
        saga.updated_at = self.clock.wall()
        touched = saga.unsaved | set(steps)
        saga.unsaved = set()
        await self.store.save(saga, sorted(touched))

    def _save_later(self, saga: Saga, step: int) -> None:
        """A success is journaled with the next write, which follows at once: the next
        step's intent, or the saga's final status. That halves the commits (fsyncs) per
        step. If Fender dies in between, the journal still shows the step in flight, and
        recovery treats it like a crash during the call: compensated, or re-sent under
        the same Idempotency-Key.
        """
        saga.updated_at = self.clock.wall()
        saga.unsaved.add(step)

    async def _begin_compensation(self, saga: Saga, error: dict[str, Any], changed: Iterable[int]) -> None:
        saga.status = "compensating"
        saga.error = error
        saga.cause = error
        touched = set(changed)
        for i, step in enumerate(saga.steps):
            if step.status == "pending":
                step.status = "skipped"
                touched.add(i)
            elif step.status == "running":
                # journaled in flight before a restart and not re-sent since (on_recovery:
                # compensate, or resume overtaken by the deadline or a cancel): outcome unknown
                step.status = "failed"
                step.finished_at = self.clock.wall()
                step.error = dict(_INTERRUPTED)
                touched.add(i)
        await self._save(saga, sorted(touched))

    async def _forward(self, runner: _Runner) -> None:
        saga = runner.saga
        for i, step in enumerate(saga.steps):
            if step.status == "succeeded":
                continue
            if runner.cancel_requested:
                await self._begin_compensation(saga, {"step": None, **_error("cancelled", "cancelled by request")}, ())
                return
            if saga.deadline_at is not None and self.clock.wall() >= saga.deadline_at:
                error = _error("deadline_exceeded", "the saga's deadline passed before this step started")
                await self._begin_compensation(saga, {"step": step.name, **error}, ())
                return
            if not await self._run_action(runner, i):
                return
        saga.status = "completed"
        saga.error = None
        await self._save(saga)

    async def _run_action(self, runner: _Runner, i: int) -> bool:
        saga = runner.saga
        step = saga.steps[i]
        spec = saga.spec.steps[i]
        try:
            call = prepare(saga, spec.action, step.name, "action")
        except TemplateError as exc:
            step.status = "failed"
            step.started_at = step.finished_at = self.clock.wall()
            step.error = _error("template_error", str(exc))
            self.observer.step_finished(saga.id, step.name, "action", 0.0, "template_error")
            await self._begin_compensation(saga, {"step": step.name, **step.error}, (i,))
            return False
        timeout, timeout_kind = spec.timeout, "timeout"
        if saga.deadline_at is not None:
            remaining = saga.deadline_at - self.clock.wall()
            if remaining < timeout:
                timeout, timeout_kind = max(remaining, 0.0), "deadline_exceeded"
        step.status = "running"
        step.attempts += 1
        step.started_at = self.clock.wall()
        step.finished_at = None
        step.error = None
        saga.status = "running"
        await self._save(saga, (i,))  # intent
        self.observer.call_started(saga.id, step.name, "action", call.headers)
        started = self.clock.now()
        status, error, response = "failed", None, None
        try:
            response = await self._invoke(runner, call, timeout)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            error = _error("cancelled", "cancelled by request while the call was in flight")
        except TimeoutError:
            status, error = "timed_out", _error(timeout_kind, f"no response within {timeout:g}s")
        except FenderError as exc:
            status = "timed_out" if exc.kind == "timeout" else "failed"
            error = _error(exc.kind, exc.message)
        except UnknownRoute as exc:
            error = _error("unknown_route", str(exc) or f"unknown route {call.route!r}")
        except Exception as exc:  # an invoker bug: the call may or may not have been sent
            log.exception("saga %s step %s: call failed", saga.id, step.name)
            error = _error("error", repr(exc))
        duration = self.clock.now() - started
        step.finished_at = self.clock.wall()
        if response is not None:
            step.response = response_record(response)
            if spec.is_success(response.status):
                step.status = "succeeded"
                self.observer.step_finished(saga.id, step.name, "action", duration, "ok")
                self._save_later(saga, i)  # outcome, committed with the next intent
                return True
            error = _error("status", f"status {response.status} is not a success for this step")
        assert error is not None
        step.status = status
        step.error = error
        self.observer.step_finished(saga.id, step.name, "action", duration, error["kind"])
        await self._begin_compensation(saga, {"step": step.name, **error}, (i,))  # outcome
        return False

    async def _invoke(self, runner: _Runner, call: PreparedCall, timeout: float) -> RouteResponse:
        task = asyncio.ensure_future(self._call(call, timeout))
        runner.call = task
        if runner.cancel_requested:
            task.cancel()
        try:
            return await task
        finally:
            runner.call = None

    async def _call(self, call: PreparedCall, timeout: float) -> RouteResponse:
        async with self.clock.timeout(timeout):
            return await self.invoker.invoke(call.route, call.method, call.path, call.headers, call.body)

    async def _compensate(self, saga: Saga) -> None:
        for i in reversed(range(len(saga.steps))):
            step = saga.steps[i]
            if saga.spec.steps[i].compensation is None or not step.needs_compensation:
                continue
            error = await self._run_compensation(saga, i)
            if error is not None:
                saga.status = "failed"
                saga.error = {"step": step.name, **error}
                await self._save(saga, (i,))
                return
        saga.status = "compensated"
        saga.error = saga.cause
        await self._save(saga)

    async def _run_compensation(self, saga: Saga, i: int) -> dict[str, str] | None:
        """Compensate step i, retrying; None when done, else the error that parks the saga."""
        step = saga.steps[i]
        spec = saga.spec.steps[i]
        assert spec.compensation is not None
        policy = spec.compensation_retry or saga.spec.compensation_retry
        backoff = FullJitterBackoff(policy.base, policy.max)
        comp = step.compensation = step.compensation or Compensation()
        if comp.status == "failed":  # parked, and retried by request: a new round
            comp.round_start = comp.attempts
        # resumed after a restart or a takeover: the round goes on with the attempts it has left
        # (an attempt that was in flight counts as used)
        first = comp.attempts - comp.round_start + 1
        last = dict(_INTERRUPTED) if comp.status == "running" else comp.error or _error("compensation_failed", "not attempted")
        for attempt in range(first, policy.attempts + 1):
            try:
                call = prepare(saga, spec.compensation, step.name, "compensation")
            except TemplateError as exc:  # retrying cannot help
                last = _error("template_error", str(exc))
                self.observer.step_finished(saga.id, step.name, "compensation", 0.0, "template_error")
                break
            comp.status = "running"
            comp.attempts += 1
            step.status = "compensating"
            await self._save(saga, (i,))  # intent
            self.observer.call_started(saga.id, step.name, "compensation", call.headers)
            started = self.clock.now()
            try:
                response = await self._call(call, spec.timeout)
            except TimeoutError:
                last = _error("timeout", f"no response within {spec.timeout:g}s")
            except FenderError as exc:
                last = _error(exc.kind, exc.message)
            except UnknownRoute as exc:
                last = _error("unknown_route", str(exc) or f"unknown route {call.route!r}")
            except Exception as exc:
                log.exception("saga %s step %s: compensation call failed", saga.id, step.name)
                last = _error("error", repr(exc))
            else:
                comp.response = response_record(response)
                if response.status // 100 == 2 or response.status in (404, 410):
                    comp.status = "succeeded"
                    comp.error = None
                    step.status = "compensated"
                    self.observer.step_finished(
                        saga.id, step.name, "compensation", self.clock.now() - started, "ok"
                    )
                    self._save_later(saga, i)  # outcome, committed with the next intent
                    return None
                last = _error("status", f"status {response.status} is not 2xx, 404 or 410")
            self.observer.step_finished(saga.id, step.name, "compensation", self.clock.now() - started, last["kind"])
            comp.error = last
            if attempt == policy.attempts:
                break
            comp.status = "pending"
            await self._save(saga, (i,))  # outcome of a failed attempt
            await self.clock.sleep(backoff.delay(attempt))
        comp.status = "failed"
        comp.error = last
        step.status = "compensation_failed"
        if last["kind"] == "template_error":  # (SPEC 8: it fails the compensation with that kind)
            return _error("template_error", f"compensation of step {step.name!r}: {last['message']}")
        return _error(
            "compensation_failed",
            f"compensation of step {step.name!r} failed after {comp.attempts} attempt(s): "
            f"{last['kind']}: {last['message']}",
        )

    def running(self) -> Mapping[str, Saga]:
        return {k: r.saga for k, r in self._runners.items()}
