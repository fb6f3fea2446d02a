"""What a read model declares about its queries, and everything derived from it.

A read model that can be searched carries ``queries = Queries(...)``: the view its documents are
returned as, the text fields with their weights, the filters (term, terms, range, flag), the
sortable fields and the default sort, the facets and the metrics. ``searchable(model)`` turns
that declaration into:

- the query model (pydantic, ``extra="forbid"``: one field per declared parameter, with the
  constraints the server enforces, so the OpenAPI schema states them) and the page model;
- the engine's ``Spec`` (sorts, clauses), so the search keeps ``query_engine``'s contracts:
  user input only ever becomes values, sorts come from the declared whitelist, cursors are
  fingerprinted, results are views;
- read-your-writes: the model's ``reflects`` rules (stream type -> ``HELD`` or ``FRESH``; by
  default the model holds the streams of its own ``stream_type``);
- the lookup of one document by id.

The HTTP query API, ``cqrskit search``, ``verify``, ``rebuild`` and ``status`` are all derived
from these declarations. What they cannot express goes through ``QueryFunction``: a function
over the search client that an app registers with its own parameter and response models.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from elasticsearch import Elasticsearch
from pydantic import AfterValidator, BaseModel, Field, create_model

from cqrskit.infra.tokens import ConsistencyToken
from cqrskit.read_models import consistency
from cqrskit.read_models.consistency import FRESH, HELD, Awaited
from cqrskit.read_models.indices import alias
from cqrskit.read_models.model import ReadModel
from cqrskit.read_models.query_engine import (
    FLOAT, KEYWORD, NUMBER, RELEVANCE, Bucket, Cents, Clauses, Direction, Ident, Page, PageQuery, QueryError,
    QueryModel, Spec, Text, View, When, bool_query, fetch, ranges, search, text_query)

__all__ = [  # the public API of the read side's queries (with cqrskit.read_models.model and .source)
    "FRESH", "HELD", "Awaited", "Bucket", "Cents", "Direction", "Facet", "Filter", "Flag", "Ident", "Metric",
    "Page", "Queries", "QueryError", "QueryFunction", "QueryModel", "Range", "Searchable", "Term", "Text",
    "View", "When", "alias", "bool_query", "bounded_int", "reflects", "searchable",
]
HOLDERS_PAGE = 1000


def bounded_int(ge: int, le: int) -> Any:
    """The type of an integer parameter between ``ge`` and ``le``."""
    return Annotated[int, Field(ge=ge, le=le)]


# ---------------------------------------------------------------- declarations

@dataclass(frozen=True)
class Term:
    """Documents whose ``field`` equals the parameter's value (``many``: a list of at most ``many``
    values, any of them). ``type``: the parameter's type (``Ident`` by default; a ``Literal`` of
    the allowed values; ``bool``; ``int``...)."""

    field: str
    type: Any = Ident
    many: int = 0
    description: str = ""


@dataclass(frozen=True)
class Range:
    """Documents whose ``field`` compares with the parameter: ``op`` is gte, gt, lte or lt.
    ``type``: ``When`` (dates), ``Cents``, an annotated int..."""

    field: str
    op: Literal["gte", "gt", "lte", "lt"]
    type: Any
    description: str = ""


@dataclass(frozen=True)
class Flag:
    """A yes/no parameter choosing one of two fixed clauses (no user input reaches them)."""

    when_true: dict[str, Any]
    when_false: dict[str, Any]
    description: str = ""


Filter = Term | Range | Flag


@dataclass(frozen=True)
class Facet:
    """Counts of matching documents by the values of ``field`` (a keyword), the ``size`` largest."""

    field: str
    size: int = 10
    description: str = ""


@dataclass(frozen=True)
class Metric:
    """One number over the matching documents: ``op`` sum, avg, min or max of ``field``."""

    field: str
    op: Literal["sum", "avg", "min", "max"] = "sum"
    description: str = ""


@dataclass(frozen=True)
class Queries:
    """The query declarations of one read model (see the module docstring). ``sorts``: public
    name -> (field, default direction); a ``relevance`` sort is added when there are text fields."""

    view: type[View]
    description: str = ""
    text: dict[str, float] = field(default_factory=dict)
    text_description: str = ""
    filters: dict[str, Filter] = field(default_factory=dict)
    sorts: dict[str, tuple[str, Direction]] = field(default_factory=dict)
    default_sort: str | None = None
    facets: dict[str, Facet] = field(default_factory=dict)
    metrics: dict[str, Metric] = field(default_factory=dict)
    columns: tuple[str, ...] = ()  # the view's fields ``cqrskit search`` shows (default: all)


@dataclass(frozen=True)
class QueryFunction:
    """The escape hatch: a query the declarations cannot express (a histogram, a ranking...).
    ``run(es, prefix, params)`` returns a ``response``; ``read_model`` is the model the function
    reads (a ``consistent_with`` token waits for it); ``path`` is its HTTP path."""

    path: str
    read_model: str
    params: type[BaseModel]
    response: type[BaseModel]
    run: Callable[[Elasticsearch, str, Any], BaseModel]
    summary: str = ""


# ---------------------------------------------------------------- derived

def reflects(model: ReadModel) -> dict[str, str]:
    """Which stream types ``model`` reflects, and how (default: it holds its own stream type)."""
    return dict(getattr(model, "reflects", None) or {model.stream_type: HELD})


@dataclass(frozen=True)
class Searchable:
    """One read model with its queries derived: models, spec, search, lookup, read-your-writes."""

    model: ReadModel
    queries: Queries
    spec: Spec
    filter_model: type[QueryModel]
    query_model: type[PageQuery]
    page_model: type[Page[Any]]
    facets_model: type[BaseModel] | None
    aggs: dict[str, Any] | None

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def id_field(self) -> str:
        return self.model.id_field

    def search(self, es: Elasticsearch, prefix: str, q: Any) -> Any:
        """One page of ``q`` (a ``query_model``); raises QueryError for a bad or foreign cursor."""
        want = bool(getattr(q, "facets", False)) and self.aggs is not None
        items, total, cursor, response = search(es, prefix, self.spec, q, self.aggs if want else None)
        extra: dict[str, Any] = {}
        if want:
            extra = self._aggregations(response["aggregations"])
        return self.page_model(items=items, total=total, next_cursor=cursor, **extra)

    def _aggregations(self, aggs: dict[str, Any]) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.facets_model is not None:
            extra["facets"] = self.facets_model(**{
                name: [_bucket(b) for b in _facet_buckets(aggs, name)] for name in self.queries.facets})
        if self.queries.metrics:
            extra["metrics"] = {name: _metric_value(aggs[f"metric_{name}"]) for name in self.queries.metrics}
        return extra

    def get(self, es: Elasticsearch, prefix: str, doc_id: str) -> View | None:
        return fetch(es, prefix, self.spec, doc_id)

    def clauses(self, q: Any) -> Clauses:
        return self.spec.clauses(q)

    def awaited(self, token: ConsistencyToken) -> list[Awaited]:
        return consistency.awaited(reflects(self.model), token)

    def pending(self, es: Elasticsearch, prefix: str, conditions: list[Awaited]) -> list[Awaited]:
        return consistency.unmet(es, alias(prefix, self.name), self.id_field, conditions, HOLDERS_PAGE)

    def reflection(self, token: ConsistencyToken, timeout: float,
                   clock: Callable[[], float] = time.monotonic) -> consistency.Reflection:
        return consistency.Reflection(self.awaited(token), self.pending, timeout, clock)

    def wait_until_reflected(self, es: Elasticsearch, prefix: str, token: ConsistencyToken,
                             timeout: float) -> bool:
        """Block until the searchable documents reflect ``token``; False when ``timeout`` passed first."""
        return consistency.wait(self.reflection(token, timeout), es, prefix)


_BOUND: dict[int, tuple[ReadModel, Searchable]] = {}


def searchable(model: ReadModel) -> Searchable | None:
    """``model``'s queries derived (None when it declares none). Pure; memoised per model object."""
    queries: Queries | None = getattr(model, "queries", None)
    if queries is None:
        return None
    if id(model) not in _BOUND:
        _BOUND[id(model)] = (model, _derive(model, queries))
    return _BOUND[id(model)][1]


