"""Route matching: host (exact or `*.suffix`), path prefix, methods, headers. First match wins."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Generic, TypeVar

from config.models import MatchModel

__all__ = ["RouteMatcher", "Router", "normalize_host"]

T = TypeVar("T")


def normalize_host(host: str | None) -> str:
    """Lower-case host without port; IPv6 brackets kept off."""
    if not host:
        return ""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    colon = host.rfind(":")
    if colon >= 0 and host.count(":") == 1:
        host = host[:colon]
    return host.rstrip(".")


class RouteMatcher:
    """One route's match rules, compiled once per config version."""

    __slots__ = ("host", "suffix", "prefix", "methods", "headers")

    def __init__(self, match: MatchModel) -> None:
        host = match.host
        self.host: str | None = None
        self.suffix: str | None = None
        if host is not None and host.startswith("*."):
            self.suffix = host[1:]  # ".example.com"
        else:
            self.host = host
        self.prefix = match.path_prefix
        self.methods = frozenset(match.methods) if match.methods else None
        self.headers = tuple(match.headers.items())

    def matches(self, host: str, path: str, method: str, headers: Mapping[str, str]) -> bool:
        if self.host is not None and host != self.host:
            return False
        if self.suffix is not None and not (host.endswith(self.suffix) and len(host) > len(self.suffix)):
            return False
        if not _prefix_matches(path, self.prefix):
            return False
        if self.methods is not None and method not in self.methods:
            return False
        for name, value in self.headers:
            if headers.get(name) != value:
                return False
        return True


def _prefix_matches(path: str, prefix: str) -> bool:
    # "/api" matches "/api" and "/api/x" but not "/apix": segment-wise like Envoy's path_separated_prefix
    if prefix == "/" or path == prefix:
        return True
    if not path.startswith(prefix):
        return False
    return prefix.endswith("/") or path[len(prefix)] in "/?"


class Router(Generic[T]):
    """Ordered (matcher, target) pairs; `match` returns the first target that matches."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Sequence[tuple[RouteMatcher, T]]) -> None:
        self._entries = tuple(entries)

    def match(self, host: str, path: str, method: str, headers: Mapping[str, str]) -> T | None:
        for matcher, target in self._entries:
            if matcher.matches(host, path, method, headers):
                return target
        return None
