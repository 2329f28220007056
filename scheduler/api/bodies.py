"""Request bodies read by hand, so that no input can reach a 500: bounded, decoded, parsed, named.

FastAPI's own body parsing would raise on deep nesting (RecursionError) and give no say
on the limits; here each route states the size it accepts and gets a 4xx problem for
anything else: too large (413), wrong content type (415), bad JSON or multipart (400).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from scheduler.api.problems import ApiProblem, field_error

JSON_TYPES: Final = frozenset({"application/json"})
JSONL_TYPES: Final = frozenset({"application/jsonl", "application/x-ndjson", "application/x-jsonlines"})
MULTIPART: Final = "multipart/form-data"
MAX_MULTIPART_FIELDS: Final = 8


def media_type(request: Request) -> str:
    """The request's media type, lowercase, without parameters."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def unsupported(request: Request, allowed: str) -> ApiProblem:
    """415 naming the content type sent and the ones allowed."""
    sent = request.headers.get("content-type")
    error = field_error("Content-Type", sent, f"must be {allowed}")
    return ApiProblem(415, f"Content-Type is {sent!r}; send {allowed}", errors=[error], kind="content-type")


def too_large(limit_bytes: int) -> ApiProblem:
    """413 naming the limit."""
    error = field_error("body", None, f"is larger than {limit_bytes} bytes")
    return ApiProblem(413, f"the body is larger than {limit_bytes} bytes", errors=[error], kind="too-large")


async def read_body(request: Request, *, limit_bytes: int) -> bytearray:
    """The whole body, refused with 413 once it passes `limit_bytes` (declared or streamed).

    A bytearray filled in place as the chunks arrive: joining a list of chunks held the
    body twice at the end (128 MiB for a 64 MiB batch), and the join ran on the event loop.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit_bytes:
        raise too_large(limit_bytes)
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit_bytes:
            raise too_large(limit_bytes)
        body += chunk
    return body


def parse_json_object(data: bytes | bytearray) -> dict[str, Any]:
    """The body as one JSON object; 400 naming why it is not one (bad JSON, bad UTF-8, too deep, not an object)."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise ApiProblem(400, "the JSON body is nested too deeply", kind="bad-json") from None
    except UnicodeDecodeError as e:
        raise ApiProblem(400, f"the body is not UTF-8 text ({e.reason} at byte {e.start})", kind="bad-json") from None
    except ValueError as e:
        raise ApiProblem(400, f"the body is not valid JSON: {e}", kind="bad-json") from None
    if not isinstance(value, dict):
        raise ApiProblem(400, f"the body is a JSON {type(value).__name__}; send one JSON object", kind="bad-json")
    return value


async def read_json_object(request: Request, *, limit_bytes: int) -> dict[str, Any]:
    """A JSON object body (Content-Type application/json)."""
    if media_type(request) not in JSON_TYPES:
        raise unsupported(request, "application/json")
    return parse_json_object(await read_body(request, limit_bytes=limit_bytes))


async def read_multipart_file(request: Request, *, field: str, limit_bytes: int) -> tuple[bytes, Mapping[str, str]]:
    """The bytes of the multipart file `field` and the form's text fields; 400 for a broken form."""
    if media_type(request) != MULTIPART:
        raise unsupported(request, f"{MULTIPART} with a `{field}` file")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit_bytes:
        raise too_large(limit_bytes)
    try:
        async with request.form(max_files=1, max_fields=MAX_MULTIPART_FIELDS, max_part_size=limit_bytes) as form:
            upload = form.get(field)
            texts = {k: v for k, v in form.items() if isinstance(v, str)}
            if not isinstance(upload, UploadFile):
                error = field_error(field, None, "is missing: send the file as a multipart part of this name")
                raise ApiProblem(422, f"`{field}` is missing from the form", errors=[error])
            data = await upload.read(limit_bytes + 1)
    except MultiPartException as e:
        raise ApiProblem(400, f"the multipart body cannot be read: {e.message}", kind="bad-multipart") from None
    if len(data) > limit_bytes:
        raise too_large(limit_bytes)
    return data, texts
