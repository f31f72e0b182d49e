"""The shared saga journal: PostgreSQL through asyncpg, for several Fender replicas.

    FENDER_SAGA_STORE=postgresql://user@db:5432/app?schema=fender&lease=15s

Ownership. Every unfinished saga row names the replica that drives it (`owner`),
until when (`lease_expires_at`, in the database's clock) and a fencing token
(`fence`) that goes up by one at every takeover. A replica:

- owns what it creates, and renews its leases every `lease / 5` (heartbeat);
- takes over, in a periodic scan, sagas whose lease expired (their replica
  crashed or lost the database), bumping the fence;
- writes only `WHERE owner = me AND fence = <the fence I took>`, in the same
  statement as the write, so once another replica took a saga over, every write
  of the old owner fails with `StoreRefused` and its coordinator stops driving
  that saga. Since the coordinator journals its intent before each call, a
  replica that lost a saga cannot send another call for it;
- trusts a write only if its answer came back while the lease was still valid
  on its own clock (`0.75 * lease` from when the write was sent): a write that
  committed in time but whose answer was held up (a slow network, a full pool)
  may be followed by a takeover, so it fails with `StoreRefused` too, and every
  write, and every renewal (connection included), gives up at that point;
- stops driving a saga on its own once its lease may have run out without a
  successful renewal (after `0.75 * lease` on its own clock, measured from when
  the last renewal was sent), which is before the database lets anyone else take
  it over: so no saga is driven by two replicas at once, even while one of them
  cannot reach the database;
- releases its leases on a clean stop, so others take over at once.

A saga in a terminal status has no owner; `retry` of a failed saga claims it again.

Listing order. Pages are cursored by `seq`, which a sequence hands out at INSERT
while the row shows only at COMMIT, so a create can commit after one with a higher
seq; a reader that had moved its cursor past the lower seq would never list it.
Each create holds a shared advisory lock (per schema) from before it takes its seq
until it commits, and a page takes the same lock exclusively before it reads: so
every seq handed out before the read is committed (or rolled back) when the read
sees the table, and every seq handed out after is higher than any it returns.
Creates still run side by side and commit together; only a listing waits, for
the creates in flight. (An exclusive lock on create would be simpler still, but
would serialise every create of every replica on its commit.) SQLite needs none of
this: one connection writes, and the seq is taken inside its serial transaction.

Schema: tables `fender_sagas`, `fender_saga_steps` and `fender_schema_version` in
`schema` (default `public`), created or migrated on open under an advisory lock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from config.units import parse_duration
from policies.clock import SYSTEM_CLOCK, Clock
from saga.model import TERMINAL, Saga
from saga.sqlite_store import _decode_cursor, _encode_cursor
from saga.store import Page, SagaGone, StoreRefused

__all__ = ["PostgresSagaStore", "DEFAULT_LEASE", "SCHEMA_VERSION"]

log = logging.getLogger("fender.saga")

DEFAULT_LEASE = 15.0
LOCAL_VALIDITY = 0.75  # share of the lease this replica trusts its last renewal for
TAKEOVER_BATCH = 100
CONNECT_TIMEOUT = 10.0  # opening the store: a server that accepts but never answers
_TERMINAL = sorted(TERMINAL)
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# Each entry migrates from version i to i + 1; append, never edit.
_MIGRATIONS = (
    """
    CREATE TABLE {s}.fender_sagas (
        seq              bigserial PRIMARY KEY,
        id               text NOT NULL UNIQUE,
        status           text NOT NULL,
        def_hash         text NOT NULL,
        definition       text NOT NULL,
        header           text NOT NULL,
        owner            text,
        fence            bigint NOT NULL DEFAULT 0,
        lease_expires_at timestamptz
    );
    CREATE INDEX fender_sagas_by_status ON {s}.fender_sagas (status, seq);
    CREATE INDEX fender_sagas_unfinished ON {s}.fender_sagas (lease_expires_at)
        WHERE status NOT IN ('completed', 'compensated', 'failed');
    CREATE TABLE {s}.fender_saga_steps (
        saga_id text NOT NULL REFERENCES {s}.fender_sagas (id) ON DELETE CASCADE,
        idx     integer NOT NULL,
        state   text NOT NULL,
        PRIMARY KEY (saga_id, idx)
    );
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


