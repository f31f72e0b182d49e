"""`FENDER_SAGA_STORE=postgresql://...`: schema on open, leases, fencing, takeover after a crash.

Needs PostgreSQL on 127.0.0.1:5432, database `test` (skipped locally without it, a
failure under FENDER_REQUIRE_SERVICES=1). Each test works in a schema of its own,
dropped afterwards. `FENDER_TEST_POSTGRES_URL` overrides the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
from aiohttp import web

from policies.clock import MonotonicClock
from policies.testing import FakeClock
from proxy.cli import main
from saga.invoker import RouteResponse
from saga.model import Saga, StepState
from saga.postgres_store import SCHEMA_VERSION, PostgresSagaStore
from saga.service import SagaService
from saga.store import StoreOpenFailed, StoreRefused, open_store
from tests.conftest import require_service
from tests.support.processes import FenderProcess

DSN = os.environ.get("FENDER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    require_service("postgresql", "127.0.0.1", 5432)
    import asyncpg

    name = f"fender_test_{uuid.uuid4().hex[:10]}"
    yield name
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    finally:
        await conn.close()


def a_saga(saga_id: str) -> Saga:
    now = time.time()
    return Saga(
        id=saga_id, template=None, input={},
        definition={"steps": [{"name": "one", "action": {"route": "r", "method": "POST", "path": "/"}}]},
        def_hash="h", status="pending", created_at=now, updated_at=now, deadline_at=None,
        steps=[StepState("one")],
    )


async def test_schema_is_created_and_versioned_once(schema: str) -> None:
    import asyncpg

    store = open_store(f"{DSN}?schema={schema}&lease=3s")
    assert isinstance(store, PostgresSagaStore) and store.lease == 3.0
    await store.open()
    await store.close()
    again = open_store(f"{DSN}?schema={schema}")  # a second start migrates nothing
    await again.open()
    assert await again.create(a_saga("s1")) is None
    await again.close()
    conn = await asyncpg.connect(DSN)
    try:
        versions = [r["version"] for r in await conn.fetch(f"SELECT version FROM {schema}.fender_schema_version")]
    finally:
        await conn.close()
    assert versions == list(range(1, SCHEMA_VERSION + 1))


async def test_takeover_after_the_lease_expires_fences_the_old_owner(schema: str) -> None:
    old = PostgresSagaStore(DSN, schema=schema, lease=0.6)
    new = PostgresSagaStore(DSN, schema=schema, lease=0.6)
    await old.open()
    await new.open()
    try:
        saga = a_saga("s1")
        assert await old.create(saga) is None
        saga.status = "running"
        await old.save(saga, [0])
        await asyncio.sleep(0.7)  # the heartbeat keeps the lease: nothing to take over
        assert await new.unfinished() == []

        assert old._heartbeat is not None
        old._heartbeat.cancel()  # the old owner stalls (a GC pause, a partition): no more renewals
        await asyncio.sleep(0.7)
        taken = await new.unfinished()
        assert [s.id for s in taken] == ["s1"] and taken[0].status == "running"

        with pytest.raises(StoreRefused):  # the old owner's next write is refused...
            await old.save(saga, [0])
        current = await new.get("s1")
        assert current is not None and current.status == "running"  # ...and changed nothing
        taken[0].status = "compensating"
        await new.save(taken[0], [0])  # the new owner writes
        current = await old.get("s1")
        assert current is not None and current.status == "compensating"

        taken[0].status = "compensated"
        await new.save(taken[0])  # terminal: nobody holds it any more
        await asyncio.sleep(0.7)
        assert await old.unfinished() == [] and await new.unfinished() == []
    finally:
        await old.close()
        await new.close()


async def test_a_replica_that_cannot_renew_stops_driving_before_the_lease_runs_out(schema: str) -> None:
    store = PostgresSagaStore(DSN, schema=schema, lease=0.8)
    lost: list[tuple[str, float]] = []
    store.on_lease_lost = lambda saga_id: lost.append((saga_id, time.monotonic()))
    await store.open()
    try:
        started = time.monotonic()
        assert await store.create(a_saga("s1")) is None

        async def unreachable() -> None:
            raise OSError("connection refused")

        store.renew = unreachable  # type: ignore[method-assign]
        await asyncio.sleep(1.0)
        assert [saga_id for saga_id, _ in lost] == ["s1"]
        assert lost[0][1] - started < 0.8  # before anyone else may take it over
    finally:
        await store.close()


class CommitHeldBack:
    """The pool, but a create stops after its saga row (seq taken) and before its steps and commit, until released."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.inserted = asyncio.Event()
        self.release = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        gate = self

        class Held:
            def __init__(self, conn: Any) -> None:
                self.conn = conn

            def __getattr__(self, name: str) -> Any:
                return getattr(self.conn, name)

            async def execute(self, sql: str, *args: Any) -> Any:
                if "fender_saga_steps" in sql:
                    gate.inserted.set()
                    await gate.release.wait()
                return await self.conn.execute(sql, *args)

        async with self.pool.acquire() as conn:
            yield Held(conn)


