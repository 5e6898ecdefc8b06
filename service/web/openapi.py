"""The OpenAPI 3.1 description of the API, served at ``/openapi.json``.

Kept by hand next to the handlers; tests check that every route is documented (and
nothing else), that every status the tests see is listed, and that bodies match the
schemas.
"""

from __future__ import annotations

from typing import Any


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": _ref("Problem")}},
    }


def _unavailable() -> dict[str, Any]:
    return _problem("The database does not answer (yet); retry after Retry-After seconds.")


def _nullable(type_: str) -> dict[str, Any]:
    return {"type": [type_, "null"]}


BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
UNAUTHORIZED = _problem("Missing or wrong bearer token (only when a token is configured).")
BAD_ID = _problem("The id is not a 64-bit integer.")
RUN_ID_PARAM = {
    "name": "run_id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "format": "int64"},
}
RUN_OPTIONS: dict[str, Any] = {
    "on_error": {
        "type": "string",
        "enum": ["abort", "skip"],
        "default": "abort",
        "description": "abort: any bad row fails the run; skip: bad rows are left out.",
    },
    "max_errors": {
        "type": "integer",
        "minimum": 0,
        "default": 1000,
        "description": "skip mode: fail when more rows than this are bad.",
    },
    "dry_run": {
        "type": "boolean",
        "default": False,
        "description": "Validate and compute everything, replace nothing; the run is "
        "recorded with this option set.",
    },
    "encoding": {
        "type": "string",
        "default": "utf-8",
        "description": "The files' text encoding (latin-1, cp1252, ...), transcoded to "
        "UTF-8; recorded by its codec name (iso8859-1).",
    },
    "delimiter": {
        "type": "string",
        "enum": ["auto", ",", ";"],
        "default": "auto",
        "description": "auto: ; when a file's header line has ; and no comma, else ,.",
    },
    "callback_url": {
        "type": ["string", "null"],
        "description": "One more webhook target for this run; its host must be listed "
        "in ETL_WEBHOOK_ALLOW.",
    },
}

SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details.",
        "required": ["type", "title", "status", "detail", "instance"],
        "properties": {
            "type": {"type": "string", "format": "uri-reference"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "instance": {"type": "string", "format": "uri-reference"},
            "active_run_id": {
                "type": "integer",
                "description": "409 on POST /runs: the run that is queued or running.",
            },
            "run_status": {"type": "string", "description": "409 on cancel: the run's status."},
            "run_id": {"type": "integer"},
        },
    },
    "RunOptions": {"type": "object", "properties": RUN_OPTIONS, "additionalProperties": False},
    "RunRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "dataset": {
                "type": "string",
                "default": "",
                "description": "Sub-directory of the data directory; empty for the data "
                "directory itself. Paths leading outside it are rejected.",
            },
            **RUN_OPTIONS,
        },
    },
    "Upload": {
        "type": "object",
        "description": "The three files as parts, or one zip of them as the part archive.",
        "anyOf": [
            {"required": ["users", "experiments", "compounds"]},
            {"required": ["archive"]},
        ],
        "properties": {
            "users": {"type": "string", "contentMediaType": "text/csv"},
            "experiments": {"type": "string", "contentMediaType": "text/csv"},
            "compounds": {"type": "string", "contentMediaType": "text/csv"},
            "archive": {"type": "string", "contentMediaType": "application/zip"},
            **RUN_OPTIONS,
        },
    },
    "RowError": {
        "type": "object",
        "required": ["file", "line", "column", "message"],
        "properties": {
            "file": {"type": "string"},
            "line": _nullable("integer"),
            "column": _nullable("integer"),
            "message": {"type": "string"},
            "field": _nullable("string"),
        },
    },
    "Progress": {
        "type": "object",
        "description": "Empty until the run starts; live while it runs.",
        "properties": {
            "phase": {"type": "string"},
            "bytes_total": {"type": "integer"},
            "bytes_read": {"type": "integer"},
            "rows_read": {"type": "object", "additionalProperties": {"type": "integer"}},
            "partitions_done": {"type": "integer"},
            "partitions_total": {"type": "integer"},
        },
    },
    "RunStats": {
        "type": "object",
        "required": ["users", "compounds", "experiments", "rows_loaded", "duration_s"],
        "properties": {
            "users": {"type": "integer"},
            "compounds": {"type": "integer"},
            "experiments": {"type": "integer"},
            "global_average": {"type": "number"},
            "rows_loaded": {"type": "object", "additionalProperties": {"type": "integer"}},
            "rows_rejected": {"type": "integer"},
            "duration_s": {"type": "number"},
            "phases_s": {"type": "object", "additionalProperties": {"type": "number"}},
            "inputs": {
                "type": "object",
                "description": "archive (a zip's name or null) and, per file, its name, "
                "compression, whether it was decompressed, encoding and delimiter.",
                "properties": {
                    "archive": _nullable("string"),
                    "files": {"type": "object", "additionalProperties": _ref("InputFile")},
                },
            },
        },
    },
    "InputFile": {
        "type": "object",
        "required": ["file", "compression", "decompressed", "encoding", "delimiter"],
        "properties": {
            "file": {"type": "string"},
            "compression": {"enum": ["gzip", "bzip2", "zstd", None]},
            "decompressed": {"type": "boolean"},
            "encoding": {"type": "string"},
            "delimiter": {"enum": [",", ";"]},
        },
    },
    "Delivery": {
        "type": "object",
        "required": ["url", "status", "attempts"],
        "properties": {
            "url": {"type": "string", "description": "without credentials or query"},
            "status": {"enum": ["pending", "delivered", "failed", "cancelled"]},
            "attempts": {"type": "integer"},
            "http_status": {"type": "integer"},
            "error": {"type": "string", "description": "the last attempt's failure"},
            "delivered_at": {"type": "string", "format": "date-time"},
        },
    },
    "Run": {
        "type": "object",
        "required": [
            "id",
            "status",
            "created_at",
            "started_at",
            "finished_at",
            "source",
            "options",
            "progress",
            "stats",
            "errors",
            "error_total",
            "message",
        ],
        "properties": {
            "id": {"type": "integer"},
            "status": {
                "type": "string",
                "enum": ["queued", "running", "succeeded", "failed", "cancelled"],
            },
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": {"type": ["string", "null"], "format": "date-time"},
            "finished_at": {"type": ["string", "null"], "format": "date-time"},
            "source": {
                "type": "object",
                "description": "kind dataset (with name) or upload (with files' bytes and "
                "sha256); kind directory for runs started by the CLI.",
                "required": ["kind"],
                "properties": {"kind": {"enum": ["dataset", "upload", "directory"]}},
            },
            "options": _ref("RunOptions"),
            "progress": _ref("Progress"),
            "stats": {"oneOf": [_ref("RunStats"), {"type": "null"}]},
            "errors": {"type": "array", "items": _ref("RowError")},
            "error_total": {"type": "integer"},
            "message": _nullable("string"),
            "rejects": {
                "description": "Skip mode: the rejected rows kept (null when none are kept).",
                "oneOf": [
                    {
                        "type": "object",
                        "required": ["count", "href"],
                        "properties": {
                            "count": {"type": "integer"},
                            "href": {"type": "string", "format": "uri-reference"},
                        },
                    },
                    {"type": "null"},
                ],
            },
            "webhooks": {
                "description": "Completion webhook deliveries (null when none configured).",
                "oneOf": [{"type": "array", "items": _ref("Delivery")}, {"type": "null"}],
            },
        },
    },
    "RunList": {
        "type": "object",
        "required": ["runs"],
        "properties": {"runs": {"type": "array", "items": _ref("Run")}},
    },
    "TopCompound": {
        "type": "object",
        "required": ["id", "name", "structure", "experiments", "tie_count"],
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string"},
            "structure": {"type": "string"},
            "experiments": {"type": "integer", "description": "experiments that used it"},
            "tie_count": {
                "type": "integer",
                "description": "compounds sharing the top count (ties go to the lowest id)",
            },
        },
    },
    "Features": {
        "type": "object",
        "required": [
            "user_id",
            "name",
            "experiment_count",
            "average_experiments",
            "average_run_time",
            "top_compound",
        ],
        "properties": {
            "user_id": {"type": "integer"},
            "name": {"type": "string"},
            "experiment_count": {"type": "integer"},
            "average_experiments": {"type": "number"},
            "average_run_time": _nullable("number"),
            "top_compound": {"oneOf": [_ref("TopCompound"), {"type": "null"}]},
        },
    },
    "Status": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}},
    },
}

