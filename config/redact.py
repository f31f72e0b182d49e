"""Secrets out of what the admin API shows (`GET /config`, `GET /routes`).

Three rules, applied to the whole document so that new config keys are covered too:
- a value under a key that names a secret (password, token, secret, api key,
  private key, credential, authorization, cookie) is replaced;
- a value that is itself credential-shaped is replaced wherever it sits: PEM
  material (`-----BEGIN ...`), `Bearer`/`Basic`/`Token` credentials, JWTs;
- a URL keeps everything but the password of its userinfo
  (`postgresql://app:***@db/x`).
Inside a `tls:` mapping every key except the known harmless ones is replaced
(a client key or its passphrase must not leak whatever it is called).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

__all__ = ["REDACTED", "redact", "redact_url", "mask_url_password", "is_secret_key", "looks_like_secret"]

REDACTED = "<redacted>"

_SECRET_KEY = re.compile(
    r"pass(word|wd|phrase)?($|[-_])|secret|token|api[-_]?key|private[-_]?key|client[-_]?key|"
    r"credential|authoriz|^auth$|[-_]auth$|^x-auth|cookie|session[-_]?id|signature",
    re.IGNORECASE,
)
_TLS_HARMLESS = frozenset({"verify", "ca_file", "server_name", "cert_file", "ca", "sni", "min_version"})
_CREDENTIAL_VALUE = re.compile(
    r"-----BEGIN [A-Z ]+-----|^\s*(bearer|basic|token|digest)\s+\S|"
    r"^eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.",
    re.IGNORECASE,
)
_URL_WITH_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@\s]*@")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_AUTHORITY_END = re.compile(r"[/?#]")
_PASSWORD_PIECES = re.compile(r"[:/?#@&=;]")
_QUERY_PAIRS = re.compile(r"[^=&#]+=[^&#]*(?:&[^=&#]+=[^&#]*)*")
_QUERY_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^?#]*\?(?:[^#]*&)?password=")


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


def looks_like_secret(value: str) -> bool:
    return bool(_CREDENTIAL_VALUE.search(value))


def _cut_short_userinfo(url: str) -> tuple[str, str, str] | None:
    """(scheme://, user, what follows the userinfo) when the URL's password holds an unescaped
    `/`, `?` or `#`: urlsplit ends the authority there, and `app:pa#ss@db` reads as host `app`,
    port `pa`. The "port" then is no number, or the URL is no web address (a database's path, the
    database name, holds no `@`); `http://host:8080/a@b` is left alone (a path's `@`), and so is
    `postgresql://db:5432/app?user=me@corp` (a query's `@`: `key=value` pairs after the `?`)."""
    scheme = _SCHEME.match(url)
    if scheme is None:
        return None
    rest = url[scheme.end():]
    head = _AUTHORITY_END.split(rest, maxsplit=1)[0]
    if "@" in head or "@" not in rest or ":" not in head or head.startswith("["):
        return None
    user, _, port = head.partition(":")
    if port.isdigit():
        if scheme.group(0).lower() in ("http://", "https://"):
            return None
        # a host, a port and a query whose value holds the @ (`?user=me@corp`), as the driver reads it
        query = rest[len(head):].rpartition("@")[0].partition("#")[0].partition("?")
        if query[1] and _QUERY_PAIRS.fullmatch(query[2]):
            return None
    return scheme.group(0), user, rest.rpartition("@")[2]


def _passwords(url: str) -> list[tuple[str, bool]]:
    """The passwords `url` carries (userinfo and `password=` query values), as written and decoded,
    each with whether a parser cuts it short (an unescaped / ? or #: it may quote a piece of it)."""
    found: list[tuple[str, bool]] = []
    scheme = _SCHEME.match(url)
    if scheme is not None:
        rest = url[scheme.end():]
        head = _AUTHORITY_END.split(rest, maxsplit=1)[0]
        if "@" in head:  # (asyncpg ends the userinfo at its first @: one in the password cuts it short)
            found.append((head.rpartition("@")[0].partition(":")[2], head.count("@") > 1))
        elif _cut_short_userinfo(url) is not None:
            found.append((rest.rpartition("@")[0].partition(":")[2], True))
    query = url.partition("?")[2].partition("#")[0]
    found += [(v, False) for k, v in parse_qsl(query, keep_blank_values=True) if k == "password"]
    found += [(unquote(p), cut) for p, cut in found]
    return [(p, cut) for p, cut in found if p]


def mask_url_password(text: str, url: str) -> str:
    """`text` (a message about `url`, from a client library) with the URL's password, and every
    piece of it a parser may have cut out and quoted (`invalid port 'pa'`), replaced by `***`.
    (Only a password cut short is masked in pieces: those of a whole one would mask words.)"""
    pieces = {piece for secret, cut in _passwords(url)
              for piece in ((secret, *_PASSWORD_PIECES.split(secret)) if cut else (secret,)) if piece}
    for piece in sorted(pieces, key=len, reverse=True):
        # (a one-character piece is masked where quoted only: elsewhere it would mask letters of words)
        text = text.replace(piece, "***") if len(piece) > 1 else text.replace(f"'{piece}'", "'***'")
    return text


def redact_url(url: str) -> str:
    """The URL with the password of its userinfo, and a `password=` query value, replaced;
    other URLs unchanged (libpq and redis-py both take a password from the query too)."""
    cut_short = _cut_short_userinfo(url)
    if cut_short is not None:
        scheme, user, after = cut_short
        return redact_url(f"{scheme}{user}:{REDACTED}@{after}")
    has_query_password = _QUERY_PASSWORD.search(url) is not None
    if not _URL_WITH_USERINFO.match(url) and not has_query_password:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    if has_query_password:
        query = parse_qsl(parts.query, keep_blank_values=True)
        parts = parts._replace(query=urlencode([(k, REDACTED if k == "password" else v) for k, v in query]))
    if "@" not in parts.netloc:
        return urlunsplit(parts)
    user, _, host = parts.netloc.rpartition("@")
    if parts.password is None:
        # `https://<token>@host`: a user name alone is often the secret
        return urlunsplit(parts._replace(netloc=f"{REDACTED}@{host}"))
    name = user.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{name}:{REDACTED}@{host}"))


def redact(value: Any, *, _key: str = "") -> Any:
    """A copy of a JSON-like document with secrets replaced by `<redacted>`."""
    if isinstance(value, dict):
        tls = _key.lower() == "tls"
        out: dict[Any, Any] = {}
        for key, item in value.items():
            name = str(key)
            if not isinstance(item, dict | list) and item is not None and (
                is_secret_key(name) or (tls and name.lower() not in _TLS_HARMLESS)
            ):
                out[key] = REDACTED
            else:
                out[key] = redact(item, _key=name)
        return out
    if isinstance(value, list | tuple):
        return [redact(item, _key=_key) for item in value]
    if isinstance(value, str):
        if looks_like_secret(value):
            return REDACTED
        return redact_url(value)
    return value