async def test_paging_does_not_skip_a_saga_whose_create_commits_after_a_later_one(schema: str) -> None:
    import asyncpg

    # seq is handed out at INSERT, a row is seen at COMMIT: replica a's create takes seq 1
    # and commits only after b's creates (seq 2 and 3) have
    a = PostgresSagaStore(DSN, schema=schema, lease=10.0)
    b = PostgresSagaStore(DSN, schema=schema, lease=10.0)
    await a.open()
    await b.open()
    gate = CommitHeldBack(a._pool)
    a._pool = gate
    watcher = await asyncpg.connect(DSN)
    early = asyncio.create_task(a.create(a_saga("early")))
    try:
        await asyncio.wait_for(gate.inserted.wait(), 5)
        for saga_id in ("late", "later"):
            assert await b.create(a_saga(saga_id)) is None
        first = asyncio.create_task(b.page(None, 1, None))
        deadline = time.monotonic() + 5
        while not first.done():  # it either answers or waits for the create in flight
            waiting = await watcher.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND objid = (hashtext($1)::bigint & 4294967295)::oid",
                b._create_lock,
            )
            if waiting:
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        gate.release.set()
        assert await early is None
        page = await first
        seen = [s.id for s in page.items]
        while page.next_cursor is not None:
            page = await b.page(None, 1, page.next_cursor)
            seen += [s.id for s in page.items]
        assert seen == ["early", "late", "later"]
    finally:
        gate.release.set()
        await asyncio.gather(early, return_exceptions=True)
        a._pool = gate.pool
        await watcher.close()
        await a.close()
        await b.close()


class RecordingInvoker:
    """A replica's route calls, logged as (replica, key, event, time); `/slow` paths hang."""

    def __init__(self, replica: str, log: list[tuple[str, str, str, float]]) -> None:
        self.replica = replica
        self.log = log

    def has_route(self, name: str) -> bool:
        return True

    async def invoke(
        self, route: str, method: str, path: str, headers: Mapping[str, str], body: bytes | None
    ) -> RouteResponse:
        key = headers["Idempotency-Key"]
        self.log.append((self.replica, key, "sent", time.monotonic()))
        try:
            if path.startswith("/slow"):
                await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.log.append((self.replica, key, "cancelled", time.monotonic()))
            raise
        return RouteResponse(201, {}, b"{}")


