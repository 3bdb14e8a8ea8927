"""What BentoML's OpenAPI page (``/docs.json``, shown at ``/``) leaves out, filled in.

BentoML documents each endpoint with one request form (multipart, from the signature), untyped
``metadata``, an untyped answer and its own error shapes. This middleware completes the document
as it is served: both input forms (multipart upload and JSON URL), the ``metadata`` schema with
every field, the answers' schemas, every error status with the failure body, and the OpenAI routes
under ``/v1``.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from http_api.answers import Failure, ImageAnswer, VideoAnswer
from http_api.errors import Message, Receive, Scope, Send
from http_api.routes import Kind, routes_of
from http_api.schemas import JobMetadata, JobQuestion, Metadata

DOCS_PATH = "/docs.json"
REF = "#/components/schemas/{model}"
# Every status a native endpoint answers besides 200, and when.
ERROR_STATUSES = {
    "400": "Malformed request: missing or doubled input, bad metadata, a refused URL",
    "413": "Upload, download, image or prompt over its limit",
    "415": "Not a supported video or image, or an unsupported Content-Type",
    "422": "Damaged or truncated media",
    "500": "Internal error (details in the server log)",
    "502": "The URL's server failed",
    "503": "Busy or shutting down: retry after the Retry-After seconds",
    "504": "The URL's server timed out",
}
_ANSWERS: dict[str, type[BaseModel]] = {"video": VideoAnswer, "image": ImageAnswer}
# The native routes of http_api.routes: their upload part and their answer.
_NATIVE = {route.path: (route.upload, _ANSWERS[route.upload]) for route in routes_of(Kind.NATIVE) if route.upload}


class OpenAPIDocs:
    """ASGI middleware that rewrites the ``/docs.json`` response; other requests pass through."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != DOCS_PATH:
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        body = bytearray()

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            body.extend(message.get("body", b""))
            if message.get("more_body", False) or start is None:
                return
            payload = bytes(body)
            if start["status"] == 200:
                payload = json.dumps(complete(json.loads(payload))).encode()
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(payload)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": payload})

        await self.app(scope, receive, capture)