def _derive(model: ReadModel, declared: Queries) -> Searchable:
    fields = _mapping_fields(model.mappings.get("properties", {}))
    nested = frozenset(path for path, kind in fields.items() if kind == "nested")
    for name in [*declared.text, *(f.field for f in declared.filters.values() if not isinstance(f, Flag)),
                 *(s for s, _ in declared.sorts.values()), *(f.field for f in declared.facets.values()),
                 *(m.field for m in declared.metrics.values())]:
        if name not in fields:
            raise ValueError(f"read model {model.name!r}: {name!r} is not a field of its mapping")
    if fields.get("streams") != "object" or fields.get("streams.id") != "keyword" \
            or fields.get("streams.version") != "long":
        raise ValueError(f"read model {model.name!r}: its mapping needs the `streams` field as "
                         f"cqrskit.read_models.model.STREAMS declares it: read-your-writes reads it")
    _check_sorts(model.name, declared, fields, nested)
    sorts = {public: (path, _sort_kind(fields[path]), direction) for public, (path, direction) in declared.sorts.items()}
    if declared.text:
        sorts["relevance"] = RELEVANCE
    default = declared.default_sort or next(iter(declared.sorts), None)
    if default is None or default not in sorts:
        raise ValueError(f"read model {model.name!r}: declare sorts and a default_sort among them")
    title = "".join(part.capitalize() for part in model.name.replace("-", "_").split("_"))
    filter_model = _filter_model(title, declared)
    query_model = _query_model(title, declared, filter_model, list(sorts), default)
    facets_model = _facets_model(title, declared)
    page_model = _page_model(title, declared, facets_model)

    def clauses(q: Any) -> Clauses:
        return _clauses(declared, nested, q)

    spec = Spec(model.name, model.id_field, query_model, declared.view, sorts, default, clauses)
    return Searchable(model, declared, spec, filter_model, query_model, page_model, facets_model,
                      _aggs(declared, nested) if declared.facets or declared.metrics else None)


