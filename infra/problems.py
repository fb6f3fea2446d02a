"""Problem details (RFC 9457, ``application/problem+json``): the one error format of both HTTP
APIs, the command gateway and the query API.

Contracts:
- ``type`` is ``https://cqrskit.dev/problems/<slug>`` (``about:blank`` for plain HTTP errors);
  ``title``, ``status`` and ``detail`` are always present, ``instance`` is the request's path;
- validation errors are an ``errors`` extension member, each ``{loc, msg, type}`` with ``loc`` a
  list as pydantic gives it (``["query", "size"]``, ``["payload", "nights", 0]``), plus a
  JSON ``pointer`` for errors in a JSON body; other extension members are the API's own;
- nothing of the request's input is echoed, and every problem can be encoded (no lone surrogates);
- ``add_problem_handlers`` answers every error of an app as a problem: ``ProblemError`` as
  raised, parameter errors 422, HTTP errors with their status, anything else 500 (logged).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from cqrskit.infra.validation import MAX_ERRORS, FieldError, safe_text

PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPES = "https://cqrskit.dev/problems/"

__all__ = ["PROBLEM_JSON", "PROBLEM_TYPES", "FieldError", "Problem", "ProblemError", "add_problem_handlers",
           "problem_response", "problem_type", "request_errors"]


def problem_type(slug: str) -> str:
    """The type URI of the problem named ``slug``, e.g. ``invalid-command``."""
    return PROBLEM_TYPES + slug


class Problem(BaseModel):
    """RFC 9457 problem details. APIs document their extension members in subclasses."""

    model_config = ConfigDict(extra="allow")
    type: str = Field("about:blank", description=f"A URI naming the kind of problem ({PROBLEM_TYPES}...).")
    title: str
    status: int
    detail: str
    instance: str | None = Field(None, description="The path of the request that met the problem.")
    errors: list[FieldError] | None = Field(None, description="Every validation error, with its path.")


class ProblemError(Exception):
    """Answered as a problem document of type ``problem_type(slug)``; ``extensions`` become members
    of it (None ones are left out); ``headers`` go with the response."""

    def __init__(self, status: int, slug: str, title: str, detail: str, *,
                 headers: dict[str, str] | None = None, **extensions: Any) -> None:
        super().__init__(detail)
        self.problem = Problem(type=problem_type(slug), title=title, status=status, detail=detail, **extensions)
        self.headers = headers

    @property
    def status(self) -> int:
        return self.problem.status

    @property
    def detail(self) -> str:
        return self.problem.detail


def problem_response(request: Request, problem: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    """``problem`` as the response to ``request``, with its path as ``instance``."""
    content = problem.model_dump(mode="json", exclude_none=True)
    content.setdefault("instance", safe_text(request.url.path, 1000))
    return JSONResponse(content, status_code=problem.status, media_type=PROBLEM_JSON, headers=headers)


def request_errors(exc: RequestValidationError) -> list[FieldError]:
    """FastAPI's parameter errors (pydantic's, under ``path``/``query``/...), the input not echoed."""
    return [FieldError.at(e.get("loc", ()), str(e.get("msg", "")), str(e.get("type", "")))
            for e in exc.errors()[:MAX_ERRORS]]


def add_problem_handlers(app: FastAPI, log: Any, handlers: dict[Any, Callable[..., Any]] | None = None) -> None:
    """Answer every error of ``app`` as a problem. ``handlers``: the API's own, for its own errors
    (each ``(request, exc) -> Response``); ``log`` (structlog) hears of the 500s."""

    async def on_problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(request, exc.problem, exc.headers)

    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = request_errors(exc)
        detail = "; ".join(f"{_parameter(e)}: {e.msg}" for e in errors[:5]) or "invalid request parameters"
        problem = Problem(type=problem_type("invalid-parameters"), title="Invalid request parameters",
                          status=422, detail=detail, errors=errors)
        return problem_response(request, problem)

    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        detail = safe_text(str(exc.detail), 500)
        return problem_response(request, Problem(title=detail, status=exc.status_code, detail=detail), exc.headers)

    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("http.unexpected_error", path=request.url.path, exc_info=exc)
        problem = Problem(title="Internal error", status=500, detail=f"{app.title} failed unexpectedly (a bug)")
        return problem_response(request, problem)

    for error, handler in {ProblemError: on_problem, RequestValidationError: on_invalid, HTTPException: on_http,
                           **(handlers or {}), Exception: on_bug}.items():
        app.add_exception_handler(error, handler)


def _parameter(error: FieldError) -> str:
    """``size`` for ``["query", "size"]``; the whole path when it is not under a parameter kind."""
    return ".".join(map(str, error.loc[1:])) or ".".join(map(str, error.loc))
