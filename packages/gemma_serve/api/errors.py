"""Errors are data: a status, a type, a message and the offending parameter, produced in one place
and rendered as OpenAI's error body (`{"error": {...}}`) for every route."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError
from starlette.responses import JSONResponse


@dataclass
class APIError(Exception):
    message: str
    status: int = 400
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    retry_after_s: int | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(message, 400, "invalid_request_error", param, code)


def overloaded(message: str = "the server is at capacity; retry shortly") -> APIError:
    return APIError(message, 503, "server_overloaded", None, "overloaded", retry_after_s=1)


def internal(message: str) -> APIError:
    return APIError(message, 500, "internal_error", None, None)


def from_validation_error(exc: ValidationError) -> APIError:
    """The first problem of a pydantic error, in words a client can act on."""
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "__root__")
        problems.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    first = exc.errors()[0]["loc"] if exc.errors() else ()
    param = ".".join(str(p) for p in first) or None
    return invalid("; ".join(problems), param=param)
