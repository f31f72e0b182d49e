"""Route matching: host (exact or `*.suffix`), path prefix, methods, headers. First match wins."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Generic, TypeVar

from config.models import MatchModel

__all__ = ["RouteMatcher", "Router", "normalize_host"]

T = TypeVar("T")


_HOSTS_SEEN: dict[str, str] = {}  # Host header -> normalized: a sidecar sees few distinct hosts
_HOSTS_SEEN_MAX = 1024  # the header is the client's to choose: never more entries than this


def normalize_host(host: str | None) -> str:
    """Lower-case host without port; IPv6 brackets kept off."""
    if not host:
        return ""
    seen = _HOSTS_SEEN.get(host)
    if seen is not None:
        return seen
    normalized = _normalize(host)
    if len(_HOSTS_SEEN) < _HOSTS_SEEN_MAX:
        _HOSTS_SEEN[host] = normalized
    return normalized


def _normalize(host: str) -> str:
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
        return self.accepts_host(host) and self.matches_request(path, method, headers)

    def accepts_host(self, host: str) -> bool:
        if self.host is not None:
            return host == self.host
        if self.suffix is not None:
            return host.endswith(self.suffix) and len(host) > len(self.suffix)
        return True

    def matches_request(self, path: str, method: str, headers: Mapping[str, str]) -> bool:
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
    """Ordered (matcher, target) pairs; `match` returns the first target that matches.

    The routes a host can match at all (same exact host, a matching `*.suffix`, or no host
    rule) are worked out once per host and kept, in config order: a request is then checked
    against those alone, not against every route of the config.
    """

    __slots__ = ("_entries", "_by_host")

    def __init__(self, entries: Sequence[tuple[RouteMatcher, T]]) -> None:
        self._entries = tuple(entries)
        self._by_host: dict[str, tuple[tuple[RouteMatcher, T], ...]] = {}

    def match(self, host: str, path: str, method: str, headers: Mapping[str, str]) -> T | None:
        entries = self._by_host.get(host)
        if entries is None:
            entries = tuple(e for e in self._entries if e[0].accepts_host(host))
            if len(self._by_host) < _HOSTS_SEEN_MAX:  # hosts are the client's to choose
                self._by_host[host] = entries
        for matcher, target in entries:
            if matcher.matches_request(path, method, headers):
                return target
        return None
