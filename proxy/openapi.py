"""The OpenAPI 3 document of the admin listener (`GET /openapi.json`).

The admin part is written here; the saga part comes from `saga.openapi` when that
module exists (imported lazily, so the admin API does not depend on the saga code).
"""

from __future__ import annotations

import copy
import importlib
import logging
from typing import Any

__all__ = ["openapi_document", "admin_paths", "saga_fragment"]

log = logging.getLogger("fender")

_JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


_UNAUTHORIZED = {
    "401": _json(_ref("AdminError"), "a token is configured and the bearer token is missing or wrong"),
    "403": _json(_ref("AdminError"), "non-loopback peer and no FENDER_ADMIN_TOKEN configured"),
}

_SCHEMAS: dict[str, Any] = {
    "ConfigIssue": {
        "type": "object",
        "required": ["loc", "msg"],
        "properties": {
            "loc": {"type": "string", "description": "where, e.g. routes[1].chain[2].retry.attempts"},
            "msg": {"type": "string"},
        },
    },
    "ReloadResult": {
        "type": "object",
        "required": ["ok", "at", "errors"],
        "properties": {
            "ok": {"type": "boolean"},
            "result": {"type": "string", "enum": ["success", "failure", "unchanged"]},
            "at": {"type": "number", "description": "Unix time of the attempt"},
            "hash": {"type": ["string", "null"]},
            "trigger": {"type": "string", "enum": ["start", "file", "sighup", "api"]},
            "errors": {"type": "array", "items": _ref("ConfigIssue")},
        },
    },
    "ConfigView": {
        "type": "object",
        "required": ["hash", "loaded_at", "source", "config", "last_reload"],
        "properties": {
            "hash": {"type": "string", "description": "first 16 hex digits of the file's sha256"},
            "loaded_at": {"type": "number"},
            "source": {"type": "string", "description": "the config file path"},
            "config": {"type": "object", "description": "the file as loaded, secrets redacted"},
            "last_reload": _ref("ReloadResult"),
        },
    },
    "ReloadOk": {
        "type": "object",
        "required": ["ok", "hash"],
        "properties": {
            "ok": {"const": True},
            "hash": {"type": "string"},
            "result": {"type": "string", "enum": ["success", "unchanged"]},
        },
    },
    "ReloadRejected": {
        "type": "object",
        "required": ["ok", "errors"],
        "properties": {"ok": {"const": False}, "errors": {"type": "array", "items": _ref("ConfigIssue")}},
    },
    "PolicyState": {
        "type": "object",
        "required": ["label", "kind"],
        "description": "a policy of a chain and its live state; fields depend on the kind",
        "properties": {
            "label": {"type": "string"},
            "kind": {"type": "string"},
            "shared": {"type": "boolean", "description": "a named policy under `policies:`"},
            "breaker": {"type": "string", "description": "the name for POST /breakers/{name}/reset"},
            "state": {"type": "string", "enum": ["closed", "half_open", "open"]},
            "tokens": {"type": "number"},
            "in_flight": {"type": "integer"},
        },
        "additionalProperties": True,
    },
    "RouteView": {
        "type": "object",
        "required": ["name", "match", "upstream", "chain", "in_flight"],
        "properties": {
            "name": {"type": "string"},
            "match": {"type": "object"},
            "upstream": {"type": "string"},
            "in_flight": {
                "type": ["integer", "null"],
                "description": "requests of this route in progress now (null without telemetry)",
            },
            "chain": {"type": "array", "items": _ref("PolicyState")},
        },
    },
    "Breaker": {
        "type": "object",
        "required": ["name", "state", "routes"],
        "properties": {
            "name": {"type": "string"},
            "state": {"type": "string", "enum": ["closed", "half_open", "open"]},
            "routes": {"type": "array", "items": {"type": "string"}},
        },
        "additionalProperties": True,
    },
    "AdminError": {
        "type": "object",
        "required": ["error", "message"],
        "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
    },
}


