"""The default saga journal: one SQLite file, WAL, written from one dedicated thread.

Durability: `journal_mode=WAL` with `synchronous=FULL` fsyncs the WAL at every
commit, so a write the coordinator awaited survives kill -9 and power loss.
(`?synchronous=normal` keeps kill -9 safety but may lose the last commits on
power loss; that is survivable because every call carries a deterministic
Idempotency-Key, but it is not the default.)

Group commit: writes queued while a commit is in progress go into the next
transaction together, so concurrent sagas share fsyncs instead of queueing on them.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs

from saga.model import TERMINAL, Saga
from saga.store import Page, SagaGone

__all__ = ["SqliteSagaStore"]

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sagas (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    status     TEXT NOT NULL,
    def_hash   TEXT NOT NULL,
    definition TEXT NOT NULL,
    header     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sagas_by_status ON sagas (status, seq);
CREATE TABLE IF NOT EXISTS saga_steps (
    saga_id TEXT NOT NULL,
    idx     INTEGER NOT NULL,
    state   TEXT NOT NULL,
    PRIMARY KEY (saga_id, idx)
) WITHOUT ROWID;
"""
_TERMINAL = tuple(sorted(TERMINAL))


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")


_MAX_SEQ = 2**63  # both SQLite INTEGER and PostgreSQL bigint are signed 64-bit


def _decode_cursor(cursor: str) -> int:
    """The seq a cursor names; ValueError unless it is exactly what `_encode_cursor` makes.

    Re-encoding and comparing refuses every other spelling (signs, spaces, leading
    zeros, non-ASCII digits, stray padding), and the range check keeps a forged seq
    from reaching the database as an integer it cannot hold.
    """
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        digits = text[1:]
        if not text.startswith("s") or not (digits.isascii() and digits.isdigit()):
            raise ValueError
        seq = int(digits)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("not a cursor this server returned") from None
    if not 0 <= seq < _MAX_SEQ or _encode_cursor(seq) != cursor:
        raise ValueError("not a cursor this server returned")
    return seq