SORTABLE = {"keyword", "long", "integer", "short", "byte", "double", "float", "half_float", "scaled_float",
            "unsigned_long", "date", "date_nanos", "boolean"}


def _sort_kind(mapping_type: str) -> str:
    if mapping_type in ("keyword", "boolean"):
        return KEYWORD if mapping_type == "keyword" else NUMBER
    return FLOAT if mapping_type in ("double", "float", "half_float", "scaled_float") else NUMBER


def _check_sorts(model: str, declared: Queries, fields: dict[str, str], nested: frozenset[str]) -> None:
    """Sorts only on fields Elasticsearch sorts by their doc values, and none under a ``nested``
    field (a document holds many values there: which one would sort it is a choice the
    declaration cannot say); each refused with one line."""
    for public, (path, _direction) in declared.sorts.items():
        if _nested(path, nested):
            raise ValueError(f"read model {model!r}: sort {public!r} is on {path!r}, under the nested field "
                             f"{path.split('.')[0]!r}; sort on a top-level field instead (copy the value the "
                             "document should sort by into one)")
        if fields[path] not in SORTABLE:
            raise ValueError(f"read model {model!r}: sort {public!r} is on {path!r}, a {fields[path]} field; sorts "
                             "need a keyword, numeric, date or boolean field (a text field's .keyword sub-field)")