def admin_paths() -> dict[str, Any]:
    text = {"description": "text", "content": {"text/plain": {"schema": {"type": "string"}}}}
    status = _json({"type": "object", "properties": {"status": {"type": "string"}}}, "status")
    return {
        "/healthz": {"get": {"summary": "liveness", "tags": ["health"], "responses": {"200": status}}},
        "/readyz": {
            "get": {
                "summary": "readiness (503 while starting or draining)",
                "tags": ["health"],
                "responses": {"200": status, "503": status},
            }
        },
        "/metrics": {"get": {"summary": "Prometheus metrics", "tags": ["health"], "responses": {"200": text}}},
        "/config": {
            "get": {
                "summary": "the config serving now and the outcome of the last reload",
                "tags": ["config"],
                "responses": {"200": _json(_ref("ConfigView"), "current config, secrets redacted")},
            }
        },
        "/config/reload": {
            "post": {
                "summary": "re-read the config file, validate it completely, then swap it in",
                "tags": ["config"],
                "security": [{"bearerAuth": []}, {}],
                "responses": {
                    "200": _json(_ref("ReloadOk"), "the new config serves (or the file was unchanged)"),
                    "400": _json(_ref("ReloadRejected"), "rejected; the last good config keeps serving"),
                    **_UNAUTHORIZED,
                },
            }
        },
        "/routes": {
            "get": {
                "summary": "each route with its chain and live policy state",
                "tags": ["routes"],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "hash": {"type": "string"},
                                "routes": {"type": "array", "items": _ref("RouteView")},
                            },
                        },
                        "routes in match order",
                    )
                },
            }
        },
        "/breakers": {
            "get": {
                "summary": "every circuit breaker by the name /breakers/{name}/reset takes",
                "tags": ["routes"],
                "responses": {
                    "200": _json(
                        {"type": "object", "properties": {"breakers": {"type": "array", "items": _ref("Breaker")}}},
                        "breakers",
                    )
                },
            }
        },
        "/breakers/{name}/reset": {
            "post": {
                "summary": "force a breaker closed",
                "tags": ["routes"],
                "security": [{"bearerAuth": []}, {}],
                "parameters": [
                    {
                        "name": "name",
                        "in": "path",
                        "required": True,
                        "description": "a policy name under `policies:`, or `<route>.<label>` for an inline breaker",
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": _json(_ref("Breaker"), "the breaker, now closed"),
                    "404": _json(_ref("AdminError"), "no breaker of that name"),
                    **_UNAUTHORIZED,
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "this document",
                "tags": ["meta"],
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1 document")},
            }
        },
    }


def saga_fragment() -> dict[str, Any] | None:
    """`saga.openapi`'s part of the document, if that module exists.

    Accepts a `fragment()`/`openapi_fragment()` function or a `FRAGMENT`/`OPENAPI`
    mapping with `paths` (and optionally `components`, `tags`).
    """
    try:
        module = importlib.import_module("saga.openapi")
    except ModuleNotFoundError as exc:
        if exc.name in ("saga", "saga.openapi"):
            return None
        raise
    for name in ("fragment", "openapi_fragment", "openapi", "document"):
        func = getattr(module, name, None)
        if callable(func):
            result = func()
            return result if isinstance(result, dict) else None
    for name in ("FRAGMENT", "OPENAPI", "DOCUMENT", "SPEC"):
        value = getattr(module, name, None)
        if isinstance(value, dict):
            return value
    log.warning("saga.openapi has no fragment()/FRAGMENT; the saga API is missing from /openapi.json")
    return None


def _merge(doc: dict[str, Any], fragment: dict[str, Any]) -> None:
    for path, item in (fragment.get("paths") or {}).items():
        doc["paths"].setdefault(path, {}).update(item)
    for section, entries in (fragment.get("components") or {}).items():
        doc["components"].setdefault(section, {}).update(entries)
    known = {t["name"] for t in doc["tags"]}
    doc["tags"].extend(t for t in fragment.get("tags") or () if t.get("name") not in known)


def openapi_document(version: str = "0.0.0") -> dict[str, Any]:
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Fender admin API",
            "version": version,
            "description": (
                "Admin and saga API of the Fender sidecar. Mutating calls (POST, PUT, PATCH, "
                "DELETE) from a peer outside 127.0.0.0/8 and ::1 need `Authorization: Bearer "
                "$FENDER_ADMIN_TOKEN`; without a configured token they are refused (403)."
            ),
        },
        "tags": [
            {"name": "config", "description": "config and reload"},
            {"name": "routes", "description": "routes, chains and breakers"},
            {"name": "health", "description": "health and metrics"},
            {"name": "meta"},
        ],
        "paths": admin_paths(),
        "components": {
            "schemas": copy.deepcopy(_SCHEMAS),
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }
    fragment = saga_fragment()
    if fragment:
        _merge(doc, fragment)
    return doc
