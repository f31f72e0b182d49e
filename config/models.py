"""The config file's schema (SPEC section 4): frozen pydantic models, unknown keys are errors."""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Annotated, Any
from urllib.parse import unquote, urlsplit

from pydantic import (
    Discriminator,
    Field,
    GetJsonSchemaHandler,
    Tag,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from config.policy_models import (
    Frozen,
    PolicyModel,
    check_header_fields,
    check_methods,
    or_shorthand,
)
from config.saga_models import SagaTemplateModel
from config.units import Duration

__all__ = [
    "FenderConfig",
    "RouteModel",
    "MatchModel",
    "UpstreamModel",
    "TlsModel",
    "ListenersModel",
    "DefaultsModel",
    "ChainItem",
    "NAME_PATTERN",
    "listener_addr",
]

NAME_PATTERN = r"^[a-z0-9_-]+$"
_NAME = re.compile(NAME_PATTERN)
_HOST = re.compile(r"^(\*\.)?[A-Za-z0-9_.-]+$")
_ADDR = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]*):\d{1,5}$")
# RFC 1123 labels once IDNA-encoded (and `_`, which some service names carry)
_HOST_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*\.?")
# RFC 3986: no URL holds whitespace or a control character. urlsplit drops tabs and line
# breaks wherever they are, so `exa<TAB>mple.com` would otherwise pass as another host.
_NOT_IN_URL = re.compile(r"[\x00-\x1f\x7f]|\s")

# Tags start with "~" so that the location formatter can drop them from error paths.
ChainItem = Annotated[
    Annotated[str, Tag("~ref")] | Annotated[PolicyModel, Tag("~inline")],
    Discriminator(lambda v: "~ref" if isinstance(v, str) else "~inline"),
]


def check_host(host: str, what: str) -> str:
    """`host` if it is an IP address or a host name (IDNA ones too), else ValueError naming it as `what`."""
    try:
        ipaddress.ip_address(unquote(host))  # (a URL escapes an IPv6 zone's "%" as "%25")
        return host
    except ValueError:
        pass
    try:
        name = host.encode("idna").decode("ascii")  # (refuses empty and overlong labels)
    except UnicodeError:
        name = ""
    if len(name) > 253 or _HOST_NAME.fullmatch(name) is None:
        raise ValueError(f"{what} {host!r} is not a host name or an IP address")
    return host


class TlsModel(Frozen):
    verify: bool = True
    ca_file: str | None = None
    server_name: str | None = None

    @field_validator("server_name")
    @classmethod
    def _server_name(cls, value: str | None) -> str | None:
        # the name sent in SNI and checked against the certificate: no port, no brackets
        return value if value is None else check_host(value, "server_name")


class UpstreamModel(Frozen):
    url: str
    connect_timeout: Duration = Field(2.0, gt=0)
    max_connections: int = Field(1024, ge=1)
    tls: TlsModel = TlsModel()

    @model_validator(mode="before")
    @classmethod
    def _scalar(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value

    @classmethod
    def __get_pydantic_json_schema__(cls, core: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return or_shorthand({"type": "string", "description": "the URL alone: {url: ...}"}, core, handler)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        # no error repeats the value: it may hold a password, and errors are shown by the admin API
        if _NOT_IN_URL.search(value):
            raise ValueError("an upstream URL holds no whitespace or control character")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("an upstream must be an http:// or https:// URL with a host")
        try:
            check_host(parts.hostname, "the upstream host")
        except ValueError:
            if "@" not in value:
                raise
            # an unescaped / in a credential ends the authority early: the "host" is its start
            raise ValueError("the upstream host is not a host name or an IP address") from None
        if parts.query or parts.fragment:
            raise ValueError("an upstream URL takes no query or fragment")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError("the upstream URL has an invalid port") from exc
        return value.rstrip("/")


class MatchModel(Frozen):
    host: str | None = None
    path_prefix: str = "/"
    methods: tuple[str, ...] | None = None
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host = value.lower()
        if host.count("*") > 1 or ("*" in host and not host.startswith("*.")) or not _HOST.match(host):
            raise ValueError(f"host {value!r} must be a host name or '*.suffix'")
        return host

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("path_prefix must start with '/'")
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        # a method no request can arrive with would leave the route silently never matching
        if value is None:
            return None
        methods = check_methods(value)
        for method in methods:
            if not _parser_takes(method):
                raise ValueError(
                    f"method {method!r} never reaches a route: the proxy's HTTP parser (llhttp) knows a "
                    "fixed list of methods (GET, PURGE, M-SEARCH...) and answers any other with 400"
                )
        return methods

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        # (the parser refuses requests with such names or values: the route could never match)
        return {k.lower(): v for k, v in check_header_fields(value).items()}


@functools.lru_cache(maxsize=256)  # (a config names a handful of methods)
def _parser_takes(method: str) -> bool:
    """Whether the proxy listener's request parser (aiohttp's, see proxy/server.py) takes `method`.

    The installed parser is asked, so the answer follows its version's list of methods (and
    the pure-Python parser, used without aiohttp's C extensions, takes any token)."""
    from aiohttp.http_exceptions import HttpProcessingError
    from aiohttp.http_parser import HttpRequestParser

    # a head without its blank line: no request completes, so no protocol or loop is needed
    parser = HttpRequestParser(None, None, 2**16)
    try:
        parser.feed_data(f"{method} / HTTP/1.1\r\nHost: fender\r\n".encode())
    except HttpProcessingError:
        return False
    return True


class RouteModel(Frozen):
    name: str = Field(pattern=NAME_PATTERN, max_length=63)
    match: MatchModel = MatchModel()
    upstream: UpstreamModel
    strip_prefix: bool = False
    preserve_host: bool = False
    chain: tuple[ChainItem, ...] | None = None


class DefaultsModel(Frozen):
    chain: tuple[ChainItem, ...] = ()


class ListenersModel(Frozen):
    proxy: str | None = None
    admin: str | None = None
    metrics: str | None = None

    @field_validator("proxy", "admin", "metrics")
    @classmethod
    def _addr(cls, value: str | None) -> str | None:
        return value if value is None else listener_addr(value)


def listener_addr(value: str) -> str:
    """A listener's HOST:PORT (in the config file and in FENDER_*_ADDR), or ValueError."""
    if not _ADDR.match(value) or int(value.rpartition(":")[2]) > 65535:
        raise ValueError(f"listener address {value!r} must be HOST:PORT (e.g. 127.0.0.1:15001, [::1]:15001, :15001)")
    return value


class FenderConfig(Frozen):
    version: int = 1
    listeners: ListenersModel = ListenersModel()
    defaults: DefaultsModel = DefaultsModel()
    policies: dict[str, PolicyModel] = Field(default_factory=dict)
    routes: tuple[RouteModel, ...] = ()
    sagas: dict[str, SagaTemplateModel] = Field(default_factory=dict)

    @field_validator("version")
    @classmethod
    def _version(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only config version 1 is supported")
        return value

    @field_validator("policies", "sagas")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not _NAME.match(name):
                raise ValueError(f"name {name!r} must match {NAME_PATTERN}")
        return value

    def chain_of(self, route: RouteModel) -> tuple[ChainItem, ...]:
        return route.chain if route.chain is not None else self.defaults.chain

    def route(self, name: str) -> RouteModel | None:
        return next((r for r in self.routes if r.name == name), None)