PATHS: dict[str, Any] = {
    "/runs": {
        "post": {
            "summary": "Start a run on a dataset or on uploaded files",
            "description": "Answers at once; poll the Location. One run at a time per "
            "database. An empty body runs the data directory. Options may also come as "
            "query parameters.",
            "security": BEARER,
            "parameters": [
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "schema": {"type": "string", "maxLength": 255},
                    "description": "Same key and request: the same run, no second one.",
                },
                {"name": "dataset", "in": "query", "schema": {"type": "string"}},
                {"name": "on_error", "in": "query", "schema": RUN_OPTIONS["on_error"]},
                {"name": "max_errors", "in": "query", "schema": RUN_OPTIONS["max_errors"]},
                {"name": "dry_run", "in": "query", "schema": RUN_OPTIONS["dry_run"]},
                {"name": "encoding", "in": "query", "schema": RUN_OPTIONS["encoding"]},
                {"name": "delimiter", "in": "query", "schema": RUN_OPTIONS["delimiter"]},
                {"name": "callback_url", "in": "query", "schema": {"type": "string"}},
            ],
            "requestBody": {
                "required": False,
                "content": {
                    "application/json": {"schema": _ref("RunRequest")},
                    "multipart/form-data": {"schema": _ref("Upload")},
                },
            },
            "responses": {
                "202": {
                    **_json(_ref("Run"), "Run accepted (or the run of the same Idempotency-Key)."),
                    "headers": {"Location": {"schema": {"type": "string"}}},
                },
                "400": _problem(
                    "Malformed body, bad dataset path, bad Idempotency-Key, or an uploaded "
                    "zip that is unreadable, lacks a file or has a path leaving it."
                ),
                "401": UNAUTHORIZED,
                "404": _problem("No such dataset."),
                "408": _problem("The body did not arrive in time."),
                "409": _problem("A run is already queued or running (see active_run_id)."),
                "413": _problem(
                    "Upload larger than the limit; for a zip, its files decompressed, or a "
                    "member inflating past the ratio limit (a zip bomb)."
                ),
                "415": _problem("Unsupported Content-Type or Content-Encoding."),
                "422": _problem("Invalid options, or Idempotency-Key reused for another request."),
                "503": _unavailable(),
            },
        },
        "get": {
            "summary": "Runs, newest first",
            "security": BEARER,
            "parameters": [
                {
                    "name": "status",
                    "in": "query",
                    "schema": SCHEMAS["Run"]["properties"]["status"],
                },
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
                },
            ],
            "responses": {
                "200": _json(_ref("RunList"), "Runs."),
                "400": _problem("Bad status or limit."),
                "401": UNAUTHORIZED,
                "503": _unavailable(),
            },
        },
    },
    "/runs/{run_id}": {
        "get": {
            "summary": "A run, with live progress while this server runs it",
            "security": BEARER,
            "parameters": [RUN_ID_PARAM],
            "responses": {
                "200": _json(_ref("Run"), "The run."),
                "400": BAD_ID,
                "401": UNAUTHORIZED,
                "404": _problem("No such run."),
                "503": _unavailable(),
            },
        }
    },
    "/runs/{run_id}/rejects.csv": {
        "get": {
            "summary": "A skip-mode run's rejected rows as CSV, streamed",
            "description": "Columns file, line, column, field, message, raw (the row's "
            "first physical line as in the input). Kept for the newest ETL_REJECTS_KEEP "
            "runs.",
            "security": BEARER,
            "parameters": [RUN_ID_PARAM],
            "responses": {
                "200": {
                    "description": "The rejected rows.",
                    "content": {"text/csv": {"schema": {"type": "string"}}},
                },
                "400": BAD_ID,
                "401": UNAUTHORIZED,
                "404": _problem("No such run, or no rejected rows kept for it."),
                "503": _unavailable(),
            },
        }
    },
    "/runs/{run_id}/cancel": {
        "post": {
            "summary": "Cancel the active run: nothing it did is kept",
            "security": BEARER,
            "parameters": [RUN_ID_PARAM],
            "responses": {
                "200": _json(_ref("Run"), "The run, now cancelled."),
                "400": BAD_ID,
                "401": UNAUTHORIZED,
                "404": _problem("No such run."),
                "409": _problem("The run is not active here (see run_status)."),
                "503": _unavailable(),
            },
        }
    },
    "/users/{user_id}/features": {
        "get": {
            "summary": "One user's features from the last successful run",
            "security": BEARER,
            "parameters": [
                {
                    "name": "user_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "integer", "format": "int64"},
                }
            ],
            "responses": {
                "200": _json(_ref("Features"), "The user's features."),
                "400": BAD_ID,
                "401": UNAUTHORIZED,
                "404": _problem("No such user in the results."),
                "503": _unavailable(),
            },
        }
    },
    "/healthz": {
        "get": {
            "summary": "Liveness: the process answers (no database call)",
            "security": [],
            "responses": {"200": _json(_ref("Status"), "Alive.")},
        }
    },
    "/readyz": {
        "get": {
            "summary": "Readiness: the database answers and has the schema, within 1 s, and"
            " worker processes run",
            "security": [],
            "responses": {
                "200": _json(_ref("Status"), "Ready."),
                "503": _problem(
                    "Database unreachable, schema missing, or worker processes could not be"
                    " restarted."
                ),
            },
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics",
            "security": [],
            "responses": {
                "200": {
                    "description": "Prometheus text format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "security": BEARER,
            "responses": {
                "200": _json({"type": "object"}, "OpenAPI 3.1 document."),
                "401": UNAUTHORIZED,
            },
        }
    },
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "experiment-etl",
        "version": "0.1.0",
        "description": "Runs the lab CSV ETL and serves per-user features. Errors are RFC "
        "9457 problem+json; a method a path does not support answers 405, an unknown path "
        "404, an unexpected failure 500. Bearer auth applies only when ETL_API_TOKEN is set.",
    },
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
}