def complete(spec: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document with our schemas, input forms, errors, the /v1 and /jobs routes."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in (Metadata, VideoAnswer, ImageAnswer, Failure):
        _add_schema(schemas, model)
    metadata = {"description": "The question and its settings", "allOf": [{"$ref": REF.format(model="Metadata")}]}
    # In a form, metadata is a part holding the JSON text of the same object.
    form_metadata = {"type": "string", "description": "JSON text of a Metadata object (see the JSON form)"}
    for path, (kind, answer) in _NATIVE.items():
        operation = spec.get("paths", {}).get(path, {}).get("post")
        if operation is None:
            continue
        url = {"type": "string", "description": "http(s) or data: URL"}
        # Several images, in order: repeated 'image' parts, or a list of URLs (beside the video
        # on /analyze_video, where the model sees them after it).
        images = {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "image files"}
        image_urls = {"oneOf": [url, {"type": "array", "items": url}], "description": "one image URL or a list"}
        if kind == "video":
            parts = {"video": {"type": "string", "format": "binary", "description": "the video file"}, "image": images}
            fields = {"video_url": {**url, "description": "http(s) or data: URL of the video"}, "image_url": image_urls}
        else:
            parts, fields = {"image": images}, {"image_url": image_urls}
        operation["requestBody"] = {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {**parts, "metadata": form_metadata},
                        "required": [kind],
                        "additionalProperties": False,
                    },
                    "encoding": {"metadata": {"contentType": "application/json"}},
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {**fields, "metadata": metadata},
                        "required": [f"{kind}_url"],
                        "additionalProperties": False,
                    }
                },
            },
        }
        failure = {"application/json": {"schema": {"$ref": REF.format(model="Failure")}}}
        operation["responses"] = {
            "200": {
                "description": "The answer; with metadata.stream, server-sent events (see README)",
                "content": {
                    "application/json": {"schema": {"$ref": REF.format(model=answer.__name__)}},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            },
            **{status: {"description": text, "content": failure} for status, text in ERROR_STATUSES.items()},
        }
    spec.setdefault("paths", {}).update(_openai_paths())
    spec["paths"].update(_jobs_paths(schemas))
    return spec


def _jobs_paths(schemas: dict[str, Any]) -> dict[str, Any]:
    """The /jobs routes (http_api.jobs_api): a long video segment by segment in the background."""
    for model in (JobMetadata, JobQuestion):
        _add_schema(schemas, model)
    failure = {"application/json": {"schema": {"$ref": REF.format(model="Failure")}}}
    statuses = ERROR_STATUSES | {"404": "No such job, or its result expired", "409": "The job has no result (yet)"}
    errors = {status: {"description": text, "content": failure} for status, text in sorted(statuses.items())}
    job = {"application/json": {"schema": {"type": "object"}}}
    task_id = [{"name": "task_id", "in": "query", "required": True, "schema": {"type": "string"}}]
    metadata = {"description": "The job's parameters", "allOf": [{"$ref": REF.format(model="JobMetadata")}]}
    tags = ["Long videos (jobs)"]
    return {
        "/jobs/submit": {
            "post": {
                "tags": tags,
                "description": "Submit a long video: checked at once, then captioned segment by segment",
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "video": {"type": "string", "format": "binary"},
                                    "metadata": {"type": "string", "description": "JSON text of a JobMetadata object"},
                                },
                                "required": ["video"],
                            }
                        },
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"video_url": {"type": "string"}, "metadata": metadata},
                                "required": ["video_url"],
                            }
                        },
                    },
                },
                "responses": {
                    "202": {"description": "Accepted: task_id, status, video_info", "content": job},
                    **errors,
                },
            }
        },
        "/jobs/status": {
            "get": {
                "tags": tags,
                "parameters": task_id,
                "description": "Status, progress and the segment captions done so far",
                "responses": {"200": {"description": "The job's status", "content": job}, **errors},
            }
        },
        "/jobs/get": {
            "get": {
                "tags": tags,
                "parameters": task_id,
                "description": "answer, segments (start, end, caption, error, frame_times), video_info, usage",
                "responses": {"200": {"description": "The result", "content": job}, **errors},
            }
        },
        "/jobs/cancel": {
            "post": {
                "tags": tags,
                "parameters": task_id,
                "description": "Cancel the job (it stops within a segment); PUT works too",
                "responses": {"200": {"description": "task_id and status", "content": job}, **errors},
            }
        },
        "/jobs/ask": {
            "post": {
                "tags": tags,
                "description": "A new question about a finished job, answered from its captions",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": REF.format(model="JobQuestion")}}},
                },
                "responses": {"200": {"description": "response, status, usage", "content": job}, **errors},
            }
        },
    }


def _add_schema(schemas: dict[str, Any], model: type[BaseModel]) -> None:
    schema = _openapi_30(model.model_json_schema(ref_template=REF))
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema


def _openapi_30(schema: Any) -> Any:
    """pydantic's JSON Schema (2020-12) in OpenAPI 3.0's dialect, which BentoML's document uses:
    ``nullable`` instead of a ``null`` type, boolean ``exclusiveMinimum``/``exclusiveMaximum``."""
    if isinstance(schema, list):
        return [_openapi_30(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: _openapi_30(value) for key, value in schema.items()}
    options = schema.get("anyOf")
    if options and {"type": "null"} in options:
        rest = [option for option in options if option != {"type": "null"}]
        del schema["anyOf"]
        schema.update(rest[0] if len(rest) == 1 else {"anyOf": rest})
        schema["nullable"] = True
    for bound, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(schema.get(bound), (int, float)) and not isinstance(schema.get(bound), bool):
            schema[inclusive] = schema.pop(bound)
            schema[bound] = True
    return schema


def _openai_paths() -> dict[str, Any]:
    error = {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {
                            k: {"type": "string", "nullable": True} for k in ("message", "type", "param", "code")
                        },
                    }
                },
            }
        }
    }
    errors = {status: {"description": text, "content": error} for status, text in ERROR_STATUSES.items()}
    return {
        "/v1/chat/completions": {
            "post": {
                "tags": ["OpenAI-compatible"],
                "description": (
                    "OpenAI's chat completions: messages with text, image_url and video_url parts; "
                    "stream for server-sent events; num_frames, fps, start_time, end_time, top_k as "
                    "extensions in the body (see README)"
                ),
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": {
                    "200": {
                        "description": "chat.completion, or chat.completion.chunk events when streamed",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "404": {"description": "Unknown model", "content": error},
                    **errors,
                },
            }
        },
        "/v1/models": {
            "get": {
                "tags": ["OpenAI-compatible"],
                "description": "The served model",
                "responses": {"200": {"description": "A list with the served model"}},
            }
        },
    }
