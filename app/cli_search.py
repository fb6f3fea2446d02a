"""``cqrskit search``: the typed queries of ``cqrskit.read_models.queries`` from the command line, printed
as tables (or JSON), against the search server of CQRSKIT_ELASTICSEARCH_URL."""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.table import Table

from cqrskit.infra.settings import EMBEDDED_SEARCH, Settings

console = Console()
err = Console(stderr=True)
# option -> the query field it sets, per read model (an option missing here does not apply)
FIELDS: dict[str, dict[str, str]] = {
    "orders": {"text": "text", "status": "status", "since": "placed_since", "until": "placed_until",
               "customer": "customer_id", "sku": "sku", "min_total": "total_min", "max_total": "total_max",
               "facets": "facets"},
    "products": {"text": "text", "sku": "sku", "in_stock": "in_stock"},
    "customers": {"text": "text", "email": "email", "min_orders": "min_orders"},
}


def _query(read_model: str, options: dict[str, Any]) -> BaseModel:
    """The validated query for ``read_model``; exits 2 with the errors when the options do not fit."""
    from cqrskit.read_models import queries as q

    if read_model not in FIELDS:
        err.print(f"[red]unknown read model {read_model!r}[/red]; known: {', '.join(FIELDS)}")
        raise typer.Exit(2)
    fields = FIELDS[read_model]
    given = {k: v for k, v in options.items()
             if v is not None and v != [] and not (k == "facets" and v is False)}
    stray = [k for k in given if k not in fields and k not in ("sort", "order", "size", "cursor")]
    if stray:
        flags = ", ".join("--" + s.replace("_", "-") for s in stray)
        err.print(f"[red]{flags} does not apply to {read_model}[/red]")
        raise typer.Exit(2)
    model = {"orders": q.OrderQuery, "products": q.ProductQuery, "customers": q.CustomerQuery}[read_model]
    try:
        return model.model_validate({fields.get(k, k): v for k, v in given.items()})
    except ValidationError as exc:
        for e in exc.errors():
            where = ".".join(str(part) for part in e["loc"]) or "query"
            err.print(f"[red]{where}:[/red] {e['msg']}")
        raise typer.Exit(2) from None


def _money(cents: int | None) -> str:
    return "" if cents is None else f"{cents / 100:,.2f}"


def _when(at: Any) -> str:
    return "" if at is None else at.strftime("%Y-%m-%d %H:%M")


def page_table(read_model: str, page: Any) -> Table:
    """A page of ``read_model`` results as a table, its caption saying how many and the next cursor."""
    if read_model == "orders":
        table = Table("order", "status", "customer", "email", "total", "units", "placed", "lines")
        for o in page.items:
            lines = ", ".join(f"{line.quantity} x {line.name}" for line in o.lines)
            table.add_row(o.order_id, o.status, o.customer.name or "", o.customer.email or "",
                          _money(o.total_cents), str(o.units), _when(o.placed_at), lines)
    elif read_model == "products":
        table = Table("product", "sku", "name", "price", "stock", "sold")
        for p in page.items:
            table.add_row(p.product_id, p.sku, p.name, _money(p.price_cents), str(p.stock), str(p.units_sold))
    else:
        table = Table("customer", "name", "email", "orders", "lifetime value")
        for c in page.items:
            table.add_row(c.customer_id, c.name, c.email, str(c.order_count), _money(c.lifetime_value_cents))
    relation = "" if page.total.relation == "eq" else "at least "
    table.caption = f"{len(page.items)} of {relation}{page.total.value}" + (
        f"; next page: --cursor {page.next_cursor}" if page.next_cursor else "")
    return table


def facets_table(facets: Any) -> Table:
    table = Table("facet", "value", "orders", title="facets")
    for name, buckets in (("status", facets.status), ("sku", facets.sku)):
        for bucket in buckets:
            table.add_row(name, bucket.key, str(bucket.count))
    return table


