"""Reading a config file: YAML, schema, cross-references; every error located."""

from __future__ import annotations

import hashlib
import json
import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from stat import S_ISREG
from typing import Any

import yaml
from pydantic import ValidationError

from config.models import FenderConfig

__all__ = ["YamlLoader", "validation_issues", "ConfigIssue", "ConfigInvalid", "LoadedConfig", "load_file", "load_text", "format_loc"]


class YamlLoader(yaml.SafeLoader):
    """Plain scalars read as YAML 1.2 (its core schema) reads them, not as PyYAML's 1.1 does.

    Booleans are only true/false: 1.1 reads `on:` (a retry key) as True. No implicit
    dates: a body's `since: 2024-01-01` stays JSON. Numbers: 1.1 reads `10:30` as 630
    (base 60), `017` as 15 (octal) and `1_000` as 1000; here they are 10:30 (a string),
    17 and a string, and `0o17`, `0x1f` and `1e3` are numbers, as in JSON and 1.2.
    """

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        value = str(self.construct_scalar(node))
        try:
            if value.startswith(("0o", "0x")):
                return int(value[2:], 8 if value[1] == "o" else 16)
            return int(value, 10)  # (leading zeros: still base ten)
        except ValueError:  # an explicit `!!int` on what is not one
            raise yaml.constructor.ConstructorError(
                None, None, f"{value!r} is not an integer", node.start_mark) from None


_YAML_1_1_ONLY = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:int",
                  "tag:yaml.org,2002:float")
YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _YAML_1_1_ONLY]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"),
)
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)
YamlLoader.add_constructor("tag:yaml.org,2002:int", YamlLoader.construct_yaml_int)


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    loc: str
    msg: str

    def __str__(self) -> str:
        return f"{self.loc}: {self.msg}" if self.loc else self.msg

    def as_dict(self) -> dict[str, str]:
        return {"loc": self.loc, "msg": self.msg}


class ConfigInvalid(Exception):
    def __init__(self, errors: list[ConfigIssue], source: str = "") -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors
        self.source = source


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    config: FenderConfig
    hash: str  # sha256 of the file's bytes, first 16 hex digits
    source: str
    raw: dict[str, Any]


_PLAIN_KEY = re.compile(r"^[~\w.:/*\[\]-]+$")


def format_loc(parts: Iterable[int | str]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _PLAIN_KEY.match(part):
            out += f"[{json.dumps(part, ensure_ascii=False)}]"  # empty, spaced or control-character keys, one line
        elif part.startswith("~") or part.startswith("function-"):
            continue  # union tags and validator names are not locations a user can see
        else:
            out += f".{part}" if out else part
    return out


def load_file(path: str | Path) -> LoadedConfig:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigInvalid([ConfigIssue(str(path), f"cannot read: {exc.strerror or exc}")], str(path)) from exc
    return load_text(data, source=str(path))


def load_text(data: bytes | str, source: str = "<string>") -> LoadedConfig:
    raw_bytes = data.encode() if isinstance(data, str) else data
    try:
        raw = yaml.load(raw_bytes, Loader=YamlLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigInvalid([_yaml_issue(exc)], source) from exc
    except RecursionError as exc:  # (PyYAML builds nested collections recursively)
        raise ConfigInvalid([ConfigIssue(source, "the YAML nests too deeply to be a config")], source) from exc
    if raw is None:
        # most often a file caught half-written by a reload; an explicit `routes: []` is fine
        # (a problem of the whole document is located by the document's name)
        raise ConfigInvalid([ConfigIssue(source, "the config is empty (write `routes: []` to route nothing)")], source)
    if not isinstance(raw, dict):
        raise ConfigInvalid([ConfigIssue(source, "the config must be a YAML mapping")], source)
    try:
        config = FenderConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigInvalid(validation_issues(exc), source) from exc
    problems = list(cross_check(config))
    if problems:
        raise ConfigInvalid(problems, source)
    digest = hashlib.sha256(raw_bytes).hexdigest()[:16]
    return LoadedConfig(config=config, hash=digest, source=source, raw=raw)


def _yaml_issue(exc: yaml.YAMLError) -> ConfigIssue:
    """One located line, whatever kind of YAML error (PyYAML's messages span lines)."""
    if isinstance(exc, yaml.reader.ReaderError):
        return ConfigIssue(f"byte {exc.position}", f"invalid YAML: {exc.reason} (character {exc.character!r})")
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    loc = f"line {mark.line + 1} column {mark.column + 1}" if mark is not None else "yaml"
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    return ConfigIssue(loc, f"invalid YAML: {problem}")


def validation_issues(exc: ValidationError) -> list[ConfigIssue]:
    """Pydantic's errors as located, readable issues (also used for saga definitions)."""
    issues = []
    for err in exc.errors(include_url=False):
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        issues.append(ConfigIssue(format_loc(err["loc"]), msg))
    return issues


@lru_cache(maxsize=64)
def _ca_file_problem(ca_file: str, version: tuple[int, int, int]) -> str | None:
    """Why the upstream's TLS context cannot load `ca_file`, or None: parsed as it will be, so
    fender check refuses what fender run would. Once per version of the file (inode, size,
    mtime), not per route and reload: a bundle takes tens of milliseconds, on the event loop."""
    try:
        ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        return str(exc)
    return None


def cross_check(config: FenderConfig) -> Iterable[ConfigIssue]:
    """What the schema alone cannot see: names that must exist or be unique."""
    seen: dict[str, int] = {}
    for i, route in enumerate(config.routes):
        if route.name in seen:
            yield ConfigIssue(f"routes[{i}].name", f"duplicate route name {route.name!r} (first at routes[{seen[route.name]}])")
        else:
            seen[route.name] = i
    for i, route in enumerate(config.routes):
        ca_file = route.upstream.tls.ca_file
        if ca_file is None:
            continue
        try:
            stat = Path(ca_file).stat()
        except OSError:
            stat = None
        if stat is None or not S_ISREG(stat.st_mode):
            yield ConfigIssue(f"routes[{i}].upstream.tls.ca_file", f"no such file: {ca_file}")
            continue
        problem = _ca_file_problem(ca_file, (stat.st_ino, stat.st_size, stat.st_mtime_ns))
        if problem is not None:
            yield ConfigIssue(f"routes[{i}].upstream.tls.ca_file", f"{ca_file} holds no CA certificate it can use: {problem}")
    for j, item in enumerate(config.defaults.chain):
        if isinstance(item, str) and item not in config.policies:
            yield ConfigIssue(f"defaults.chain[{j}]", f"unknown policy {item!r}")
    for i, route in enumerate(config.routes):
        for j, item in enumerate(route.chain or ()):
            if isinstance(item, str) and item not in config.policies:
                yield ConfigIssue(f"routes[{i}].chain[{j}]", f"unknown policy {item!r}")
    for name, template in config.sagas.items():
        for loc, msg in template.issues(route_exists=seen.__contains__):
            yield ConfigIssue(f"sagas.{name}.{loc}", msg)
