"""Turnout's OpenAPI 3.1 document, served at `GET /openapi.json`.

Written by hand rather than generated: the handlers read raw bodies (they must forward
unknown fields untouched and count body bytes as they arrive), so a framework could only
describe their paths. This describes the bodies too, as Turnout checks them; fields it does
not read pass through to the upstream (`additionalProperties`). Route names are not in it:
`GET /v1/models` lists the routes a key may call. tests/reliability/test_schema_fuzz.py keeps
it in step with the handlers and fuzzes the gateway from it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.body import MAX_N, MAX_TOKENS

VERSION = "0.1.0"
JSON = "application/json"
Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema) -> Schema:
    return {"content": {JSON: {"schema": schema}}}


def _body(name: str) -> Schema:
    return {"required": True, **_json(_ref(name))}


def _path_param(name: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


ERRORS: Schema = {"default": {"description": "An error in OpenAI's shape.", **_json(_ref("Error"))}}
BEARER: list[Schema] = [{"bearer": []}]


def _operation(
    summary: str,
    ok: Schema,
    *,
    body: str | None = None,
    params: list[Schema] | None = None,
    status: str = "200",
    secured: bool = True,
) -> Schema:
    operation: Schema = {"summary": summary, "responses": {status: ok, **ERRORS}}
    if body is not None:
        operation["requestBody"] = _body(body)
    if params:
        operation["parameters"] = params
    operation["security"] = BEARER if secured else []
    return operation


def _ok(description: str, schema: Schema | None = None, media: str = JSON) -> Schema:
    return {"description": description, "content": {media: {"schema": schema or {}}}}


_COMPLETION_OK: Schema = {
    "description": "The upstream's answer; with `stream: true`, server-sent events.",
    "content": {
        JSON: {"schema": {"type": "object"}},
        # Each event (OpenAPI before 3.2: `schema` describes one event of the stream): a JSON
        # chunk, a final `{"error": ...}`, or `[DONE]`, in `data`.
        "text/event-stream": {
            "schema": {
                "type": "object",
                "required": ["data"],
                "properties": {
                    "data": {"type": "string"},
                    "event": {"type": "string"},
                    "id": {"type": "string"},
                    "retry": {"type": "integer"},
                },
            }
        },
    },
}
_TEXT_OR_TOKENS: Schema = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "minItems": 1, "items": {"type": "string"}},
        {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
        {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "array",
                "minItems": 1,
                "items": {"type": "integer", "minimum": 0},
            },
        },
    ]
}
_COMMON: Schema = {
    "model": {"type": "string", "minLength": 1, "description": "A route name."},
    "stream": {"type": "boolean"},
    "stream_options": {
        "type": "object",
        "properties": {"include_usage": {"type": "boolean"}},
    },
    "user": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS},
    "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS},
    "n": {"type": "integer", "minimum": 1, "maximum": MAX_N},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
}
_BUDGET: Schema = {
    "type": "object",
    "required": ["usd"],
    "additionalProperties": False,
    "properties": {
        "usd": {"type": "number", "minimum": 0},
        "per": {"enum": ["minute", "hour", "day", "month"]},
    },
}

SCHEMAS: Schema = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    "ChatRequest": {
        "type": "object",
        "required": ["model", "messages"],
        "additionalProperties": True,
        "properties": {
            **_COMMON,
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["role"],
                    "properties": {
                        "role": {"type": "string"},
                        "content": {
                            "anyOf": [
                                {"type": "string"},
                                {"type": "array", "items": {"type": "object"}},
                                {"type": "null"},
                            ]
                        },
                        "name": {"type": "string"},
                    },
                },
            },
        },
    },
    "CompletionRequest": {
        "type": "object",
        "required": ["model", "prompt"],
        "additionalProperties": True,
        "properties": {**_COMMON, "prompt": _TEXT_OR_TOKENS},
    },
    "EmbeddingRequest": {
        "type": "object",
        "required": ["model", "input"],
        "additionalProperties": True,
        "properties": {
            "model": _COMMON["model"],
            "input": _TEXT_OR_TOKENS,
            "encoding_format": {"enum": ["float", "base64"]},
            "user": {"type": "string"},
        },
    },
    "Feedback": {
        "type": "object",
        "required": ["request_id", "metric", "value"],
        "additionalProperties": False,
        "properties": {
            "request_id": {"type": "string", "minLength": 1, "maxLength": 256},
            "metric": {"type": "string", "minLength": 1, "maxLength": 128},
            "value": {"type": ["boolean", "number"]},
            "comment": {"type": ["string", "null"], "maxLength": 2000},
        },
    },
    "NewKey": {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9._:/@-]{1,128}$"},
            "routes": {"type": ["array", "null"], "items": {"type": "string"}},
            "rpm": {"type": ["integer", "null"], "minimum": 1},
            "tpm": {"type": ["integer", "null"], "minimum": 1},
            "budget": {"anyOf": [_BUDGET, {"type": "null"}]},
        },
    },
    "Assignment": {
        "type": "object",
        "required": ["route", "subject"],
        "additionalProperties": False,
        "properties": {
            "route": {"type": "string"},
            "subject": {"type": "string"},
            "variant": {"type": ["string", "null"]},
        },
    },
    "Adapter": {
        "type": "object",
        "required": ["upstream", "name"],
        "additionalProperties": False,
        "properties": {
            "upstream": {"type": "string"},
            "name": {"type": "string"},
            "path": {"type": ["string", "null"]},
        },
    },
}

PATHS: Schema = {
    "/v1/chat/completions": {
        "post": _operation("A chat completion on a route.", _COMPLETION_OK, body="ChatRequest")
    },
    "/v1/completions": {
        "post": _operation(
            "A text completion on a route.", _COMPLETION_OK, body="CompletionRequest"
        )
    },
    "/v1/embeddings": {
        "post": _operation("Embeddings on a route.", _ok("Embeddings."), body="EmbeddingRequest")
    },
    "/v1/models": {"get": _operation("The routes this key may call.", _ok("A list of routes."))},
    "/turnout/requests/{request_id}": {
        "get": _operation(
            "One request's record (admin key).",
            _ok("The record."),
            params=[_path_param("request_id")],
        )
    },
    "/turnout/feedback": {
        "post": _operation("Feedback on a request.", _ok("Stored."), body="Feedback")
    },
    "/turnout/report": {
        "get": _operation(
            "The experiment report (admin key).",
            {
                "description": "The report, as JSON or an HTML page.",
                "content": {JSON: {"schema": {}}, "text/html": {"schema": {"type": "string"}}},
            },
            params=[
                {"name": "route", "in": "query", "schema": {"type": "string"}},
                {"name": "since", "in": "query", "schema": {"type": "number"}},
                {"name": "format", "in": "query", "schema": {"enum": ["json", "html"]}},
            ],
        )
    },
    "/turnout/keys": {
        "get": _operation("Every key, hashes shortened (admin key).", _ok("The keys.")),
        "post": _operation(
            "A run-time key; its token is in this answer only (admin key).",
            _ok("The new key."),
            body="NewKey",
            status="201",
        ),
    },
    "/turnout/keys/{name}/disable": {
        "post": _operation(
            "Disable a run-time key (admin key).", _ok("Disabled."), params=[_path_param("name")]
        )
    },
    "/turnout/assignments": {
        "post": _operation(
            "Pin a sticky subject to a variant (admin key).", _ok("Pinned."), body="Assignment"
        ),
        "delete": _operation("Unpin a subject (admin key).", _ok("Unpinned."), body="Assignment"),
    },
    "/turnout/adapters": {
        "post": _operation(
            "Load a declared LoRA adapter on every replica (admin key).",
            _ok("Loaded."),
            body="Adapter",
        )
    },
    "/turnout/adapters/{upstream}/{name}": {
        "delete": _operation(
            "Unload a LoRA adapter from every replica (admin key).",
            _ok("Unloaded."),
            params=[_path_param("upstream"), _path_param("name")],
        )
    },
    "/healthz": {"get": _operation("Alive.", _ok("Alive."), secured=False)},
    "/livez": {"get": _operation("Alive (the same as /healthz).", _ok("Alive."), secured=False)},
    "/readyz": {
        "get": _operation(
            "Ready (200, degraded parts named), or overloaded (503).",
            _ok("Ready or degraded."),
            secured=False,
        )
    },
    "/metrics": {
        "get": _operation(
            "Prometheus text.", _ok("The metrics.", {"type": "string"}, "text/plain"), secured=False
        )
    },
    "/openapi.json": {"get": _operation("This document.", _ok("OpenAPI 3.1."), secured=False)},
}

DOCUMENT: Schema = {
    "openapi": "3.1.0",
    "info": {
        "title": "Turnout",
        "version": VERSION,
        "description": "An OpenAI-compatible gateway: routes, A/B splits, tokens and cost.",
    },
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
    "security": [{"bearer": []}],
}

ENCODED = msgspec.json.encode(DOCUMENT)