def revenue_table(revenue: Any) -> Table:
    table = Table(revenue.interval, "orders", "revenue", title="revenue (paid and shipped orders)")
    for bucket in revenue.buckets:
        table.add_row(bucket.start.strftime("%Y-%m-%d"), str(bucket.orders), _money(bucket.revenue_cents))
    return table


def top_products_table(top: Any) -> Table:
    table = Table("sku", "name", "units", "revenue", "orders", title=f"top products by {top.by}")
    for p in top.items:
        table.add_row(p.sku, p.name or "", str(p.units), _money(p.revenue_cents), str(p.orders))
    return table


def search(
    ctx: typer.Context,
    read_model: Annotated[str, typer.Argument(help="orders, products or customers.")],
    text: Annotated[Optional[str], typer.Option(help="Words to find (orders: customer, email, products).")] = None,
    status: Annotated[Optional[list[str]], typer.Option(help="Orders: placed, paid, shipped, cancelled.")] = None,
    since: Annotated[Optional[str], typer.Option(help="Orders placed at or after (ISO 8601, UTC).")] = None,
    until: Annotated[Optional[str], typer.Option(help="Orders placed before (ISO 8601).")] = None,
    customer: Annotated[Optional[str], typer.Option(help="Orders: of this customer id.")] = None,
    sku: Annotated[Optional[str], typer.Option(help="Orders with a line of this sku; that product.")] = None,
    min_total: Annotated[Optional[int], typer.Option(help="Orders: total at least (cents).")] = None,
    max_total: Annotated[Optional[int], typer.Option(help="Orders: total at most (cents).")] = None,
    in_stock: Annotated[Optional[bool], typer.Option("--in-stock/--sold-out", help="Products: stock or not.")] = None,
    email: Annotated[Optional[str], typer.Option(help="Customers: exactly this email.")] = None,
    min_orders: Annotated[Optional[int], typer.Option(help="Customers: at least this many orders.")] = None,
    sort: Annotated[Optional[str], typer.Option(help="Sort field (the query API's OpenAPI lists them).")] = None,
    order: Annotated[Optional[str], typer.Option(help="asc or desc.")] = None,
    size: Annotated[int, typer.Option(help="Results per page (at most 100).")] = 20,
    cursor: Annotated[Optional[str], typer.Option(help="The next-page cursor a search printed.")] = None,
    facets: Annotated[bool, typer.Option("--facets", help="Orders: counts by status and sku.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the page as JSON.")] = False,
) -> None:
    """Search a read model: full text, filters, sort, facets; prints a table (or --json)."""
    from elastic_transport import TransportError
    from elasticsearch import ApiError

    from cqrskit.read_models import queries as q
    from cqrskit.read_models.search import make_client

    settings: Settings = ctx.obj
    options = dict(text=text, status=status, since=since, until=until, customer=customer, sku=sku,
                   min_total=min_total, max_total=max_total, in_stock=in_stock, email=email,
                   min_orders=min_orders, sort=sort, order=order, size=size, cursor=cursor, facets=facets)
    query = _query(read_model, options)
    if settings.elasticsearch_url == EMBEDDED_SEARCH:
        err.print("[red]search needs a search server:[/red] set CQRSKIT_ELASTICSEARCH_URL=http://... "
                  "(the embedded one lives inside `cqrskit demo`)")
        raise typer.Exit(2)
    runs = {"orders": q.search_orders, "products": q.search_products, "customers": q.search_customers}
    es = make_client(settings.elasticsearch_url)
    try:
        page = runs[read_model](es, settings.index_prefix, query)
    except q.QueryError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    except (ApiError, TransportError) as exc:
        err.print(f"[red]search failed at {settings.elasticsearch_url}:[/red] {exc}")
        raise typer.Exit(1) from None
    finally:
        es.close()
    if as_json:
        print(json.dumps(page.model_dump(mode="json"), indent=2))
        return
    console.print(page_table(read_model, page))
    if getattr(page, "facets", None):
        console.print(facets_table(page.facets))


def register(app: typer.Typer) -> None:
    app.command()(search)
