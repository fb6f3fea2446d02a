"""The query API (Procfile: ``query``): typed search over the read models, over HTTP.

Contracts:
- holds a search client and nothing else: no write-store or broker setting is read (G11);
- routes, parameters and responses are derived from the read models' query declarations
  (``cqrskit.read_models.queryable``) plus the app's query functions; every error is an RFC 9457
  problem (``cqrskit.infra.problems``, the gateway's format too): 400 a bad cursor or consistency token, 404 no such
  document, 422 invalid parameters (with each error), 503 search unavailable, 504 not reflected
  in time; bad input never gets a 5xx;
- ``consistent_with=TOKEN`` (a command outcome's consistency token) makes a request wait until
  the read model reflects that write (G8), polling without blocking a thread, for at most
  ``wait`` seconds, never more than the server's cap, whatever the token or the client says;
- responses are the read models' views: no index names, versions or scores of
  Elasticsearch leak (except ``score`` when sorting by relevance).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, datetime
from typing import Annotated, Any, TypeVar, get_args, get_origin

import structlog
from elastic_transport import TransportError
from elasticsearch import ApiError, Elasticsearch
from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.concurrency import run_in_threadpool

from cqrskit.infra.problems import (PROBLEM_JSON, Problem, ProblemError, add_problem_handlers, problem_response,
                                   problem_type)
from cqrskit.infra.http_observe import observe
from cqrskit.infra.tracing_hooks import consistency_wait
from cqrskit.infra.settings import EMBEDDED_SEARCH, Settings
from cqrskit.infra.http_auth import (Authenticate, Authentication, current_key, declare_security,
                                    read_model_scope, server_limits)
from cqrskit.infra.tokens import ConsistencyToken, InvalidToken
from cqrskit.infra.utc import written_as_a_date
from cqrskit.read_models.consistency import ParkedNotes
from cqrskit.read_models.indices import alias
from cqrskit.read_models.model import ReadModel
from cqrskit.read_models.query_engine import Ident, QueryError
from cqrskit.read_models.queryable import QueryFunction, Searchable, searchable

log = structlog.get_logger("cqrskit.query")
MAX_WAIT_SECONDS = 10.0


# ---------------------------------------------------------------- problems

class NotReflectedProblem(Problem):
    read_model: str
    awaited: list[str] = Field(description="The writes the request waited for (stream at version).")
    pending: list[str] = Field(description="Those not reflected when the wait ended.")
    waited_seconds: float


def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": NotReflectedProblem if s == 504 else Problem, "content": {PROBLEM_JSON: {}}}
            for s in statuses}


async def _on_query_error(request: Request, exc: Exception) -> Response:
    return problem_response(request, Problem(type=problem_type("bad-cursor"), title="Bad cursor", status=400,
                                             detail=str(exc)))


async def _on_search_error(request: Request, exc: Exception) -> Response:
    """Search failures: a refused query is the request's fault (400); anything else is ours (503)."""
    status = exc.meta.status if isinstance(exc, ApiError) else None
    if status == 400:
        log.warning("query.refused", path=request.url.path, error=str(exc)[:500])
        return problem_response(request, Problem(type=problem_type("query-refused"), title="Query refused",
                                                 status=400, detail="the search server refused this query"))
    log.error("query.search_unavailable", path=request.url.path, status=status, error=str(exc)[:500])
    detail = ("the read model has no index (run `cqrskit setup`)" if status == 404
              else "the search server is unavailable; try again")
    return problem_response(request, Problem(type=problem_type("search-unavailable"), title="Search unavailable",
                                             status=503, detail=detail), {"Retry-After": "1"})


# ---------------------------------------------------------------- parameters

