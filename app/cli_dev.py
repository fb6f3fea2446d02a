"""Development helpers: ``cqrskit search-server``, the bundled Elasticsearch-compatible server
(osmem, in memory) as a process of its own, so that the real-mode stack runs on a machine with
PostgreSQL and RabbitMQ and no Elasticsearch (``Procfile.dev``)."""

from __future__ import annotations

import signal
from typing import Annotated, Optional
from urllib.parse import urlsplit

import typer

from cqrskit.app.errors import SEARCH, Problem
from cqrskit.infra.settings import EMBEDDED_SEARCH, Settings

DEFAULT_ADDR = "127.0.0.1:9200"


def search_server(
    ctx: typer.Context,
    addr: Annotated[Optional[str], typer.Option(
        help="HOST:PORT to listen on (default: where CQRSKIT_ELASTICSEARCH_URL points, else 127.0.0.1:9200).")] = None,
    setup: Annotated[bool, typer.Option("--setup", help="Run cqrskit setup once the server listens.")] = False,
) -> None:
    """Run the bundled search server (in memory: its indices go when it stops) until interrupted.

    Example: cqrskit --elasticsearch-url http://127.0.0.1:9200 search-server --setup
    """
    from osmem_server import OsmemError

    from cqrskit.read_models.search import start_osmem

    settings: Settings = ctx.obj
    where = addr or _addr_of(settings.elasticsearch_url)
    try:
        server = start_osmem(where)
    except OsmemError:
        raise Problem(SEARCH, settings.elasticsearch_url, f"the search server could not listen at {where}",
                      "is the port taken? choose another with --addr and CQRSKIT_ELASTICSEARCH_URL") from None
    typer.echo(f"search server listening at {server.url} (in memory; Ctrl-C stops it)")
    signal.signal(signal.SIGTERM, _interrupt)  # a process manager stops it like Ctrl-C
    try:
        if setup:
            from cqrskit.app.setup import setup_all

            setup_all(settings.model_copy(update={"elasticsearch_url": server.url}), typer.echo)
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    typer.echo("search server stopped")


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _addr_of(url: str) -> str:
    if url == EMBEDDED_SEARCH:
        return DEFAULT_ADDR
    parts = urlsplit(url)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 9200}"


def register(app: typer.Typer) -> None:
    app.command("search-server")(search_server)
