"""The query API (Procfile: ``query``): typed search over the read models, over HTTP.

Contracts:
- holds a search client and nothing else: no write-store or broker setting is read (G11);
- parameters are validated by the models of ``cqrskit.read_models.queries``; every error is an RFC 9457
  problem (``cqrskit.infra.problems``, the gateway's format too): 400 a bad cursor or consistency token, 404 no such
  document, 422 invalid parameters (with each error), 503 search unavailable, 504 not reflected
  in time; bad input never gets a 5xx;
- ``consistent_with=TOKEN`` (a command outcome's consistency token) makes a request wait until
  the read model reflects that write (G8), polling without blocking a thread, for at most
  ``wait`` seconds, never more than the server's cap, whatever the token or the client says;
- responses are the DTOs of ``cqrskit.read_models.queries``: no index names, versions or scores of
  Elasticsearch leak (except ``score`` when sorting by relevance).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, get_origin

import structlog
from elastic_transport import TransportError
from elasticsearch import ApiError, Elasticsearch
from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from cqrskit.infra.problems import (PROBLEM_JSON, Problem, ProblemError, add_problem_handlers, problem_response,
                                   problem_type)
from cqrskit.infra.settings import EMBEDDED_SEARCH, Settings
from cqrskit.infra.tokens import ConsistencyToken, InvalidToken
from cqrskit.read_models import queries as q
from cqrskit.read_models.indices import alias

log = structlog.get_logger("cqrskit.query")
MAX_WAIT_SECONDS = 10.0
MODELS = ("orders", "products", "customers")


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


class OrdersParams(q.OrderQuery, Consistency):
    pass


class ProductsParams(q.ProductQuery, Consistency):
    pass


class CustomersParams(q.CustomerQuery, Consistency):
    pass


class OrderStatsParams(q.OrderStatsQuery, Consistency):
    pass


class TopProductsParams(q.TopProductsQuery, Consistency):
    pass


DocId = Annotated[q.Ident, Path(description="The document id (the aggregate id).")]
P = TypeVar("P", bound=BaseModel)


def query_params(model: type[P]) -> Any:
    """``Depends`` on ``model`` validated from the query string, documented in the OpenAPI from the
    model's JSON Schema. (FastAPI's own query-model parsing costs ~0.3 ms a request; this ~0.03.)"""
    lists = {name for name, f in model.model_fields.items() if get_origin(f.annotation) is list}

    async def parse(request: Request) -> P:  # async: no thread hop for a few microseconds of work
        data: dict[str, Any] = {}
        for key, value in request.query_params.multi_items():
            if key in lists:
                data.setdefault(key, []).append(value)
            else:
                data[key] = value
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("query", *e["loc"])} for e in exc.errors()]) from None

    return Depends(parse)


def documented(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI ``parameters`` for the fields of ``model`` (every one optional, in the query)."""
    schema = model.model_json_schema()
    assert "$defs" not in schema, "query models hold plain fields only"
    return {"parameters": [
        {"name": name, "in": "query", "required": False, "description": field.get("description", ""),
         "schema": {k: v for k, v in field.items() if k not in ("description", "title")}}
        for name, field in schema["properties"].items()]}


class Health(BaseModel):
    status: str
    documents: dict[str, int] = Field(description="Documents per read model.")


# ---------------------------------------------------------------- the application

@dataclass
class QuerySide:
    es: Elasticsearch
    prefix: str
    secret: str
    max_wait: float


def _side(request: Request) -> QuerySide:
    return request.app.state.query_side  # type: ignore[no-any-return]


async def _reflected(side: QuerySide, model: str, params: Consistency) -> None:
    """Return once ``model`` reflects the token (if any); ProblemError 400 or 504 otherwise."""
    if params.consistent_with is None:
        return
    try:
        token = ConsistencyToken.decode(params.consistent_with, side.secret)
    except InvalidToken as exc:
        raise ProblemError(400, "invalid-token", "Invalid consistency token", str(exc)) from None
    wait = min(params.wait, side.max_wait)
    reflection = q.Reflection(model, token, wait)
    while not await run_in_threadpool(reflection.check, side.es, side.prefix):
        delay = reflection.next_delay()
        if delay is None:
            raise ProblemError(
                504, "not-reflected", "Write not reflected in time",
                f"the {model} read model did not reflect the token's writes within {wait:g} s "
                       f"(pending: {', '.join(map(str, reflection.pending[:5]))}); retry later",
                read_model=model, awaited=[str(a) for a in reflection.awaited],
                pending=[str(a) for a in reflection.pending], waited_seconds=wait)
        await asyncio.sleep(delay)


async def _answer(request: Request, model: str, params: Consistency, run: Callable[..., Any],
                  *args: Any) -> Response:
    side = _side(request)
    await _reflected(side, model, params)
    result = await run_in_threadpool(run, side.es, side.prefix, *args)
    return Response(result.model_dump_json(), media_type="application/json")


async def _one(request: Request, model: str, doc_id: str, params: Consistency) -> Response:
    side = _side(request)
    await _reflected(side, model, params)
    view = await run_in_threadpool(q.get_document, side.es, side.prefix, model, doc_id)
    if view is None:
        raise ProblemError(404, "document-not-found", "Not Found", f"no {model[:-1]} with id {doc_id!r}")
    return Response(view.model_dump_json(), media_type="application/json")


