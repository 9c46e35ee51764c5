"""Query-string and body parsing with one-line reasons for every refusal."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from certfleet import durations
from certfleet.storable_text import unstorable

from .errors import bad_request

# Ids are 32-bit integer columns (PostgreSQL refuses a larger value with a 500).
MAX_ID = 2**31 - 1


def parse_duration(name: str, text: str) -> dt.timedelta:
    """'90s', '30m', '12h', '30d' or '2w', at most 100 years."""
    try:
        return durations.parse_duration(text)
    except ValueError as exc:
        raise bad_request(f"{name}={text!r} {exc}") from exc


def query(request: web.Request, allowed: Iterable[str]) -> dict[str, str]:
    """The query parameters, refusing unknown and repeated ones."""
    allowed = tuple(allowed)
    seen: dict[str, str] = {}
    for key, value in request.query.items():
        if key not in allowed:
            takes = ", ".join(allowed) or "no parameters"
            raise bad_request(f"unknown query parameter {key!r}; this endpoint takes: {takes}")
        if key in seen:
            raise bad_request(f"query parameter {key!r} is given twice")
        seen[key] = value
    return seen


def is_whole_number(text: str) -> bool:
    """ASCII digits only, at most 18 of them: what int() takes and a store column holds."""
    # str.isdigit alone passes digits int() refuses, such as '²'.
    return text.isascii() and text.isdigit() and len(text) <= 18


def record_id(what: str, text: str) -> int:
    """A stored row's id from a path segment; 400 unless it is 1 to MAX_ID."""
    if not is_whole_number(text) or not 1 <= int(text) <= MAX_ID:
        raise bad_request(f"{what} {text!r} must be a whole number from 1 to {MAX_ID}")
    return int(text)


def integer(name: str, text: str | None, default: int, low: int, high: int) -> int:
    """An integer parameter within [low, high]."""
    if text is None:
        return default
    if not is_whole_number(text) or not low <= int(text) <= high:
        raise bad_request(f"{name}={text!r} must be a whole number from {low} to {high}")
    return int(text)


async def json_object(
    request: web.Request, fields: dict[str, type], optional: dict[str, type] | None = None
) -> dict[str, Any]:
    """The body as a JSON object with only ``fields`` (all required) and ``optional`` fields,
    each of the given type."""
    optional = optional or {}
    known = {**fields, **optional}
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad_request(f"the body must be JSON like {_example(fields)}") from exc
    if not isinstance(body, dict):
        raise bad_request(f"the body must be a JSON object like {_example(fields)}")
    problem = unstorable(body)
    if problem:
        raise bad_request(f"the body has a string with {problem}")
    unknown = sorted(set(body) - set(known))
    if unknown:
        takes = _example(known)
        raise bad_request(f"unknown field(s) {', '.join(unknown)}; the body takes {takes}")
    for name, kind in fields.items():
        if not _is(body.get(name), kind):
            raise bad_request(f"field {name!r} is missing or not a {kind.__name__}")
    for name, kind in optional.items():
        if name in body and not _is(body[name], kind):
            raise bad_request(f"field {name!r} must be a {kind.__name__}")
    return body


def _is(value: Any, kind: type) -> bool:
    # JSON true is not a number here, though Python's bool is an int.
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _example(fields: dict[str, type]) -> str:
    return json.dumps({name: "..." for name in fields})
