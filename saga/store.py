"""Where sagas are journaled. One small interface; the backend is chosen by URL.

Every mutating call names the saga it writes (`create`, `save`, `delete` all take
the `Saga` or its id), so a shared backend can later refuse a write from a
replica that no longer holds the saga's lease (fencing) by raising `StoreRefused`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

from saga.model import Saga

__all__ = ["SagaStore", "Page", "StoreRefused", "SagaGone", "StoreOpenFailed", "open_store", "unsupported"]


class StoreRefused(Exception):
    """The store would not take a write (e.g. this replica lost the saga's lease)."""


class SagaGone(StoreRefused):
    """The saga was deleted: a write for it is refused, and nothing of it is written."""


class StoreOpenFailed(Exception):
    """The journal could not be opened at start; the message names FENDER_SAGA_STORE (`fender run` prints it)."""


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Saga]
    next_cursor: str | None


class SagaStore(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def create(self, saga: Saga) -> Saga | None:
        """Insert a new saga with all its steps; if the id exists, return the stored one instead."""

    async def save(self, saga: Saga, steps: Iterable[int] = ()) -> None:
        """Durably write the saga's status and header, and the state of the steps listed.

        Returns only once the write is committed: the coordinator calls it before
        each call (intent) and after it (outcome). Raises `SagaGone`, writing
        nothing, when the saga's row no longer exists.
        """

    async def get(self, saga_id: str) -> Saga | None: ...

    async def page(self, status: tuple[str, ...] | None, limit: int, cursor: str | None) -> Page:
        """Oldest first; `cursor` is what a previous page returned. ValueError on a bad cursor."""

    async def unfinished(self) -> list[Saga]:
        """Every saga not in a terminal status, oldest first (for recovery)."""

    async def delete(self, saga_id: str) -> Literal["deleted", "not_found", "not_terminal"]: ...


SCHEMES = ("sqlite:", "postgresql:", "postgres:")  # what open_store opens


def unsupported(url: str) -> str | None:
    """Why `open_store` cannot open `url`, or None (checked early by config.settings).

    Checks the scheme and Fender's own query parameters; whether the database is
    there is only known when the store opens. Never quotes the URL (it may hold a password).
    """
    if not url.startswith(SCHEMES):
        scheme = url.split(":", 1)[0]
        return f"unsupported scheme {scheme!r} for the saga store: use sqlite:///path or postgresql://"
    try:
        open_store(url)
    except ValueError as exc:
        return str(exc)
    return None


def open_store(url: str) -> SagaStore:
    """`sqlite:///path/to/sagas.db` (`?synchronous=normal` to trade power-loss durability for speed),
    or `postgresql://user@host/db?schema=fender&lease=15s` (see `saga.postgres_store`)."""
    if url.startswith("sqlite:"):
        from saga.sqlite_store import SqliteSagaStore

        return SqliteSagaStore.from_url(url)
    if url.startswith(("postgresql:", "postgres:")):
        from saga.postgres_store import PostgresSagaStore  # shared by replicas: leases + fencing

        return PostgresSagaStore.from_url(url)
    raise ValueError(unsupported(url))
