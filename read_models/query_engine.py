"""The generic query engine under the typed queries: safe input types, pages with opaque cursors,
filters and text clauses, and one search that turns a query model into a page of views.

Contracts:
- user input never becomes query DSL: words go into ``match`` queries as values, filters into
  ``term``/``terms``/``range`` values, and sort fields come from a whitelist (``Spec.sorts``);
  unknown parameters are refused (``extra="forbid"``), strings with control characters or lone
  surrogates too;
- text means: every word of ``text`` appears in one searched field, as the standard analyzer
  splits words; relevance is the sum of the weights of the fields that hold every word (a
  constant score: exact, reproducible, and safe for ``search_after``), ties broken by id;
- every sort ends with the document id, so ``search_after`` pages visit each match exactly once
  while the index stands still; the cursor is opaque (base64url JSON of the last sort values and
  a fingerprint of the query) and ``QueryError`` refuses it with any other query. No ``from``:
  the first page starts at the top, later pages at their cursor. ``size`` may change between pages;
- results are DTOs: index names, versions and the ``streams`` bookkeeping never leak out;
- ``total`` counts exactly up to ``TOTAL_CAP`` and says ``gte`` beyond.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from elasticsearch import Elasticsearch, NotFoundError
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, model_validator

from cqrskit.infra.utc import as_utc, written_as_a_date
from cqrskit.read_models.indices import alias
from cqrskit.read_models.model import iso

TOTAL_CAP = 10_000
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class QueryError(ValueError):
    """A well-formed request that cannot be answered as asked: a bad or foreign cursor (HTTP 400)."""


def _plain(value: str) -> str:
    if _FORBIDDEN.search(value):
        raise ValueError("control characters and lone surrogates are not allowed")
    return value


def _utc(value: datetime) -> datetime:
    try:
        return as_utc(value).astimezone(UTC)
    except OverflowError:
        raise ValueError("date out of range") from None


PLAIN = r"^[^\x00-\x1f\x7f-\x9f]*$"  # the schema says what _plain refuses (lone surrogates aside)
_DOCUMENTED = Field(json_schema_extra={"pattern": PLAIN})
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200), AfterValidator(_plain),
                 _DOCUMENTED]
Ident = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(_plain), _DOCUMENTED]
Cents = Annotated[int, Field(ge=0, le=10**15)]
When = Annotated[datetime, BeforeValidator(written_as_a_date), AfterValidator(_utc)]
Direction = Literal["asc", "desc"]


# ---------------------------------------------------------------- requests and responses

class QueryModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PageQuery(QueryModel):
    order: Direction | None = Field(None, description="Sort direction; the default depends on the sort. "
                                                       "sort=relevance needs text and is always descending.")
    size: int = Field(20, ge=1, le=100, description="Items per page (at most 100).")
    cursor: str | None = Field(None, min_length=1, max_length=2000, pattern=r"^[A-Za-z0-9_-]+$",
                               description="`next_cursor` of the previous page (same parameters).")

    @model_validator(mode="after")
    def _relevance(self) -> PageQuery:
        if getattr(self, "sort", None) == "relevance":
            if not getattr(self, "text", None):
                raise ValueError("sort=relevance needs text")
            if self.order == "asc":
                raise ValueError("sort=relevance is always descending")
        return self


class View(BaseModel):
    model_config = ConfigDict(extra="ignore")


V = TypeVar("V", bound=View)


class Total(BaseModel):
    value: int
    relation: Literal["eq", "gte"] = Field(description="gte: at least this many (counting stops at 10,000).")


class Bucket(BaseModel):
    key: str
    count: int


class Page(BaseModel, Generic[V]):
    items: list[V]
    total: Total
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


# ---------------------------------------------------------------- query building

NUMBER, FLOAT, KEYWORD, SCORE = "number", "float", "keyword", "score"  # NUMBER: longs and dates
RELEVANCE = ("_score", SCORE, "desc")
SortKey = tuple[str, str, str]  # (field, kind, direction)
Clauses = tuple[list[dict[str, Any]], list[dict[str, Any]]]  # (must, filter)


@dataclass(frozen=True)
class Spec:
    """One searchable read model: its index, its id field, its query and view, and its sorts."""

    name: str
    id_field: str
    query_type: type[PageQuery]
    view: type[View]
    sorts: dict[str, tuple[str, str, Direction]]  # public name -> (field, kind, default direction)
    default_sort: str
    clauses: Callable[[Any], Clauses]


def text_query(text: str, weights: dict[str, float], nested: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Documents where every word of ``text`` appears in one of the fields (a field under a
    ``nested`` path: in one nested object); the score is the sum of the weights of the fields that
    hold them all. Constant scores keep the relevance order exact and reproducible, and
    ``search_after`` on it exact on every server."""
    should = []
    for name, weight in weights.items():
        match = {"match": {name: {"query": text, "operator": "and"}}}
        clause = {"constant_score": {"filter": match, "boost": weight}}
        path = name.split(".")[0]
        wrapped = {"nested": {"path": path, "score_mode": "max", "query": clause}}
        should.append(wrapped if path in nested else clause)
    return {"bool": {"should": should, "minimum_should_match": 1}}