async def _keep_trying(action: Callable[[], Awaitable[Any]], what: str, failing: bool) -> bool:
    """One round of a loop that keeps trying `action`; returns whether it failed this time.

    It logs one line when an outage starts and one when it ends, not one per round.
    """
    try:
        await action()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if not failing:
            log.warning("%s failed (will keep trying): %r", what, exc)
        return True
    if failing:
        log.warning("%s works again", what)
    return False


@dataclass(slots=True)
class _Lease:
    fence: int
    valid_until: float  # on this replica's clock
    idle: bool = False  # not driven by the coordinator at the last heartbeat


class PostgresSagaStore:
    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "public",
        lease: float = DEFAULT_LEASE,
        owner: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
        max_connections: int = 10,
    ) -> None:
        if not _IDENT.match(schema):
            raise ValueError(f"schema {schema!r}: use lower-case letters, digits and _")
        if lease < 0.5:
            raise ValueError("the saga lease must be at least 0.5s")
        self.dsn = dsn
        self.schema = schema
        self.lease = lease
        self.owner = owner or f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.clock = clock
        self.max_connections = max_connections
        self.connect_timeout = CONNECT_TIMEOUT
        self.recovery_interval = lease / 2  # how often the service scans for sagas to take over
        self.on_lease_lost: Callable[[str], None] | None = None  # the coordinator stops driving it
        self.driving: Callable[[], Collection[str]] | None = None  # ids the coordinator drives
        self._held: dict[str, _Lease] = {}
        self._pool: Any = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._sagas = f"{schema}.fender_sagas"
        self._steps = f"{schema}.fender_saga_steps"
        self._create_lock = f"fender-saga-create:{schema}"

    @classmethod
    def from_url(cls, url: str) -> PostgresSagaStore:
        """Fender's query parameters `schema` and `lease` are taken out; the rest goes to asyncpg.

        Without `lease` in the URL, `FENDER_SAGA_LEASE` (a duration) or 15s.
        """
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        own = {k: v for k, v in query if k in ("schema", "lease")}
        rest = urlencode([(k, v) for k, v in query if k not in own])
        lease_text = own.get("lease") or os.environ.get("FENDER_SAGA_LEASE") or DEFAULT_LEASE
        try:
            lease = parse_duration(lease_text)
        except ValueError as exc:
            where = "lease" if own.get("lease") else "FENDER_SAGA_LEASE"
            raise ValueError(f"{where}: {exc}") from None
        return cls(urlunsplit(parts._replace(query=rest)), schema=own.get("schema", "public"), lease=lease)

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        import asyncpg

        try:
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=self.max_connections, command_timeout=max(5.0, self.lease),
                timeout=self.connect_timeout,
            )
        except TimeoutError:
            raise TimeoutError(f"the database did not answer within {self.connect_timeout:g}s") from None
        await self._migrate()
        self._heartbeat = asyncio.create_task(self._heartbeats(), name="saga-lease-heartbeat")

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None
        if self._pool is None:
            return
        held, self._held = self._held, {}
        if held:  # let another replica take over now rather than after the lease
            try:
                await self._pool.execute(
                    f"UPDATE {self._sagas} SET owner = NULL, lease_expires_at = NULL"
                    " WHERE owner = $1 AND id = ANY($2::text[])",
                    self.owner, list(held),
                )
            except Exception as exc:
                log.warning("could not release %d saga lease(s) on stop: %r", len(held), exc)
        pool, self._pool = self._pool, None
        await pool.close()

    async def _migrate(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"fender-saga-schema:{self.schema}")
            exists = await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", self.schema)
            if not exists:
                await conn.execute(f"CREATE SCHEMA {self.schema}")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.schema}.fender_schema_version (version integer NOT NULL)"
            )
            version = await conn.fetchval(f"SELECT max(version) FROM {self.schema}.fender_schema_version") or 0
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"the saga store schema is at version {version}, newer than this Fender knows ({SCHEMA_VERSION})"
                )
            for index in range(version, SCHEMA_VERSION):
                await conn.execute(_MIGRATIONS[index].format(s=self.schema))
                await conn.execute(f"INSERT INTO {self.schema}.fender_schema_version VALUES ($1)", index + 1)
                log.info("saga store schema migrated to version %d", index + 1)

    # -- leases ---------------------------------------------------------------------------

    def _within(self, sent: float) -> AbstractAsyncContextManager[object]:
        """Bounds a round trip (pool acquire and connecting included) sent at `sent` to the local validity."""
        return self.clock.timeout(max(0.01, sent + self.lease * LOCAL_VALIDITY - self.clock.now()))

    def _take(self, saga_id: str, fence: int, sent_at: float) -> None:
        self._held[saga_id] = _Lease(fence, sent_at + self.lease * LOCAL_VALIDITY)

    def _lose(self, saga_id: str, why: str) -> None:
        if self._held.pop(saga_id, None) is None:
            return
        log.warning("saga %s: %s; this replica stops driving it", saga_id, why)
        if self.on_lease_lost is not None:
            self.on_lease_lost(saga_id)

    async def _heartbeats(self) -> None:
        interval = self.lease / 5
        failing = False
        while True:
            # the database may be unreachable: then the local deadlines decide
            renew = (lambda: self.renew(probe=True)) if failing else self.renew
            failing = await _keep_trying(renew, "saga lease heartbeat", failing)
            self._expire_local()
            now = self.clock.now()
            soonest = min((lease.valid_until for lease in self._held.values()), default=now + interval)
            await self.clock.sleep(max(0.01, min(interval, soonest - now)))

    async def renew(self, *, probe: bool = False) -> None:
        """Extend every lease this replica holds and drives; drop those it no longer owns.

        With nothing to renew it does nothing, unless `probe`: then it still makes one round
        trip, so that a heartbeat that failed is reported working only once the database answers.
        """
        self._forget_idle()
        if not self._held:
            if probe:
                async with self.clock.timeout(self.lease / 5):
                    await self._pool.fetchval("SELECT 1")
            return
        ids = list(self._held)
        fences = [self._held[i].fence for i in ids]
        sent = self.clock.now()
        timeout = max(0.05, min(self.lease / 5, min(lease.valid_until for lease in self._held.values()) - sent))
        async with self.clock.timeout(timeout):  # the pool's acquire (maybe a new connection) too
            rows = await self._pool.fetch(
                f"UPDATE {self._sagas} AS g SET lease_expires_at = now() + make_interval(secs => $2)"
                " FROM unnest($3::text[], $4::bigint[]) AS h(id, fence)"
                " WHERE g.id = h.id AND g.fence = h.fence AND g.owner = $1 RETURNING g.id",
                self.owner, self.lease, ids, fences,
            )
        renewed = {row["id"] for row in rows}
        for saga_id, fence in zip(ids, fences, strict=True):
            lease = self._held.get(saga_id)
            if lease is None or lease.fence != fence:
                continue  # changed while the renewal was in flight
            if saga_id in renewed:
                lease.valid_until = sent + self.lease * LOCAL_VALIDITY
            else:
                self._lose(saga_id, "its lease was taken over or the saga is gone")

    def _expire_local(self) -> None:
        now = self.clock.now()
        for saga_id in [i for i, lease in self._held.items() if lease.valid_until <= now]:
            self._lose(saga_id, "its lease could not be renewed in time")

    def _forget_idle(self) -> None:
        """Stop renewing sagas the coordinator has not been driving for two heartbeats."""
        if self.driving is None:
            return
        driving = self.driving()
        for saga_id, lease in list(self._held.items()):
            if saga_id in driving:
                lease.idle = False
            elif lease.idle:
                del self._held[saga_id]  # its lease runs out and a scan (maybe ours) takes it over
            else:
                lease.idle = True

    # -- SagaStore ------------------------------------------------------------------------

    async def create(self, saga: Saga) -> Saga | None:
        sent = self.clock.now()
        async with self._pool.acquire() as conn, conn.transaction():
            # before the INSERT takes its seq, held until the commit (see "Listing order")
            await conn.execute("SELECT pg_advisory_xact_lock_shared(hashtext($1))", self._create_lock)
            fence = await conn.fetchval(
                f"INSERT INTO {self._sagas} (id, status, def_hash, definition, header, owner, fence, lease_expires_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, 1, now() + make_interval(secs => $7))"
                " ON CONFLICT (id) DO NOTHING RETURNING fence",
                saga.id, saga.status, saga.def_hash, _dumps(saga.definition), _dumps(saga.header_json()),
                self.owner, self.lease,
            )
            if fence is None:
                existing = None
            else:
                await conn.execute(
                    f"INSERT INTO {self._steps} (saga_id, idx, state)"
                    " SELECT $1, x.idx, x.state FROM unnest($2::int[], $3::text[]) AS x(idx, state)",
                    saga.id, list(range(len(saga.steps))), [_dumps(s.to_json()) for s in saga.steps],
                )
                existing = saga
        if existing is None:
            return await self.get(saga.id)
        self._take(saga.id, 1, sent)
        return None

    async def save(self, saga: Saga, steps: Iterable[int] = ()) -> None:
        lease = self._held.get(saga.id)
        if lease is None:
            lease = await self._claim(saga.id)
        indexes = list(steps)
        terminal = saga.status in TERMINAL
        sent = self.clock.now()
        try:
            async with self._within(sent):
                count = await self._pool.fetchval(
                    f"WITH s AS (UPDATE {self._sagas} SET status = $4, header = $5,"
                    " owner = CASE WHEN $6 THEN NULL ELSE owner END,"
                    " lease_expires_at = CASE WHEN $6 THEN NULL ELSE now() + make_interval(secs => $7) END"
                    " WHERE id = $1 AND owner = $2 AND fence = $3 RETURNING id),"
                    f" w AS (INSERT INTO {self._steps} (saga_id, idx, state)"
                    " SELECT s.id, x.idx, x.state FROM s, unnest($8::int[], $9::text[]) AS x(idx, state)"
                    " ON CONFLICT (saga_id, idx) DO UPDATE SET state = EXCLUDED.state)"
                    " SELECT count(*) FROM s",
                    saga.id, self.owner, lease.fence, saga.status, _dumps(saga.header_json()), terminal, self.lease,
                    indexes, [_dumps(saga.steps[i].to_json()) for i in indexes],
                )
        except BaseException as exc:
            # unknown whether it was written; the coordinator stops driving this saga either
            # way, so stop renewing it and let a scan take it over once the lease runs out
            self._held.pop(saga.id, None)
            if isinstance(exc, TimeoutError):
                raise StoreRefused(f"saga {saga.id!r}: the journal did not answer before its lease may have run out") from exc
            raise
        if count == 0:
            self._held.pop(saga.id, None)
            await self._refuse_gone(saga.id)
            raise StoreRefused(f"saga {saga.id!r} is driven by another replica now (fencing token {lease.fence})")
        if terminal:
            self._held.pop(saga.id, None)
            return
        if self.clock.now() >= sent + self.lease * LOCAL_VALIDITY:
            # committed, but answered so late that another replica may have taken the saga
            # over since: the call this write announces must not be sent
            self._held.pop(saga.id, None)
            raise StoreRefused(f"saga {saga.id!r}: the journal answered after its lease may have run out")
        if self._held.get(saga.id) is lease:
            lease.valid_until = sent + self.lease * LOCAL_VALIDITY

    async def _claim(self, saga_id: str) -> _Lease:
        """Own a saga nobody holds (a failed one to retry, or an expired lease)."""
        sent = self.clock.now()
        async with self._within(sent):
            fence = await self._pool.fetchval(
                f"UPDATE {self._sagas} SET owner = $1, fence = fence + 1,"
                " lease_expires_at = now() + make_interval(secs => $2)"
                " WHERE id = $3 AND (owner IS NULL OR owner = $1 OR lease_expires_at < now())"
                " AND status NOT IN ('completed', 'compensated') RETURNING fence",
                self.owner, self.lease, saga_id,
            )
        if fence is None:
            await self._refuse_gone(saga_id)
            raise StoreRefused(f"saga {saga_id!r} is driven by another replica")
        self._take(saga_id, fence, sent)
        return self._held[saga_id]

    async def _refuse_gone(self, saga_id: str) -> None:
        """On a refused write: SagaGone if the row was deleted (not another replica's lease)."""
        if await self._pool.fetchval(f"SELECT 1 FROM {self._sagas} WHERE id = $1", saga_id) is None:
            raise SagaGone(f"saga {saga_id!r} was deleted")

    _COLUMNS = "seq, id, status, def_hash, definition, header"

    async def _load(self, conn: Any, rows: list[Any]) -> list[Saga]:
        if not rows:
            return []
        ids = [row["id"] for row in rows]
        steps: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
        for row in await conn.fetch(
            f"SELECT saga_id, state FROM {self._steps} WHERE saga_id = ANY($1::text[]) ORDER BY saga_id, idx", ids
        ):
            steps[row["saga_id"]].append(json.loads(row["state"]))
        return [
            Saga.from_journal(
                row["id"], row["status"], row["def_hash"], json.loads(row["definition"]),
                json.loads(row["header"]), steps[row["id"]],
            )
            for row in rows
        ]

    async def get(self, saga_id: str) -> Saga | None:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(f"SELECT {self._COLUMNS} FROM {self._sagas} WHERE id = $1", saga_id)
            found = await self._load(conn, rows)
        return found[0] if found else None

    async def page(self, status: tuple[str, ...] | None, limit: int, cursor: str | None) -> Page:
        after = _decode_cursor(cursor) if cursor else 0
        sql = f"SELECT {self._COLUMNS} FROM {self._sagas} WHERE seq > $1"
        args: list[Any] = [after]
        if status:
            sql += " AND status = ANY($3::text[])"
        sql += " ORDER BY seq LIMIT $2"
        args.append(limit + 1)
        if status:
            args.append(list(status))
        async with self._pool.acquire() as conn:
            # waits for the creates in flight (see "Listing order"); read committed whatever the
            # server's default, so the SELECT's snapshot is taken after the lock, not at BEGIN
            async with conn.transaction(isolation="read_committed", readonly=True):
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self._create_lock)
                rows = await conn.fetch(sql, *args)
            more = len(rows) > limit
            rows = rows[:limit]
            items = await self._load(conn, rows)
        return Page(items, _encode_cursor(rows[-1]["seq"]) if more and rows else None)

    async def unfinished(self) -> list[Saga]:
        """Take over unfinished sagas nobody holds (lease expired or released) and return them.

        Sagas this replica already holds are not returned: its coordinator drives them.
        """
        sent = self.clock.now()
        # no create lock needed here, unlike `page`: every scan starts again from the lowest seq (no
        # cursor), and a saga whose create is in flight is leased to its creator anyway
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"UPDATE {self._sagas} AS g SET owner = $1, fence = g.fence + 1,"
                " lease_expires_at = now() + make_interval(secs => $2)"
                f" FROM (SELECT seq FROM {self._sagas}"
                "   WHERE status <> ALL($3::text[]) AND (owner IS NULL OR lease_expires_at < now())"
                "   ORDER BY seq LIMIT $4 FOR UPDATE SKIP LOCKED) AS c"
                f" WHERE g.seq = c.seq RETURNING g.{', g.'.join(self._COLUMNS.split(', '))}, g.fence",
                self.owner, self.lease, _TERMINAL, TAKEOVER_BATCH,
            )
            rows = sorted(rows, key=lambda row: row["seq"])
            for row in rows:
                self._take(row["id"], row["fence"], sent)
            sagas = await self._load(conn, rows)
        if sagas:
            log.info("took over %d saga(s) whose lease had expired or was released", len(sagas))
        return sagas

    async def delete(self, saga_id: str) -> Literal["deleted", "not_found", "not_terminal"]:
        async with self._pool.acquire() as conn, conn.transaction():
            status = await conn.fetchval(f"SELECT status FROM {self._sagas} WHERE id = $1 FOR UPDATE", saga_id)
            if status is None:
                return "not_found"
            if status not in TERMINAL:
                return "not_terminal"
            await conn.execute(f"DELETE FROM {self._sagas} WHERE id = $1", saga_id)
            return "deleted"

    # -- the service's takeover loop --------------------------------------------------------

    async def run_takeover(self, coordinator: Any) -> None:
        """Every `recovery_interval`: take over expired sagas and have the coordinator drive them."""
        self.on_lease_lost = coordinator.abandon
        self.driving = lambda: coordinator.running().keys()
        failing = False
        while True:
            await self.clock.sleep(self.recovery_interval)
            failing = await _keep_trying(coordinator.recover, "saga takeover scan", failing)