# path, tag, the read model it reads (awaited for consistent_with), parameters, query, response, summary
SEARCHES: list[tuple[str, str, str, type[Consistency], Callable[..., Any], type[BaseModel], str]] = [
    ("/orders", "orders", "orders", OrdersParams, q.search_orders, q.OrderPage,
     "Search orders: full text, filters, sort, facets; page on with `cursor`"),
    ("/orders/revenue", "orders", "orders", OrderStatsParams, q.revenue, q.Revenue,
     "Revenue of paid and shipped orders per day (week, month) of placement"),
    ("/orders/status-over-time", "orders", "orders", OrderStatsParams, q.status_over_time, q.StatusOverTime,
     "Orders per day (week, month) of placement, by their current status"),
    ("/products", "products", "products", ProductsParams, q.search_products, q.ProductPage,
     "Search products: full text, filters, sort"),
    ("/products/top", "products", "orders", TopProductsParams, q.top_products, q.TopProducts,
     "Best sellers by units or revenue over the paid and shipped orders that match (from the orders model)"),
    ("/customers", "customers", "customers", CustomersParams, q.search_customers, q.CustomerPage,
     "Search customers: full text, filters, sort"),
]


def _search_route(app: FastAPI, path: str, tag: str, model: str, params_type: type[Consistency],
                  run: Callable[..., Any], response: type[BaseModel], summary: str) -> None:
    async def endpoint(request: Request, params: Any = query_params(params_type)) -> Response:
        return await _answer(request, model, params, run, params)

    app.add_api_route(path, endpoint, methods=["GET"], tags=[tag], name=run.__name__, summary=summary,
                      response_model=response, responses=_responses(400, 422, 503, 504),
                      openapi_extra=documented(params_type))


def _routes(app: FastAPI) -> None:
    for route in SEARCHES:
        _search_route(app, *route)
    one = {"responses": _responses(404, 400, 422, 503, 504), "openapi_extra": documented(Consistency)}
    consistency = query_params(Consistency)

    @app.get("/orders/{order_id}", tags=["orders"], response_model=q.OrderView, summary="One order", **one)
    async def get_order(request: Request, order_id: DocId, params: Any = consistency) -> Response:
        return await _one(request, "orders", order_id, params)

    @app.get("/products/{product_id}", tags=["products"], response_model=q.ProductView, summary="One product",
             **one)
    async def get_product(request: Request, product_id: DocId, params: Any = consistency) -> Response:
        return await _one(request, "products", product_id, params)

    @app.get("/customers/{customer_id}", tags=["customers"], response_model=q.CustomerView,
             summary="One customer", **one)
    async def get_customer(request: Request, customer_id: DocId, params: Any = consistency) -> Response:
        return await _one(request, "customers", customer_id, params)

    @app.get("/health", tags=["health"], response_model=Health, responses=_responses(503),
             summary="Can the read models be searched?")
    async def health(request: Request) -> Response:
        side = _side(request)
        counts = await run_in_threadpool(
            lambda: {m: side.es.count(index=alias(side.prefix, m))["count"] for m in MODELS})
        return Response(Health(status="ok", documents=counts).model_dump_json(),
                        media_type="application/json")


DESCRIPTION = """Typed search over cqrskit's read models (Elasticsearch): orders, products, customers.

* Pages: `size` items (at most 100) and a `next_cursor`; pass it back as `cursor` with the same
  parameters for the next page. `total` counts exactly up to 10,000.
* Read-your-writes: give a command outcome's consistency token as `consistent_with`; the answer
  waits until the read model reflects that write, or is a 504 problem after `wait` seconds.
* Errors are problem details (RFC 9457, `application/problem+json`).
"""
TAGS = [
    {"name": "orders", "description": "Orders with their customer and lines (denormalised)."},
    {"name": "products", "description": "Products with stock and units sold."},
    {"name": "customers", "description": "Customers with their order count and lifetime value."},
    {"name": "health", "description": "Liveness of the search side."},
]


def create_app(settings: Settings, *, max_wait: float = MAX_WAIT_SECONDS,
               search_timeout: float = 30.0) -> FastAPI:
    """The query API. The search client is made at start-up and closed at shutdown. Only the search
    URL, the index prefix and the token secret are taken from ``settings`` (G11). ``max_wait`` caps
    every ``consistent_with`` wait; a search slower than ``search_timeout`` seconds answers 503."""
    url, prefix, secret = settings.elasticsearch_url, settings.index_prefix, settings.token_secret

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if url == EMBEDDED_SEARCH:
            raise RuntimeError("the query API needs a search server: set CQRSKIT_ELASTICSEARCH_URL")
        from cqrskit.read_models.search import make_client

        es = make_client(url, timeout=search_timeout)
        app.state.query_side = QuerySide(es, prefix, secret, max_wait)
        try:
            yield
        finally:
            es.close()

    app = FastAPI(title="cqrskit query API", version="1", description=DESCRIPTION, openapi_tags=TAGS,
                  lifespan=lifespan)
    add_problem_handlers(app, log, {q.QueryError: _on_query_error, ApiError: _on_search_error,
                                    TransportError: _on_search_error})
    _routes(app)
    return app


def run_query_api(settings: Settings, host: str = "127.0.0.1", port: int = 8000, *,
                  access_log: bool = False) -> None:
    """Serve the query API with uvicorn until interrupted (logging as configured by the caller)."""
    import uvicorn

    if settings.elasticsearch_url == EMBEDDED_SEARCH:
        raise ValueError("the query API needs a search server: set CQRSKIT_ELASTICSEARCH_URL=http://... "
                         "(the embedded one lives inside `cqrskit demo`)")
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None, access_log=access_log,
                server_header=False)