def ranges(field: str, **bounds: Any) -> list[dict[str, Any]]:
    bounds = {k: iso(v) if isinstance(v, datetime) else v for k, v in bounds.items() if v is not None}
    return [{"range": {field: bounds}}] if bounds else []


def bool_query(must: list[dict[str, Any]], filters: list[dict[str, Any]]) -> dict[str, Any]:
    return {"bool": {"must": must, "filter": filters}} if must or filters else {"match_all": {}}


def _sort(spec: Spec, q: Any) -> list[SortKey]:
    field, kind, default = spec.sorts[q.sort or ("relevance" if getattr(q, "text", None) else spec.default_sort)]
    return [(field, kind, q.order or default), (spec.id_field, KEYWORD, "asc")]


def _fingerprint(spec: Spec, q: Any, sort: list[SortKey]) -> str:
    fields = set(spec.query_type.model_fields) - {"cursor", "size", "facets", "sort", "order"}
    data = [spec.name, q.model_dump(mode="json", include=fields), sort]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:20]


def _encode_cursor(fingerprint: str, after: list[Any]) -> str:
    raw = json.dumps({"q": fingerprint, "after": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _decode_cursor(cursor: str, fingerprint: str, sort: list[SortKey]) -> list[Any]:
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, RecursionError):
        raise QueryError("cursor is not a cursor of this API: pass next_cursor unchanged") from None
    if not isinstance(data, dict) or not isinstance(data.get("after"), list):
        raise QueryError("cursor is not a cursor of this API: pass next_cursor unchanged")
    if data.get("q") != fingerprint:
        raise QueryError("cursor belongs to another query: repeat the parameters of the query that returned "
                         "it (only size may change), or start again without a cursor")
    after = data["after"]
    if len(after) != len(sort) or not all(_fits(v, kind) for v, (_, kind, _) in zip(after, sort, strict=True)):
        raise QueryError("cursor is damaged: pass next_cursor unchanged")
    return after


LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1  # a missing long or date sorts as one of these
INFINITE = {"Infinity": math.inf, "-Infinity": -math.inf}  # a missing double, written as a string


def _fits(value: Any, kind: str) -> bool:
    """Whether ``value`` is a sort value the server can return for ``kind``: a keyword (or null:
    missing), a long or a date's epoch milliseconds (-2^63 and 2^63-1 for missing ones), a double
    (or a whole one written as a long), or a missing double's ±Infinity (carried as a string,
    which search_after accepts)."""
    if kind == KEYWORD:
        return value is None or (isinstance(value, str) and len(value) <= 1000)
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return LONG_MIN <= value <= LONG_MAX
    if isinstance(value, float):
        return kind in (FLOAT, SCORE) and math.isfinite(value)
    return kind == FLOAT and value in INFINITE


def _after(values: list[Any]) -> list[Any]:
    """The sort values of a hit as a cursor carries them: JSON has no Infinity, so ±Infinity
    (a missing double) become the strings Elasticsearch's ``search_after`` parses back."""
    return [("Infinity" if v > 0 else "-Infinity") if isinstance(v, float) and math.isinf(v) else v for v in values]


def search(es: Elasticsearch, prefix: str, spec: Spec, q: Any,
           aggs: dict[str, Any] | None = None) -> tuple[list[Any], Total, str | None, Any]:
    """One page of ``q`` over ``spec``'s read model: (views, total, next cursor, raw response).
    Raises QueryError for a bad or foreign cursor."""
    sort = _sort(spec, q)
    fingerprint = _fingerprint(spec, q, sort)
    after = _decode_cursor(q.cursor, fingerprint, sort) if q.cursor else None
    response = es.search(
        index=alias(prefix, spec.name), query=bool_query(*spec.clauses(q)), size=q.size + 1,
        sort=[{field: {"order": direction}} for field, _, direction in sort], search_after=after,
        track_total_hits=TOTAL_CAP, source_excludes=["streams"], aggs=aggs)
    hits = response["hits"]["hits"]
    more, hits = len(hits) > q.size, hits[: q.size]
    scored = sort[0][1] == SCORE
    items = [spec.view.model_validate({**h["_source"], "score": h.get("_score") if scored else None})
             for h in hits]
    total = Total(**response["hits"]["total"])
    return items, total, _encode_cursor(fingerprint, _after(hits[-1]["sort"])) if more else None, response


def fetch(es: Elasticsearch, prefix: str, spec: Spec, doc_id: str) -> View | None:
    """One document as its view, or None when there is none with that id (a missing index raises)."""
    try:
        response = es.get(index=alias(prefix, spec.name), id=doc_id, source_excludes=["streams"])
    except NotFoundError as exc:
        if isinstance(exc.body, dict) and exc.body.get("found") is False:
            return None
        raise
    return spec.view.model_validate(response["_source"])
