"""Process settings (SPEC section 3): CLI flag > FENDER_* environment > config `listeners:` > default."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from config.models import ListenersModel, listener_addr
from config.units import Duration
from policies.redis_bucket import url_problem
from saga.store import unsupported

__all__ = ["Settings", "split_addr"]


_LEVEL_ALIASES = {"warn": "warning", "fatal": "critical"}  # (both names Python's logging knows too)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FENDER_", extra="ignore", frozen=True)

    config: str = "config/fender.yaml"
    proxy_addr: str | None = None
    admin_addr: str | None = None
    metrics_addr: str | None = None
    admin_token: str | None = Field(None, repr=False)
    data_dir: str = ".fender"
    saga_store: str | None = None
    redis_url: str | None = Field(None, repr=False)
    drain_timeout: Duration = 10.0
    log_level: str = "info"
    access_log: bool = True
    workers: int = Field(1, ge=1)

    @field_validator("proxy_addr", "admin_addr", "metrics_addr")
    @classmethod
    def _addr(cls, value: str | None) -> str | None:
        return listener_addr(value) if value else value  # ("": no listener, as on the extra workers)

    @field_validator("saga_store", "redis_url")
    @classmethod
    def _store(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A URL its store would refuse at start: said here, in one line (never with its password)."""
        check = unsupported if info.field_name == "saga_store" else url_problem
        problem = check(value) if value else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.strip().lower()
        level = _LEVEL_ALIASES.get(level, level)
        if level not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError("log level is one of debug, info, warning, error, critical")
        return level

    def listeners(self, file: ListenersModel) -> tuple[str, str, str]:
        """Effective proxy, admin and metrics addresses."""
        return (
            self.proxy_addr or file.proxy or "127.0.0.1:15001",
            self.admin_addr or file.admin or "127.0.0.1:15000",
            self.metrics_addr or file.metrics or "0.0.0.0:15090",
        )

    @property
    def saga_store_url(self) -> str:
        return self.saga_store or f"sqlite:///{self.data_dir}/sagas.db"

    @classmethod
    def from_cli(cls, **overrides: Any) -> Settings:
        """Environment and defaults, with CLI flags (those not None) on top."""
        return cls(**{k: v for k, v in overrides.items() if v is not None})


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)
