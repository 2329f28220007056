"""RFC 9457 problem details: every error the API returns, naming the field and the value.

`ApiProblem` is raised by routes; the handlers installed by `install_problem_handlers` turn
it, FastAPI's validation errors, Starlette's HTTP errors and anything unexpected into
`application/problem+json` with the right status.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import CapReached, InvalidInput, NotFound, QuotaExceeded, TransientError

log = logging.getLogger(__name__)
PROBLEM_TYPE: Final = "application/problem+json"
TYPE_BASE: Final = "https://ipab.dev/problems/"
MAX_VALUE_CHARS: Final = 200
RETRY_AFTER_UNAVAILABLE_S: Final = 5
RETRY_AFTER_FULL_S: Final = 30  # a tenant at its queued-jobs cap: some of its jobs run meanwhile
TITLES: Final = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}


def shown(value: Any) -> Any:
    """A value fit to echo back: JSON scalars as they are, anything else as a short repr."""
    if value is None or isinstance(value, bool | int | float):
        return value
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


class ApiProblem(Exception):
    """Raised by a route to answer with a problem: status, detail, and the fields at fault."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        errors: Sequence[Mapping[str, Any]] = (),
        headers: Mapping[str, str] | None = None,
        kind: str | None = None,
        extensions: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = list(errors)
        self.headers = dict(headers or {})
        self.kind = kind
        self.extensions = dict(extensions or {})  # RFC 9457 extension members of this problem type

    def as_data(self) -> dict[str, Any]:
        """The problem as plain data (JSON types only), to cross a process boundary; `from_data` reads it."""
        fields = ("status", "detail", "errors", "headers", "kind", "extensions")
        return {name: getattr(self, name) for name in fields}

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> ApiProblem:
        """The problem `as_data` wrote."""
        return cls(
            data["status"],
            data["detail"],
            errors=data["errors"],
            headers=data["headers"],
            kind=data["kind"],
            extensions=data["extensions"],
        )


def field_error(field: str, value: Any, reason: str) -> dict[str, Any]:
    """One entry of a problem's `errors`."""
    return {"field": field, "value": shown(value), "reason": reason}


def invalid(field: str, value: Any, reason: str, *, status: int = 422) -> ApiProblem:
    """A problem about one field: `field is value: reason`."""
    return ApiProblem(status, f"{field}: {reason} (got {shown(value)!r})", errors=[field_error(field, value, reason)])


def from_invalid_input(e: InvalidInput, *, status: int = 422) -> ApiProblem:
    """A problem from the validator's `InvalidInput`."""
    return invalid(e.field, e.value, e.allowed, status=status)


def not_found(what: str, ident: str) -> ApiProblem:
    """404, worded the same whether the thing is absent or another tenant's."""
    return ApiProblem(404, f"no {what} has id {shown(ident)!r}", errors=[field_error("id", ident, f"no such {what}")])


def problem_response(request: Request, problem: ApiProblem) -> JSONResponse:
    """The problem as `application/problem+json`."""
    body: dict[str, Any] = {
        "type": TYPE_BASE + (problem.kind or str(problem.status)),
        "title": TITLES.get(problem.status, "Error"),
        "status": problem.status,
        "detail": problem.detail,
        "instance": request.url.path,
    }
    if problem.errors:
        body["errors"] = problem.errors
    body.update(problem.extensions)
    return JSONResponse(body, status_code=problem.status, headers=problem.headers, media_type=PROBLEM_TYPE)


def cap_problem(e: CapReached) -> ApiProblem:
    """429 with Retry-After for a tenant's cap, with its numbers (held, adding, maximum) and setting."""
    error = field_error(e.cap, e.held, f"adding {e.adding} would pass the cap of {e.maximum} ({e.setting})")
    return ApiProblem(429, str(e), errors=[error], headers={"Retry-After": str(RETRY_AFTER_FULL_S)}, kind="queue-full")


def quota_problem(e: QuotaExceeded) -> ApiProblem:
    """429 `quota-exceeded`: the quota, its limit, what is used, what was asked, when it resets
    (members of the problem, and Retry-After until then)."""
    retry_after_s = max(1, math.ceil((e.resets_at - datetime.now(UTC).replace(tzinfo=None)).total_seconds()))
    members = {
        "tenant": e.tenant,
        "quota": e.quota,
        "limit": e.limit,
        "used": e.used,
        "requested": e.requested,
        "resets_at": e.resets_at.isoformat() + "Z",
    }
    headers = {"Retry-After": str(retry_after_s)}
    return ApiProblem(429, str(e), headers=headers, kind="quota-exceeded", extensions=members)


def transient_problem(e: TransientError) -> ApiProblem:
    """503 with Retry-After: a service (SQL, Redis, S3) did not answer; nothing was done."""
    headers = {"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)}
    return ApiProblem(503, str(e), headers=headers, kind="unavailable")


def known_problem(e: Exception) -> ApiProblem | None:
    """The problem the handlers answer `e` with, for every error but the unexpected (None)."""
    if isinstance(e, ApiProblem):
        return e
    if isinstance(e, NotFound):
        return not_found(e.kind, e.ref)
    if isinstance(e, QuotaExceeded):
        return quota_problem(e)
    if isinstance(e, CapReached):
        return cap_problem(e)
    if isinstance(e, TransientError):
        return transient_problem(e)
    return None


def _validation_problem(errors: Sequence[Any]) -> ApiProblem:
    found = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        found.append(field_error(".".join(loc) or "body", err.get("input"), str(err.get("msg", "is invalid"))))
    if any(err.get("type") == "json_invalid" for err in errors):
        return ApiProblem(400, "the body is not valid JSON", errors=found, kind="bad-json")
    first = found[0] if found else field_error("body", None, "is invalid")
    return ApiProblem(422, f"{first['field']}: {first['reason']} (got {first['value']!r})", errors=found)


async def _on_cap(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CapReached)
    return problem_response(request, cap_problem(exc))


def install_problem_handlers(app: FastAPI) -> None:
    """Make every error a problem+json; none escapes as a bare 500."""

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiProblem)
        return problem_response(request, exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return problem_response(request, _validation_problem(exc.errors()))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        detail = str(exc.detail) if exc.detail else TITLES.get(exc.status_code, "Error")
        problem = ApiProblem(exc.status_code, detail, headers=exc.headers)
        return problem_response(request, problem)

    async def on_not_found(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, NotFound)
        return problem_response(request, not_found(exc.kind, exc.ref))

    async def on_quota(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, QuotaExceeded)
        return problem_response(request, quota_problem(exc))

    async def on_transient(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, TransientError)
        return problem_response(request, transient_problem(exc))

    async def on_anything(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return problem_response(request, ApiProblem(500, "unexpected error; it is logged", kind="internal"))

    app.add_exception_handler(ApiProblem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(NotFound, on_not_found)
    app.add_exception_handler(QuotaExceeded, on_quota)
    app.add_exception_handler(CapReached, _on_cap)
    app.add_exception_handler(TransientError, on_transient)
    app.add_exception_handler(Exception, on_anything)
