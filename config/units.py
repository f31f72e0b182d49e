"""Parsing of durations (`250ms`, `2s`, `1m`), rates (`100/s`) and sizes (`64KiB`)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

__all__ = ["parse_duration", "parse_rate", "parse_size", "Duration", "Rate", "Size", "DURATION_SCHEMA",
           "MAX_DURATION", "MIN_RATE"]

MAX_DURATION = 365 * 86400.0
MIN_RATE = 1 / 86400

# no unit means seconds, as a number does: an environment variable (FENDER_DRAIN_TIMEOUT=10)
# can only ever be a string
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(ms|s|m|h)\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1, "KB": 1000, "KiB": 1024, "MB": 1000**2, "MiB": 1024**2,
    "GB": 1000**3, "GiB": 1024**3,
}


def parse_duration(value: Any) -> float:
    """Seconds from `250ms`, `2s`, `1m`, `1h` or a number of seconds (`2`, `"2"`, `0.5`)."""
    if isinstance(value, bool):
        raise ValueError("a duration is a string such as '250ms' or '2s', or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"invalid duration {value!r}: use e.g. '250ms', '2s', '1m', '1h'")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError("a duration is a string such as '250ms' or '2s', or a number of seconds")
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError("a duration must be a finite, non-negative number of seconds")
    if seconds > MAX_DURATION:
        # (no timeout, breaker or saga deadline needs more; a larger one is a typo, and
        # would overflow the dates and Retry-After values computed from it)
        raise ValueError("a duration must be at most 365 days (8760h)")
    return seconds


def parse_rate(value: Any) -> float:
    """Events per second from `100/s`, `6000/m` or a number per second."""
    if isinstance(value, bool):
        raise ValueError("a rate is a string such as '100/s' or '6000/m'")
    if isinstance(value, int | float):
        rate = float(value)
    elif isinstance(value, str):
        match = _RATE.match(value)
        if not match:
            raise ValueError(f"invalid rate {value!r}: use e.g. '100/s' or '6000/m'")
        rate = float(match.group(1)) / _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError("a rate is a string such as '100/s' or '6000/m'")
    if not rate > 0 or rate == float("inf"):
        raise ValueError("a rate must be greater than zero")
    if rate < MIN_RATE:
        raise ValueError("a rate must be at least one a day (1/86400 per second)")  # (see MAX_DURATION)
    return rate


def parse_size(value: Any) -> int:
    """Bytes from `64KiB`, `1MiB`, `1000` and the like."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string such as '64KiB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise ValueError(f"invalid size {value!r}: use e.g. '64KiB', '1MiB' or a byte count")
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    else:
        raise ValueError("a size is a number of bytes or a string such as '64KiB'")
    if size < 0:
        raise ValueError("a size must not be negative")
    return size


DURATION_SCHEMA = {"anyOf": [{"type": "string", "pattern": _DURATION.pattern},
                             {"type": "number", "minimum": 0, "maximum": MAX_DURATION}]}
Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(DURATION_SCHEMA)]
Rate = Annotated[
    float,
    BeforeValidator(parse_rate),
    WithJsonSchema(
        {"anyOf": [{"type": "string", "pattern": _RATE.pattern}, {"type": "number", "minimum": MIN_RATE}]}
    ),
]
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {"anyOf": [{"type": "string", "pattern": _SIZE.pattern}, {"type": "integer", "minimum": 0}]}
    ),
]
