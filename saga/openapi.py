"""The OpenAPI 3 fragment of `/v1/sagas` that the admin `/openapi.json` merges.

Request schemas come from the pydantic models (so they cannot drift from what is
validated); the record schema is written out to match `Saga.record`.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from config.saga_models import SagaRequestModel
from saga.model import SAGA_STATUSES, STEP_STATUSES

__all__ = ["openapi_fragment"]

_REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_NULLABLE_OBJECT = {"type": ["object", "null"]}
_RESPONSE = {
    "type": ["object", "null"],
    "properties": {"status": {"type": "integer"}, "headers": {"type": "object"}, "body": {}},
}
_ERROR_DETAIL = {
    "type": ["object", "null"],
    "properties": {"kind": {"type": "string"}, "message": {"type": "string"}},
}
_TIME = {"type": ["string", "null"], "format": "date-time"}

_STEP_RECORD = {
    "type": "object",
    "required": ["name", "status", "attempts", "started_at", "finished_at", "response", "compensation", "error"],
    "properties": {
        "name": {"type": "string"},
        "status": {"type": "string", "enum": list(STEP_STATUSES)},
        "attempts": {"type": "integer"},
        "started_at": _TIME,
        "finished_at": _TIME,
        "response": _RESPONSE,
        "compensation": {
            "type": ["object", "null"],
            "properties": {
                "status": {"type": "string", "enum": ["pending", "running", "succeeded", "failed"]},
                "attempts": {"type": "integer"},
                "response": _RESPONSE,
            },
        },
        "error": _ERROR_DETAIL,
    },
}

_SAGA_RECORD = {
    "type": "object",
    "required": [
        "id", "status", "template", "input", "created_at", "updated_at", "deadline_at",
        "steps_executed", "total_steps", "error", "steps",
    ],
    "properties": {
        "id": {"type": "string"},
        "status": {"type": "string", "enum": list(SAGA_STATUSES)},
        "template": {"type": ["string", "null"]},
        "input": {"type": "object"},
        "created_at": _TIME,
        "updated_at": _TIME,
        "deadline_at": _TIME,
        "steps_executed": {"type": "integer"},
        "total_steps": {"type": "integer"},
        "error": {
            "type": ["object", "null"],
            "properties": {
                "step": {"type": ["string", "null"]},
                "kind": {"type": "string"},
                "message": {"type": "string"},
            },
        },
        "steps": {"type": "array", "items": _ref("SagaStepRecord")},
    },
}

_SAGA_ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "invalid_saga, saga_exists, saga_conflict, not_found, ..."},
        "message": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {"type": "object", "properties": {"loc": {"type": "string"}, "msg": {"type": "string"}}},
        },
    },
}


def openapi_fragment() -> dict[str, Any]:
    """`{"paths": ..., "components": {"schemas": ...}}` for the saga API."""
    _, generated = models_json_schema([(SagaRequestModel, "validation")], ref_template=_REF)
    schemas: dict[str, Any] = dict(generated.get("$defs", {}))
    schemas.update(
        SagaRequest=_ref("SagaRequestModel"),
        SagaRecord=_SAGA_RECORD,
        SagaStepRecord=_STEP_RECORD,
        SagaPage={
            "type": "object",
            "properties": {
                "items": {"type": "array", "items": _ref("SagaRecord")},
                "next_cursor": {"type": ["string", "null"]},
            },
        },
        SagaError=_SAGA_ERROR,
    )
    record = _json(_ref("SagaRecord"), "the saga record")
    error = _json(_ref("SagaError"), "error")
    saga_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    wait = {
        "name": "wait", "in": "query", "required": False,
        "description": "seconds (or a duration such as 5s) to wait for a terminal status; 200 if reached",
        "schema": {"type": "string"},
    }
    paths: dict[str, Any] = {
        "/v1/sagas": {
            "post": {
                "summary": "Start a saga (idempotent by id)",
                "operationId": "createSaga",
                "parameters": [wait],
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("SagaRequest")}}},
                "responses": {
                    "202": {**record, "headers": {"Location": {"schema": {"type": "string"}}}},
                    "200": _json(_ref("SagaRecord"), "already exists with the same definition, or finished within wait"),
                    "400": error,
                    "409": error,
                },
            },
            "get": {
                "summary": "List sagas, oldest first",
                "operationId": "listSagas",
                "parameters": [
                    {"name": "status", "in": "query", "schema": {"type": "string"},
                     "description": "one status or a comma-separated list"},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"},
                     "description": "next_cursor of the previous page"},
                ],
                "responses": {"200": _json(_ref("SagaPage"), "a page of sagas"), "400": error},
            },
        },
        "/v1/sagas/{id}": {
            "get": {
                "summary": "One saga",
                "operationId": "getSaga",
                "parameters": [saga_id, wait],
                "responses": {"200": record, "404": error},
            },
            "delete": {
                "summary": "Forget a finished saga",
                "operationId": "deleteSaga",
                "parameters": [saga_id],
                "responses": {"204": {"description": "deleted"}, "404": error, "409": error},
            },
        },
        "/v1/sagas/{id}/cancel": {
            "post": {
                "summary": "Stop a running saga and compensate it",
                "operationId": "cancelSaga",
                "parameters": [saga_id, wait],
                "responses": {"202": record, "200": record, "404": error, "409": error},
            },
        },
        "/v1/sagas/{id}/retry": {
            "post": {
                "summary": "Retry the parked compensations of a failed saga",
                "operationId": "retrySaga",
                "parameters": [saga_id, wait],
                "responses": {"202": record, "200": record, "404": error, "409": error},
            },
        },
    }
    for item in paths.values():
        for operation in item.values():
            operation["tags"] = ["sagas"]
    return {
        "paths": paths,
        "components": {"schemas": schemas},
        "tags": [{"name": "sagas", "description": "saga coordinator (compensating multi-step transactions)"}],
    }