class SqliteSagaStore:
    def __init__(self, path: str, synchronous: str = "FULL") -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError("synchronous must be full, normal or extra")
        self.path = path
        self.synchronous = synchronous.upper()
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._queue: list[tuple[Op, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    def from_url(cls, url: str) -> SqliteSagaStore:
        rest = url.removeprefix("sqlite:").removeprefix("//")
        path, _, query = rest.partition("?")
        if path.startswith("/"):
            path = path[1:]  # sqlite:///rel/path and sqlite:////abs/path, as SQLAlchemy spells them
        if not path:
            raise ValueError(f"saga store URL {url!r} names no file")
        options = {k: v[-1] for k, v in parse_qs(query).items()}
        return cls(path, options.get("synchronous", "FULL"))

    # -- the one database thread -------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(_SCHEMA)
        return conn

    async def _run(self, fn: Callable[[], T]) -> T:
        assert self._executor is not None, "store is not open"
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _commit_batch(self, batch: list[Op]) -> list[tuple[bool, Any]]:
        conn = self._conn
        assert conn is not None
        results: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in batch:
                conn.execute("SAVEPOINT op")
                try:
                    results.append((True, op(conn)))
                    conn.execute("RELEASE op")
                except sqlite3.Error as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((False, exc))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    async def _write(self, op: Op) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((op, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        # the flusher resolves the future; shielding keeps one cancelled caller from losing others' writes
        return await asyncio.shield(future)

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            ops = [op for op, _ in batch]
            try:
                results = await self._run(functools.partial(self._commit_batch, ops))
            except Exception as exc:  # the commit itself failed: every write of the batch did
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), (ok, value) in zip(batch, results, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    # -- SagaStore -----------------------------------------------------------------------

    async def open(self) -> None:
        if self._conn is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saga-journal")
        self._conn = await self._run(self._connect)

    async def close(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            await asyncio.wait([self._flusher])
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._run(conn.close)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def create(self, saga: Saga) -> Saga | None:
        steps = [(saga.id, i, _dumps(s.to_json())) for i, s in enumerate(saga.steps)]
        row = (saga.id, saga.status, saga.def_hash, _dumps(saga.definition), _dumps(saga.header_json()))

        def insert(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT INTO sagas (id, status, def_hash, definition, header) VALUES (?,?,?,?,?)"
                " ON CONFLICT (id) DO NOTHING",
                row,
            )
            if cur.rowcount == 0:
                return False
            conn.executemany("INSERT OR REPLACE INTO saga_steps (saga_id, idx, state) VALUES (?,?,?)", steps)
            return True

        if await self._write(insert):
            return None
        return await self.get(saga.id)

    async def save(self, saga: Saga, steps: Iterable[int] = ()) -> None:
        header = (saga.status, _dumps(saga.header_json()), saga.id)
        rows = [(saga.id, i, _dumps(saga.steps[i].to_json())) for i in steps]

        def update(conn: sqlite3.Connection) -> bool:
            if conn.execute("UPDATE sagas SET status = ?, header = ? WHERE id = ?", header).rowcount == 0:
                return False  # deleted: writing its steps would leave orphan rows
            if rows:
                conn.executemany("INSERT OR REPLACE INTO saga_steps (saga_id, idx, state) VALUES (?,?,?)", rows)
            return True

        if not await self._write(update):
            raise SagaGone(f"saga {saga.id!r} was deleted")

    def _load(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[Saga]:
        out = []
        for _, saga_id, status, def_hash, definition, header in rows:
            steps = conn.execute(
                "SELECT state FROM saga_steps WHERE saga_id = ? ORDER BY idx", (saga_id,)
            ).fetchall()
            out.append(
                Saga.from_journal(
                    saga_id, status, def_hash, json.loads(definition), json.loads(header),
                    [json.loads(s) for (s,) in steps],
                )
            )
        return out

    _COLUMNS = "seq, id, status, def_hash, definition, header"

    async def get(self, saga_id: str) -> Saga | None:
        def read() -> list[Saga]:
            assert self._conn is not None
            rows = self._conn.execute(f"SELECT {self._COLUMNS} FROM sagas WHERE id = ?", (saga_id,)).fetchall()
            return self._load(self._conn, rows)

        found = await self._run(read)
        return found[0] if found else None

    async def page(self, status: tuple[str, ...] | None, limit: int, cursor: str | None) -> Page:
        after = _decode_cursor(cursor) if cursor else 0
        sql = f"SELECT {self._COLUMNS} FROM sagas WHERE seq > ?"
        args: list[Any] = [after]
        if status:
            sql += f" AND status IN ({','.join('?' * len(status))})"
            args.extend(status)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit + 1)

        def read() -> tuple[list[Saga], int | None]:
            assert self._conn is not None
            rows = self._conn.execute(sql, args).fetchall()
            more = len(rows) > limit
            rows = rows[:limit]
            return self._load(self._conn, rows), (rows[-1][0] if more and rows else None)

        items, last = await self._run(read)
        return Page(items, _encode_cursor(last) if last is not None else None)

    async def unfinished(self) -> list[Saga]:
        def read() -> list[Saga]:
            assert self._conn is not None
            rows = self._conn.execute(
                f"SELECT {self._COLUMNS} FROM sagas WHERE status NOT IN (?,?,?) ORDER BY seq", _TERMINAL
            ).fetchall()
            return self._load(self._conn, rows)

        return await self._run(read)

    async def delete(self, saga_id: str) -> Literal["deleted", "not_found", "not_terminal"]:
        def remove(conn: sqlite3.Connection) -> Literal["deleted", "not_found", "not_terminal"]:
            row = conn.execute("SELECT status FROM sagas WHERE id = ?", (saga_id,)).fetchone()
            if row is None:
                return "not_found"
            if row[0] not in TERMINAL:
                return "not_terminal"
            conn.execute("DELETE FROM saga_steps WHERE saga_id = ?", (saga_id,))
            conn.execute("DELETE FROM sagas WHERE id = ?", (saga_id,))
            return "deleted"

        result: Literal["deleted", "not_found", "not_terminal"] = await self._write(remove)
        return result