async def test_a_partitioned_replica_stops_its_call_before_another_takes_the_saga_over(schema: str) -> None:
    log: list[tuple[str, str, str, float]] = []
    services = {
        name: SagaService(
            "postgresql://unused", RecordingInvoker(name, log), dict,
            store=PostgresSagaStore(DSN, schema=schema, lease=1.0),
        )
        for name in ("a", "b")
    }
    a, b = services["a"], services["b"]
    await a.start()
    await b.start()
    try:
        body = saga_body("p1", slow=False)
        body["steps"][1]["action"]["path"] = "/slow/charge"
        await a.create(body)
        deadline = time.monotonic() + 5
        while not any(key == "p1:charge:action" for _, key, _, _ in log):
            assert time.monotonic() < deadline, log
            await asyncio.sleep(0.02)

        async def unreachable(*args: Any) -> Any:
            raise OSError("no route to host")

        # a loses the database: no renewals, no takeover scans, no writes
        for method in ("renew", "unfinished", "save", "get"):
            setattr(a.store, method, unreachable)
        saga = None
        while saga is None or not saga.terminal:
            assert time.monotonic() < deadline + 10, log
            await asyncio.sleep(0.05)
            saga = await b.store.get("p1")
        assert saga.status == "compensated"
    finally:
        for service in services.values():
            await service.stop()

    a_cancelled = next(t for who, key, event, t in log if who == "a" and event == "cancelled")
    b_first = min(t for who, _, _, t in log if who == "b")
    assert a_cancelled < b_first  # a gave the saga up before b touched it
    assert not any(who == "a" and t > b_first for who, _, _, t in log)
    assert [(who, key) for who, key, event, _ in log if event == "sent"] == [
        ("a", "p1:reserve:action"), ("a", "p1:charge:action"),
        ("b", "p1:charge:compensation"), ("b", "p1:reserve:compensation"),
    ]


class DelayingProxy:
    """A TCP proxy in front of PostgreSQL that holds the server's replies back `delay` seconds.

    Writes still reach the database (and commit) on time; only their answers come late.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.delay = 0.0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self.target)
        replies: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        for task in (self._pipe(client_r, server_w), self._read(server_r, replies), self._late(replies, client_w)):
            self.tasks.add(asyncio.create_task(task))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _read(self, reader: asyncio.StreamReader, replies: asyncio.Queue[tuple[float, bytes]]) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                replies.put_nowait((loop.time() + self.delay, data))
        replies.put_nowait((loop.time() + self.delay, b""))

    @staticmethod
    async def _late(replies: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ConnectionError):
            while True:
                due, data = await replies.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        writer.close()


async def test_a_journal_write_answered_after_the_local_lease_validity_sends_no_call(schema: str) -> None:
    target = urlsplit(DSN)
    proxy = DelayingProxy((target.hostname or "127.0.0.1", target.port or 5432))
    port = await proxy.start()
    log: list[tuple[str, str, str, float]] = []

    class SlowsTheDatabase(RecordingInvoker):
        async def invoke(self, route: str, method: str, path: str, headers: Mapping[str, str],
                         body: bytes | None) -> RouteResponse:
            response = await super().invoke(route, method, path, headers, body)
            proxy.delay = 1.5  # from now on the database answers after twice the local validity
            return response

    store = PostgresSagaStore(urlunsplit(target._replace(netloc=target.netloc.replace(f":{target.port}", f":{port}"))), schema=schema, lease=1.0)
    service = SagaService("postgresql://unused", SlowsTheDatabase("a", log), dict, store=store)
    await service.start()
    try:
        await service.create(saga_body("late", slow=False))
        await service.coordinator.wait("late", 5)  # until it stops being driven here
    finally:
        proxy.delay = 0.0
        await service.stop()
        await proxy.stop()
    # the intent of `charge` was committed, but its answer came after 0.75 * lease:
    # another replica may have taken the saga over by then, so `charge` is never sent
    assert [key for _, key, event, _ in log if event == "sent"] == ["late:reserve:action"]


class JumpingClock(MonotonicClock):
    """The system clock plus `ahead` seconds, for a pause the test decides on."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def now(self) -> float:
        return time.monotonic() + self.ahead


async def test_a_write_committed_but_answered_after_the_local_validity_is_refused(schema: str) -> None:
    clock = JumpingClock()
    store = PostgresSagaStore(DSN, schema=schema, lease=10.0, clock=clock)
    await store.open()
    try:
        saga = a_saga("s1")
        assert await store.create(saga) is None
        pool = store._pool

        class AnsweredLate:  # the pool, but its writes are answered 0.75 * lease after they were sent
            def __getattr__(self, name: str) -> Any:
                return getattr(pool, name)

            async def fetchval(self, *args: Any, **kwargs: Any) -> Any:
                result = await pool.fetchval(*args, **kwargs)
                clock.ahead += 7.5
                return result

        store._pool = AnsweredLate()
        saga.status = "running"
        with pytest.raises(StoreRefused):
            await store.save(saga, [0])
        store._pool = pool
        stored = await store.get("s1")
        assert stored is not None and stored.status == "running"  # it was committed, just not trusted
        assert "s1" not in store._held  # no longer renewed: a scan takes it over once the lease runs out
    finally:
        await store.close()


