"""``cqrskit search``: the queries a read model declares (``cqrskit.read_models.queryable``), from
the command line, printed as tables (or JSON), against the search server of
CQRSKIT_ELASTICSEARCH_URL. Every declared parameter is an option: ``--name value`` (repeated for
a list), ``--name``/``--no-name`` for a yes/no one. A query function of the app (the escape hatch)
is named by its path: ``cqrskit search bookings/by-month --interval week``."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Optional, get_args, get_origin

import typer
from rich.markup import escape
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.table import Table

from cqrskit.infra.settings import EMBEDDED_SEARCH, Settings, masked

console = Console()
err = Console(stderr=True, soft_wrap=True)  # one line per message, however narrow the terminal
COMMON = ("text", "sort", "order", "size", "cursor", "facets")


def _options(args: list[str], model: type[BaseModel], what: str) -> dict[str, Any]:
    """``--name value`` pairs of ``args`` for the fields of ``model``; exits 2 on a stray option."""
    fields = model.model_fields
    given: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        name = arg[2:].replace("-", "_") if arg.startswith("--") else None
        negated = name is not None and name.startswith("no_") and name[3:] in fields
        key = name[3:] if negated and name else name
        if key is None or key not in fields or key in ("consistent_with", "wait"):
            err.print(f"[red]{arg} does not apply to {what}[/red] (its options: "
                      f"{', '.join('--' + f.replace('_', '-') for f in fields)})")
            raise typer.Exit(2)
        annotation = fields[key].annotation
        if _is_bool(annotation):
            given[key] = not negated
            i += 1
            continue
        if i + 1 >= len(args):
            err.print(f"[red]{arg} needs a value[/red]")
            raise typer.Exit(2)
        value = args[i + 1]
        if get_origin(annotation) is list:
            given.setdefault(key, []).append(value)
        else:
            given[key] = value
        i += 2
    return given


def _is_bool(annotation: Any) -> bool:
    return annotation is bool or (bool in get_args(annotation) and len(get_args(annotation)) <= 2)


def _validated(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        for e in exc.errors():
            where = ".".join(str(part) for part in e["loc"]) or "query"
            err.print(f"[red]{where}:[/red] {e['msg']}")
        raise typer.Exit(2) from None


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, list):
        return str(len(value))
    if isinstance(value, BaseModel):
        return ", ".join(_cell(v) for v in value.model_dump().values() if v is not None)
    return str(value)


def page_table(searchable: Any, page: Any) -> Table:
    """A page of results as a table (the declared ``columns``, else every field of the view), its
    caption saying how many and the next cursor."""
    columns = list(searchable.queries.columns) or [n for n in searchable.queries.view.model_fields if n != "score"]
    table = Table(*columns)
    for item in page.items:
        table.add_row(*(escape(_cell(_path(item, c))) for c in columns))
    relation = "" if page.total.relation == "eq" else "at least "
    table.caption = f"{len(page.items)} of {relation}{page.total.value}" + (
        f"; next page: --cursor {escape(page.next_cursor)}" if page.next_cursor else "")
    return table


def _path(item: Any, path: str) -> Any:
    for part in path.split("."):
        item = getattr(item, part, None)
    return item


def facets_table(page: Any) -> Table:
    table = Table("facet", "value", "documents", title="facets")
    for name, buckets in (page.facets.model_dump() if page.facets else {}).items():
        for bucket in buckets:
            table.add_row(escape(name), escape(str(bucket["key"])), str(bucket["count"]))
    for name, value in (getattr(page, "metrics", None) or {}).items():
        table.add_row(escape(name), "", "" if value is None else f"{value:g}")
    return table


def params_table(name: str, model: type[BaseModel]) -> Table:
    """The options of ``cqrskit search NAME``: each parameter, its JSON Schema type and description."""
    table = Table("option", "type", "description", title=f"cqrskit search {name}")
    for field, schema in model.model_json_schema()["properties"].items():
        if field in ("consistent_with", "wait"):
            continue
        kinds = [s.get("enum") or s.get("format") or s.get("type") for s in schema.get("anyOf", [schema])]
        kinds = [k if not isinstance(k, list) else "|".join(map(str, k)) for k in kinds if k and k != "null"]
        if schema.get("type") == "array":
            item = schema.get("items", {})
            kinds = [f"list of {'|'.join(item['enum']) if 'enum' in item else item.get('type', '')}"]
        table.add_row("--" + field.replace("_", "-"), ", ".join(map(str, kinds)), schema.get("description", ""))
    return table


def search(
    ctx: typer.Context,
    read_model: Annotated[str, typer.Argument(help="A read model of the app, or a query function's path.")],
    text: Annotated[Optional[str], typer.Option(help="Words to find (in the model's declared text fields).")] = None,
    sort: Annotated[Optional[str], typer.Option(help="Sort field (the query API's OpenAPI lists them).")] = None,
    order: Annotated[Optional[str], typer.Option(help="asc or desc.")] = None,
    size: Annotated[Optional[int], typer.Option(help="Results per page (at most 100).")] = None,
    cursor: Annotated[Optional[str], typer.Option(help="The next-page cursor a search printed.")] = None,
    facets: Annotated[bool, typer.Option("--facets", help="Add the model's facets and metrics.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the page as JSON.")] = False,
    params: Annotated[bool, typer.Option("--params", help="List the read model's parameters and exit.")] = False,
) -> None:
    """Search a read model: full text, the model's declared filters (as --options), sort, facets;
    prints a table (or --json).

    Example: cqrskit search bookings --text ada --status booked --facets
    """
    from elastic_transport import TransportError
    from elasticsearch import ApiError

    from cqrskit.app.bootstrap import app_of
    from cqrskit.read_models.query_engine import QueryError
    from cqrskit.read_models.search import search_client

    settings: Settings = ctx.obj
    app = app_of(settings)
    models = app.searchable
    functions = {f.path.strip("/"): f for f in app.queries}
    common = {k: v for k, v in dict(text=text, sort=sort, order=order, size=size, cursor=cursor).items()
              if v is not None}
    if facets:
        common["facets"] = True
    if read_model in models:
        target = models[read_model]
        run, model = target.search, target.query_model
    elif read_model.strip("/") in functions:
        target = functions[read_model.strip("/")]
        run, model = target.run, target.params
    else:
        known = [*models, *functions]
        err.print(f"[red]unknown read model {read_model!r}[/red] of the app {app.name!r}; known: "
                  f"{', '.join(known) or 'none'}")
        raise typer.Exit(2)
    if params:
        console.print(params_table(read_model, model))
        return
    stray = [k for k in common if k not in model.model_fields]
    if stray:
        err.print(f"[red]{', '.join('--' + s for s in stray)} does not apply to {read_model}[/red]")
        raise typer.Exit(2)
    query = _validated(model, {**_options(ctx.args, model, read_model), **common})
    if settings.elasticsearch_url == EMBEDDED_SEARCH:
        err.print("[red]search needs a search server:[/red] set CQRSKIT_ELASTICSEARCH_URL=http://... "
                  "(the embedded one lives inside `cqrskit demo`)")
        raise typer.Exit(2)
    es = search_client(settings)
    try:
        result = run(es, settings.index_prefix, query)
    except QueryError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    except (ApiError, TransportError) as exc:
        err.print(f"[red]search failed at {escape(masked(settings.elasticsearch_url))}:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    finally:
        es.close()
    if as_json or read_model not in models:
        print(json.dumps(result.model_dump(mode="json"), indent=2))
        return
    console.print(page_table(target, result))
    if getattr(result, "facets", None) or getattr(result, "metrics", None):
        console.print(facets_table(result))


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(search)
