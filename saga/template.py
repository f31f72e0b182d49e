"""Placeholders in saga calls: `{{input.x}}`, `{{saga.id}}`, `{{steps.<name>.response...}}`.

A placeholder is a data path, nothing more: no expressions, filters or code, so
a saga definition posted over HTTP can never run anything. Rendering is a pure
function of the value and a scope dict; an unresolved path raises TemplateError.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import quote

__all__ = [
    "TemplateError",
    "parse_path",
    "placeholders",
    "strings_in",
    "references",
    "render_text",
    "render_value",
    "quote_path_value",
]

_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_SEGMENT = re.compile(r"^[A-Za-z0-9_~-]+$")
_RESPONSE_PARTS = ("status", "headers", "body")


class TemplateError(Exception):
    """A placeholder that could not be resolved (kind `template_error`)."""

    kind = "template_error"


def parse_path(text: str) -> tuple[str, ...]:
    """Split and check one placeholder's path; ValueError says what is wrong."""
    parts = tuple(text.split("."))
    if not text or any(not _SEGMENT.match(p) for p in parts):
        raise ValueError(f"malformed placeholder '{{{{{text}}}}}': use dotted names such as input.sku")
    root = parts[0]
    if root == "input":
        return parts
    if root == "saga":
        if parts[1:] != ("id",):
            raise ValueError(f"unknown placeholder '{{{{{text}}}}}': the saga offers only saga.id")
        return parts
    if root == "steps":
        if len(parts) < 4 or parts[2] != "response" or parts[3] not in _RESPONSE_PARTS:
            raise ValueError(
                f"malformed placeholder '{{{{{text}}}}}': use steps.<name>.response.status, "
                ".response.headers.<name> or .response.body[.<path>]"
            )
        if parts[3] == "status" and len(parts) != 4:
            raise ValueError(f"malformed placeholder '{{{{{text}}}}}': status has no fields")
        if parts[3] == "headers" and len(parts) != 5:
            raise ValueError(f"malformed placeholder '{{{{{text}}}}}': name one header")
        return parts
    raise ValueError(f"unknown placeholder '{{{{{text}}}}}': paths start with input, saga or steps")


def placeholders(text: str) -> list[tuple[str, ...]]:
    """The paths of every placeholder in `text`; ValueError on a malformed one."""
    found = [parse_path(m.group(1)) for m in _PLACEHOLDER.finditer(text)]
    rest = _PLACEHOLDER.sub("", text)
    if "{{" in rest or "}}" in rest:
        raise ValueError("malformed placeholder: unbalanced '{{' or '}}'")
    return found


def strings_in(value: Any, loc: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Every string leaf of a JSON value (mapping keys excluded), with its location."""
    if isinstance(value, str):
        yield loc, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from strings_in(item, (*loc, str(key)))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from strings_in(item, (*loc, i))


def references(value: Any) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """(location, step name) for every `steps.<name>` placeholder in a JSON value."""
    for loc, text in strings_in(value):
        try:
            paths = placeholders(text)
        except ValueError:
            continue
        for path in paths:
            if path[0] == "steps":
                yield loc, path[1]


_MISSING = object()


def _lookup(scope: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    current: Any = scope
    for i, part in enumerate(path):
        if isinstance(current, Mapping):
            # response header names are stored lower-case; the path may spell them otherwise
            key = part.lower() if i == 4 and path[0] == "steps" and path[3] == "headers" else part
            current = current.get(key, _MISSING)
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            current = _MISSING
        if current is _MISSING:
            raise TemplateError(f"unresolved placeholder '{{{{{'.'.join(path)}}}}}'")
    return current


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def quote_path_value(text: str) -> str:
    """Data put into a URL path is percent-encoded, so an id cannot add segments or a query."""
    return quote(text, safe="-._~")


def render_text(text: str, scope: Mapping[str, Any], escape: Callable[[str], str] | None = None) -> str:
    if "{{" not in text:
        return text

    def one(match: re.Match[str]) -> str:
        value = _as_text(_lookup(scope, parse_path(match.group(1))))
        return escape(value) if escape is not None else value

    try:
        return _PLACEHOLDER.sub(one, text)
    except ValueError as exc:  # a malformed path that validation let through (an old journal)
        raise TemplateError(str(exc)) from exc


def render_value(value: Any, scope: Mapping[str, Any]) -> Any:
    """Render every string of a JSON value; a string that is one placeholder keeps its JSON type."""
    if isinstance(value, str):
        if "{{" not in value:
            return value
        whole = _PLACEHOLDER.fullmatch(value)
        if whole is not None:
            try:
                return _lookup(scope, parse_path(whole.group(1)))
            except ValueError as exc:
                raise TemplateError(str(exc)) from exc
        return render_text(value, scope)
    if isinstance(value, Mapping):
        return {key: render_value(item, scope) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [render_value(item, scope) for item in value]
    return value
