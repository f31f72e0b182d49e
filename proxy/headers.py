"""Header hygiene for a proxy hop (RFC 9110 section 7.6.1)."""

from __future__ import annotations

from collections.abc import Mapping

from multidict import CIMultiDict, CIMultiDictProxy, istr

__all__ = ["HOP_BY_HOP", "content_length", "forward_headers", "strip_hop_by_hop"]

HOP_BY_HOP = tuple(
    istr(h)
    for h in (
        "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
    )
)

# end-to-end fields a `Connection` option may not remove (RFC 9110 section 7.6.1: a sender
# must not name a field meant for all recipients): without Host an HTTP/1.1 request is
# invalid, and Content-Length is what frames a streamed request body upstream
_NEVER_HOP = frozenset(("host", "content-length"))


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    tokens: set[str] = set()
    for value in headers.getall("connection", ()):
        for token in value.split(","):
            token = token.strip().lower()
            if token and token not in _NEVER_HOP:
                tokens.add(token)
    return frozenset(tokens)


def strip_hop_by_hop(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """A copy without hop-by-hop headers and those named in `Connection` (but Host and Content-Length)."""
    out: CIMultiDict[str] = CIMultiDict(headers)  # one C-level copy; then drop the few hop headers
    if "connection" in out:
        for token in _connection_tokens(out):
            out.popall(token, None)
    for name in HOP_BY_HOP:
        if name in out:
            del out[name]
    return out


def forward_headers(
    headers: CIMultiDictProxy[str],
    *,
    drop_host: bool,
) -> CIMultiDict[str]:
    out = strip_hop_by_hop(headers)
    if drop_host:
        out.popall("host", None)
    return out


def content_length(headers: Mapping[str, str]) -> int | None:
    """The `Content-Length` as a number; None when absent or not plain digits."""
    value = headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None