def _mapping_fields(properties: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Every field path of a mapping with its type (``text`` with a ``.keyword`` sub-field gives both)."""
    found: dict[str, str] = {}
    for name, spec in properties.items():
        path = prefix + name
        if "properties" in spec:
            found[path] = spec.get("type", "object")
            found.update(_mapping_fields(spec["properties"], path + "."))
            continue
        found[path] = spec.get("type", "object")
        for sub, sub_spec in spec.get("fields", {}).items():
            found[f"{path}.{sub}"] = sub_spec.get("type", "keyword")
    return found


def _canonical(values: list[Any]) -> list[Any]:
    return sorted(set(values))


def _filter_model(title: str, declared: Queries) -> type[QueryModel]:
    fields: dict[str, Any] = {}
    if declared.text:
        weights = " + ".join(f"{name} {weight:g}" for name, weight in declared.text.items())
        about = declared.text_description or f"Words that all appear in one of: {', '.join(declared.text)}."
        fields["text"] = (Text | None, Field(None, description=f"{about} Relevance: {weights}."))
    for name, f in declared.filters.items():
        if isinstance(f, Term) and f.many:
            kind = Annotated[list[f.type], AfterValidator(_canonical)]  # type: ignore[name-defined]
            fields[name] = (kind, Field(default_factory=list, max_length=f.many,
                                        description=f.description or "Any of these."))
        elif isinstance(f, Flag):
            fields[name] = (bool | None, Field(None, description=f.description))
        else:
            fields[name] = (f.type | None, Field(None, description=f.description))
    return create_model(f"{title}Filters", __base__=QueryModel, **fields)  # type: ignore[call-overload,no-any-return]


def _query_model(title: str, declared: Queries, filters: type[QueryModel], sorts: list[str],
                 default: str) -> type[PageQuery]:
    text = " Default: relevance with text, else " if declared.text else " Default: "
    fields: dict[str, Any] = {"sort": (Literal[tuple(sorts)] | None,  # type: ignore[valid-type]
                                       Field(None, description=f"Sort by.{text}{default}."))}
    if declared.facets or declared.metrics:
        what = ", ".join([*(f"counts by {n}" for n in declared.facets), *declared.metrics])
        fields["facets"] = (bool, Field(False, description=f"Add {what} over all matches."))
    return create_model(f"{title}Query", __base__=(filters, PageQuery), **fields)  # type: ignore[call-overload,no-any-return]


def _facets_model(title: str, declared: Queries) -> type[BaseModel] | None:
    if not declared.facets:
        return None
    fields: dict[str, Any] = {name: (list[Bucket], Field(description=f.description or f"The {f.size} most "
                                                         f"frequent values of {f.field} over the matches."))
                              for name, f in declared.facets.items()}
    return create_model(f"{title}Facets", **fields)  # type: ignore[call-overload,no-any-return]


def _page_model(title: str, declared: Queries, facets: type[BaseModel] | None) -> type[Page[Any]]:
    fields: dict[str, Any] = {}
    if facets is not None:
        fields["facets"] = (facets | None, None)
    if declared.metrics:
        fields["metrics"] = (dict[str, float | None] | None, Field(None, description="; ".join(
            f"{n}: {m.op} of {m.field}" for n, m in declared.metrics.items())))
    return create_model(f"{title}Page", __base__=Page[declared.view], **fields)  # type: ignore[call-overload,no-any-return]


def _nested(path: str, nested: frozenset[str]) -> str | None:
    head = path.split(".")[0]
    return head if head in nested else None


def _wrap(clause: dict[str, Any], path: str, nested: frozenset[str]) -> dict[str, Any]:
    outer = _nested(path, nested)
    return {"nested": {"path": outer, "query": clause}} if outer else clause


def _clauses(declared: Queries, nested: frozenset[str], q: Any) -> Clauses:
    must = [text_query(q.text, declared.text, nested)] if declared.text and q.text else []
    filters: list[dict[str, Any]] = []
    for name, f in declared.filters.items():
        value = getattr(q, name)
        if value is None or value == []:
            continue
        if isinstance(f, Flag):
            filters.append(f.when_true if value else f.when_false)
        elif isinstance(f, Range):
            filters += [_wrap(c, f.field, nested) for c in ranges(f.field, **{f.op: value})]
        elif isinstance(value, list):
            filters.append(_wrap({"terms": {f.field: value}}, f.field, nested))
        else:
            filters.append(_wrap({"term": {f.field: value}}, f.field, nested))
    return must, filters


def _aggs(declared: Queries, nested: frozenset[str]) -> dict[str, Any]:
    aggs: dict[str, Any] = {}
    for name, f in declared.facets.items():
        terms = {"terms": {"field": f.field, "size": f.size}}
        outer = _nested(f.field, nested)
        if outer:
            terms["aggs"] = {"docs": {"reverse_nested": {}}}
            aggs[f"facet_{name}"] = {"nested": {"path": outer}, "aggs": {"values": terms}}
        else:
            aggs[f"facet_{name}"] = terms
    for name, m in declared.metrics.items():
        metric = {m.op: {"field": m.field}}
        outer = _nested(m.field, nested)  # over every nested object of the matching documents
        aggs[f"metric_{name}"] = {"nested": {"path": outer}, "aggs": {"value": metric}} if outer else metric
    return aggs


def _metric_value(agg: dict[str, Any]) -> Any:
    return agg["value"]["value"] if isinstance(agg.get("value"), dict) else agg["value"]


def _bucket(b: dict[str, Any]) -> Bucket:
    """A facet's bucket: its readable key; documents, not nested objects, counted."""
    return Bucket(key=str(b.get("key_as_string", b["key"])), count=b["docs"]["doc_count"] if "docs" in b else b["doc_count"])


def _facet_buckets(aggs: dict[str, Any], name: str) -> list[dict[str, Any]]:
    agg = aggs[f"facet_{name}"]
    return agg["values"]["buckets"] if "values" in agg else agg["buckets"]