class Consistency(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    consistent_with: str | None = Field(
        None, min_length=1, max_length=20_000,
        description="A command outcome's consistency token: answer only once this read model reflects that "
                    "write (read-your-writes), or 504 when it does not within `wait` seconds.")
    wait: float = Field(5.0, ge=0, allow_inf_nan=False,
                        description=f"Seconds to wait for `consistent_with` (capped by the server: "
                                    f"{MAX_WAIT_SECONDS:g} s by default).")


DocId = Annotated[Ident, Path(description="The document id (the aggregate id).")]
P = TypeVar("P", bound=BaseModel)


def query_params(model: type[P]) -> Any:
    """``Depends`` on ``model`` validated from the query string, documented in the OpenAPI from the
    model's JSON Schema. (FastAPI's own query-model parsing costs ~0.3 ms a request; this ~0.03.)"""
    lists = {name for name, f in model.model_fields.items() if get_origin(f.annotation) is list}
    dates = {name for name, f in model.model_fields.items() if _is_a_date(f.annotation)}

    async def parse(request: Request) -> P:  # async: no thread hop for a few microseconds of work
        data: dict[str, Any] = {}
        for key, value in request.query_params.multi_items():
            if key in lists:
                data.setdefault(key, []).append(value)
            else:
                data[key] = value
        for name in dates & data.keys():  # a date is not a number of seconds, whatever the model says
            try:
                written_as_a_date(data[name])
            except ValueError as exc:
                raise RequestValidationError([{"type": "value_error", "loc": ("query", name),
                                               "msg": f"Value error, {exc}", "input": data[name]}]) from None
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("query", *e["loc"])} for e in exc.errors()]) from None

    return Depends(parse)


def _is_a_date(annotation: Any) -> bool:
    return annotation in (date, datetime) or any(_is_a_date(arg) for arg in get_args(annotation))


