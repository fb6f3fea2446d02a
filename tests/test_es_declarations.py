"""Declarations Elasticsearch would refuse, refused at declaration with one line; metrics on
nested fields sent inside a ``nested`` aggregation, as Elasticsearch needs them (G10: a bad
declaration gets one clear error, not a 400 from the server at the first query)."""

from __future__ import annotations

import uuid
from typing import Any, ClassVar

import pytest

from cqrskit.read_models.model import STREAMS
from cqrskit.read_models.query_engine import View
from cqrskit.read_models.queryable import Metric, Queries, searchable
from cqrskit.read_models.search import make_client


class OrderView(View):
    id: str


def model(**queries: Any) -> Any:
    class Orders:
        name: ClassVar[str] = "orders"
        stream_type: ClassVar[str] = "order"
        id_field: ClassVar[str] = "id"
        mappings: ClassVar[dict[str, Any]] = {"dynamic": "strict", "properties": {
            "id": {"type": "keyword"}, "note": {"type": "text"}, "total": {"type": "long"},
            "lines": {"type": "nested", "properties": {"sku": {"type": "keyword"}, "quantity": {"type": "integer"}}},
            "streams": STREAMS}}

    Orders.queries = Queries(view=OrderView, **{"sorts": {"id": ("id", "asc")}, "default_sort": "id", **queries})
    return Orders()


@pytest.mark.parametrize("sorts, message", [
    ({"sku": ("lines.sku", "asc")}, "read model 'orders': sort 'sku' is on 'lines.sku', under the nested field 'lines'"),
    ({"note": ("note", "asc")}, "read model 'orders': sort 'note' is on 'note', a text field; sorts need a keyword"),
])
def test_a_sort_elasticsearch_cannot_run_is_refused_at_declaration(sorts: dict, message: str) -> None:  # type: ignore[type-arg]
    """G10: a sort under a nested field (Elasticsearch answers 400 without a nested context) or
    on a text field (no doc values) is one ValueError naming the read model, the sort and why."""
    with pytest.raises(ValueError) as refused:
        searchable(model(sorts=sorts, default_sort=next(iter(sorts))))
    assert str(refused.value).startswith(message)


def test_a_metric_on_a_nested_field_is_summed_over_the_nested_objects(search_url: str) -> None:
    """G6's read side answers right: a metric on ``lines.quantity`` runs in a ``nested``
    aggregation (without it Elasticsearch and osmem both answer null)."""
    declared = searchable(model(metrics={"units": Metric("lines.quantity", "sum")}))
    assert declared is not None and declared.aggs == {
        "metric_units": {"nested": {"path": "lines"}, "aggs": {"value": {"sum": {"field": "lines.quantity"}}}}}
    es, prefix = make_client(search_url), f"m{uuid.uuid4().hex[:10]}"
    es.indices.create(index=f"{prefix}-orders-v1", aliases={f"{prefix}-orders": {}}, mappings=declared.model.mappings)
    try:
        for i, quantities in enumerate([[1, 2], [4]]):
            es.index(index=f"{prefix}-orders", id=f"o{i}", refresh=True,
                     document={"id": f"o{i}", "lines": [{"sku": "S", "quantity": q} for q in quantities]})
        query = declared.query_model.model_validate({"facets": True})
        page = declared.search(es, prefix, query)
        assert page.metrics == {"units": 7.0}
    finally:
        es.indices.delete(index=f"{prefix}-orders-v1")
        es.close()