# -- two `fender run` replicas ------------------------------------------------------------

CONFIG = """
version: 1
routes:
  - name: shop
    match: {{host: shop}}
    upstream: {up}
"""


def saga_body(saga_id: str, slow: bool) -> dict[str, Any]:
    return {
        "id": saga_id,
        "steps": [
            {"name": "reserve",
             "action": {"route": "shop", "method": "POST", "path": "/action/reserve"},
             "compensation": {"route": "shop", "method": "POST", "path": "/compensation/reserve"}},
            {"name": "charge",
             "action": {"route": "shop", "method": "POST", "path": "/action/charge" + ("?slow=1" if slow else "")},
             "compensation": {"route": "shop", "method": "POST", "path": "/compensation/charge"},
             "timeout": "20s"},
        ],
    }


class Participant:
    """One upstream, two ports: the port tells which replica sent a call."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[str, float]]] = defaultdict(list)  # key -> [(replica, when)]
        self.release = asyncio.Event()

    def app(self, replica: str) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.calls[request.headers["Idempotency-Key"]].append((replica, time.monotonic()))
            if request.query.get("slow"):
                try:
                    await asyncio.wait_for(self.release.wait(), 20)
                except TimeoutError:
                    pass
            return web.json_response({"ok": True}, status=201)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


async def test_a_killed_replica_s_sagas_are_finished_by_the_other_and_no_step_is_sent_twice(
    schema: str, tmp_path: Path, aiohttp_server: Any
) -> None:
    participant = Participant()
    env = {"FENDER_SAGA_STORE": f"{DSN}?schema={schema}", "FENDER_SAGA_LEASE": "2s"}
    replicas = {}
    for name in ("a", "b"):
        server = await aiohttp_server(participant.app(name))
        path = tmp_path / f"{name}.yaml"
        path.write_text(CONFIG.format(up=f"http://127.0.0.1:{server.port}"))
        replicas[name] = FenderProcess(path, tmp_path / f"data-{name}", **env)
    a, b = replicas["a"], replicas["b"]
    try:
        async with aiohttp.ClientSession() as http:
            for i in range(3):
                async with http.post(f"{a.admin}/v1/sagas", json=saga_body(f"a{i}", slow=True)) as resp:
                    assert resp.status == 202, await resp.text()
                async with http.post(f"{b.admin}/v1/sagas", json=saga_body(f"b{i}", slow=False)) as resp:
                    assert resp.status == 202, await resp.text()
            deadline = time.monotonic() + 10
            while not all(f"a{i}:charge:action" in participant.calls for i in range(3)):
                assert time.monotonic() < deadline, dict(participant.calls)
                await asyncio.sleep(0.05)
            await asyncio.sleep(2.5)  # longer than a lease: a's heartbeats must keep b away meanwhile
            assert not any(k.endswith(":compensation") for k in participant.calls)
            async with http.post(f"{b.admin}/v1/sagas/a0/cancel") as resp:  # a holds it: b may not touch it
                assert resp.status == 409 and (await resp.json())["error"] == "saga_owned_elsewhere"

            a.terminate(signal.SIGKILL)  # mid-saga: every a-saga has its charge call in flight
            a.proc.wait(10)
            killed_at = time.monotonic()

            records = {}
            deadline = time.monotonic() + 15
            for saga_id in [f"a{i}" for i in range(3)] + [f"b{i}" for i in range(3)]:
                while True:
                    async with http.get(f"{b.admin}/v1/sagas/{saga_id}") as resp:
                        record = await resp.json()
                    if record["status"] in ("completed", "compensated", "failed"):
                        break
                    assert time.monotonic() < deadline, record
                    await asyncio.sleep(0.1)
                records[saga_id] = record
    finally:
        participant.release.set()
        for replica in replicas.values():
            replica.stop()

    assert {records[f"b{i}"]["status"] for i in range(3)} == {"completed"}
    assert {records[f"a{i}"]["status"] for i in range(3)} == {"compensated"}  # the in-flight charge was undone
    senders = {key: {replica for replica, _ in calls} for key, calls in participant.calls.items()}
    assert all(len(who) == 1 for who in senders.values()), senders  # no call was sent by both replicas
    for i in range(3):
        assert senders[f"a{i}:reserve:action"] == senders[f"a{i}:charge:action"] == {"a"}
        assert senders[f"a{i}:charge:compensation"] == senders[f"a{i}:reserve:compensation"] == {"b"}
        assert senders[f"b{i}:charge:action"] == {"b"}
        # taken over only once a's lease could have run out, not at once
        assert participant.calls[f"a{i}:charge:compensation"][0][1] - killed_at > 1.0

async def test_a_database_that_accepts_but_never_answers_fails_the_start_naming_the_store() -> None:
    silent: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)  # holds the connection open and says nothing

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"postgresql://app:s3cret@127.0.0.1:{port}/test"
    service = SagaService(url, RecordingInvoker("a", []), dict)
    assert isinstance(service.store, PostgresSagaStore)
    service.store.connect_timeout = 0.3
    try:
        with pytest.raises(StoreOpenFailed) as failed:
            await asyncio.wait_for(service.start(), 5)
    finally:
        server.close()
        for writer in silent:
            writer.close()
    assert str(failed.value) == (
        f"FENDER_SAGA_STORE postgresql://app:<redacted>@127.0.0.1:{port}/test:"
        " cannot open the saga journal: the database did not answer within 0.3s"
    )


def test_fender_run_with_a_missing_database_prints_one_line_naming_the_store(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    require_service("postgresql", "127.0.0.1", 5432)
    target = urlsplit(DSN)
    url = urlunsplit(target._replace(netloc=f"postgres:s3cret@{target.hostname}:{target.port}", path="/nosuchdb_x"))
    config = tmp_path / "fender.yaml"
    config.write_text(CONFIG.format(up="http://127.0.0.1:9"))
    for name, value in (("SAGA_STORE", url), ("PROXY_ADDR", "127.0.0.1:0"), ("ADMIN_ADDR", "127.0.0.1:0"),
                        ("METRICS_ADDR", "127.0.0.1:0"), ("DATA_DIR", str(tmp_path))):
        monkeypatch.setenv(f"FENDER_{name}", value)
    assert main(["run", "--config", str(config)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("{")]  # (JSON logs)
    assert err == [
        f"fender: cannot start: FENDER_SAGA_STORE postgresql://postgres:<redacted>@{target.hostname}:{target.port}"
        '/nosuchdb_x: cannot open the saga journal: database "nosuchdb_x" does not exist'
    ]


async def test_the_heartbeat_is_reported_working_again_only_once_the_database_answers(
    schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    store = PostgresSagaStore(DSN, schema=schema, lease=1.0, clock=clock)
    lost = asyncio.Event()
    store.on_lease_lost = lambda saga_id: lost.set()
    await store.open()
    pool = store._pool

    class Down:  # the database is unreachable
        def __getattr__(self, name: str) -> Any:
            raise OSError("connection refused")

    async def rounds(count: int) -> None:  # heartbeat rounds, each ending in a (fake) sleep
        until = len(clock.sleeps) + count
        while len(clock.sleeps) < until:
            await asyncio.sleep(0.001)

    try:
        assert await store.create(a_saga("s1")) is None
        store._pool = Down()
        await asyncio.wait_for(lost.wait(), 5)  # the lease ran out locally: nothing is held now
        await rounds(5)
        assert "works again" not in caplog.text  # nothing to renew is no sign that the database is back
        store._pool = pool
        await rounds(2)
        assert caplog.text.count("saga lease heartbeat works again") == 1
    finally:
        store._pool = pool
        await store.close()