def documented(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI ``parameters`` for the fields of ``model`` (in the query; required as the model says)."""
    schema = model.model_json_schema()
    assert "$defs" not in schema, "query models hold plain fields only"
    required = set(schema.get("required", []))
    return {"parameters": [
        {"name": name, "in": "query", "required": name in required, "description": field.get("description", ""),
         "schema": {k: v for k, v in field.items() if k not in ("description", "title")}}
        for name, field in schema["properties"].items()]}


class Health(BaseModel):
    status: str
    documents: dict[str, int] = Field(description="Documents per read model the caller's key may read (none "
                                                  "without a key when authentication is on).")


# ---------------------------------------------------------------- the application

@dataclass
class QuerySide:
    es: Elasticsearch
    prefix: str
    secret: str
    max_wait: float
    parked: ParkedNotes | None = None  # why a wait timed out, when a pending document is parked (G7)


def _side(request: Request) -> QuerySide:
    return request.app.state.query_side  # type: ignore[no-any-return]


@consistency_wait  # a span saying how long read-your-writes waited
async def _reflected(side: QuerySide, model: Searchable, params: Consistency) -> None:
    """Return once ``model`` reflects the token (if any); ProblemError 400 or 504 otherwise."""
    if params.consistent_with is None:
        return
    try:
        token = ConsistencyToken.decode(params.consistent_with, side.secret)
    except InvalidToken as exc:
        raise ProblemError(400, "invalid-token", "Invalid consistency token", str(exc)) from None
    wait = min(params.wait, side.max_wait)
    reflection = model.reflection(token, wait)
    while not await run_in_threadpool(reflection.check, side.es, side.prefix):
        delay = reflection.next_delay()
        if delay is None:
            notes = await run_in_threadpool(side.parked, model.name, reflection.pending) if side.parked else []
            raise ProblemError(
                504, "not-reflected", "Write not reflected in time",
                f"the {model.name} read model did not reflect the token's writes within {wait:g} s "
                f"(pending: {', '.join(map(str, reflection.pending[:5]))}); "
                + ("; ".join(notes[:3]) if notes else "retry later"),
                read_model=model.name, awaited=[str(a) for a in reflection.awaited],
                pending=[str(a) for a in reflection.pending], waited_seconds=wait)
        await asyncio.sleep(delay)


async def _answer(request: Request, model: Searchable, params: Consistency, run: Callable[..., Any],
                  *args: Any) -> Response:
    side = _side(request)
    await _reflected(side, model, params)
    result = await run_in_threadpool(run, side.es, side.prefix, *args)
    return Response(result.model_dump_json(), media_type="application/json")


def _with_consistency(model: type[BaseModel]) -> type[Consistency]:
    """``model``'s parameters plus ``consistent_with`` and ``wait``."""
    return create_model(f"{model.__name__}Params", __base__=(model, Consistency))  # type: ignore[no-any-return]


def _search_route(app: FastAPI, path: str, model: Searchable, params: type[Consistency],
                  run: Callable[..., Any], response: type[BaseModel], summary: str, name: str) -> None:
    async def endpoint(request: Request, query: Any = query_params(params)) -> Response:
        return await _answer(request, model, query, run, query)

    app.add_api_route(path, endpoint, methods=["GET"], tags=[model.name], name=name, summary=summary,
                      response_model=response, responses=_responses(400, 422, 429, 503, 504),
                      openapi_extra=documented(params))


def _lookup_route(app: FastAPI, model: Searchable) -> None:
    async def endpoint(request: Request, doc_id: DocId, params: Any = query_params(Consistency)) -> Response:
        side = _side(request)
        await _reflected(side, model, params)
        view = await run_in_threadpool(model.get, side.es, side.prefix, doc_id)
        if view is None:
            raise ProblemError(404, "document-not-found", "Not Found",
                               f"no {model.name} document with id {doc_id!r}")
        return Response(view.model_dump_json(), media_type="application/json")

    app.add_api_route(f"/{model.name}/{{doc_id}}", endpoint, methods=["GET"], tags=[model.name],
                      name=f"get_{model.name}", summary=f"One {model.name} document by its id ({model.id_field})",
                      response_model=model.queries.view, responses=_responses(404, 400, 422, 429, 503, 504),
                      openapi_extra=documented(Consistency))


def _routes(app: FastAPI, models: dict[str, Searchable], functions: Sequence[QueryFunction]) -> None:
    for function in functions:  # before the lookups: /bookings/by-month is no booking "by-month"
        if function.read_model not in models:
            raise ValueError(f"query {function.path}: no searchable read model {function.read_model!r}")
        _search_route(app, function.path, models[function.read_model], _with_consistency(function.params),
                      function.run, function.response, function.summary or function.path,
                      getattr(function.run, "__name__", function.path))
    for model in models.values():
        _search_route(app, f"/{model.name}", model, _with_consistency(model.query_model), model.search,
                      model.page_model, f"Search {model.name}: {_abilities(model)}; page on with `cursor`",
                      f"search_{model.name}")
    for model in models.values():
        _lookup_route(app, model)

    @app.get("/health", tags=["health"], response_model=Health, responses=_responses(503),
             summary="Can the read models be searched?")
    async def health(request: Request) -> Response:
        """Every read model is counted (the search side answers); the counts are shown only to a
        key that may read the model, or to everyone when authentication is off (G11)."""
        side, key = _side(request), current_key(request)
        authenticated = request.app.state.authenticated
        counts = await run_in_threadpool(
            lambda: {m: side.es.count(index=alias(side.prefix, m))["count"] for m in models})
        shown = {m: n for m, n in counts.items() if not authenticated or (key is not None and key.may_read(m))}
        return Response(Health(status="ok", documents=shown).model_dump_json(),
                        media_type="application/json")


def _abilities(model: Searchable) -> str:
    declared = model.queries
    parts = [*(["full text"] if declared.text else []), *(["filters"] if declared.filters else []), "sort",
             *(["facets"] if declared.facets or declared.metrics else [])]
    return ", ".join(parts)


DESCRIPTION = """Typed search over the read models of the app `{app}` (Elasticsearch): {models}.

* Pages: `size` items (at most 100) and a `next_cursor`; pass it back as `cursor` with the same
  parameters for the next page. `total` counts exactly up to 10,000.
* Read-your-writes: give a command outcome's consistency token as `consistent_with`; the answer
  waits until the read model reflects that write, or is a 504 problem after `wait` seconds.
* Errors are problem details (RFC 9457, `application/problem+json`).
"""


def create_app(settings: Settings, read_models: Sequence[ReadModel], functions: Sequence[QueryFunction] = (), *,
               max_wait: float = MAX_WAIT_SECONDS, search_timeout: float = 30.0, title: str = "",
               authenticate: Authenticate | None = None, docs: bool = True,
               parked: ParkedNotes | None = None) -> FastAPI:
    """The query API over ``read_models`` (those that declare queries) and the app's query
    ``functions``. The search client is made at start-up and closed at shutdown. Only the search
    URL, the index prefix and the token secret are taken from ``settings`` (G11). ``max_wait`` caps
    every ``consistent_with`` wait; a search slower than ``search_timeout`` seconds answers 503.
    ``authenticate``: API keys; every request but ``/health`` needs one, and a read model's paths
    need that model in its scope (None: nobody is authenticated). Each client may hold at most
    ``settings.max_consistency_waits`` waits at once, and the process ``max_consistency_waits_total``. ``docs``: serve ``/docs``."""
    url, prefix, secret = settings.elasticsearch_url, settings.index_prefix, settings.token_secret
    models = {m.name: s for m in read_models if (s := searchable(m)) is not None}
    app_name = title or settings.app.rpartition(":")[0]
    tags = [*({"name": name, "description": m.queries.description or f"The {name} read model."}
              for name, m in models.items()), {"name": "health", "description": "Liveness of the search side."}]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if url == EMBEDDED_SEARCH:
            raise RuntimeError("the query API needs a search server: set CQRSKIT_ELASTICSEARCH_URL")
        from cqrskit.read_models.search import make_client

        es = make_client(url, timeout=search_timeout, settings=settings)
        app.state.query_side = QuerySide(es, prefix, secret, max_wait, parked)
        try:
            yield
        finally:
            es.close()

    description = DESCRIPTION.format(app=app_name, models=", ".join(models) or "none")
    app = FastAPI(title="cqrskit query API", version="1", description=description, openapi_tags=tags,
                  lifespan=lifespan, docs_url="/docs" if docs else None, redoc_url=None)
    app.add_middleware(Authentication, authenticate=authenticate, scope=read_model_scope(list(models)),
                       open_paths=("/health",), max_waits=settings.max_consistency_waits,
                       max_total_waits=settings.max_consistency_waits_total)
    add_problem_handlers(app, log, {QueryError: _on_query_error, ApiError: _on_search_error,
                                    TransportError: _on_search_error})
    app.state.authenticated = authenticate is not None
    _routes(app, models, functions)
    if authenticate is not None:
        plain = app.openapi
        app.openapi = lambda: declare_security(plain())  # type: ignore[method-assign]
    return observe(app, "query")  # access log and GET /metrics


def run_query_api(settings: Settings, read_models: Sequence[ReadModel], functions: Sequence[QueryFunction] = (),
                  host: str = "127.0.0.1", port: int = 8000, *, access_log: bool = False,
                  app: FastAPI | None = None) -> None:
    """Serve the query API with uvicorn until interrupted (logging as configured by the caller)."""
    import uvicorn

    if settings.elasticsearch_url == EMBEDDED_SEARCH:
        raise ValueError("the query API needs a search server: set CQRSKIT_ELASTICSEARCH_URL=http://... "
                         "(the embedded one lives inside `cqrskit demo`)")
    uvicorn.run(app or create_app(settings, read_models, functions), host=host, port=port, log_config=None,
                access_log=access_log, server_header=False, **server_limits(settings))
