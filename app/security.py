"""How the HTTP processes authenticate, decided once from the settings (G11).

On the embedded default (SQLite, the in-process broker, the embedded search server) nobody is
authenticated: it is one machine's demo. On real services the gateway and the query API refuse to
start without a token secret of their own and a place to look API keys up, unless ``--insecure``
(``CQRSKIT_INSECURE=true``) says this is a local run.
"""

from __future__ import annotations

from typing import Literal

from cqrskit.infra.api_keys import ApiKeys
from cqrskit.infra.http_auth import Authenticate
from cqrskit.infra.settings import Settings

Process = Literal["gateway", "query"]


class Insecure(ValueError):
    """The process would serve real data without authentication; the message says what to set."""


def http_authentication(settings: Settings, process: Process) -> Authenticate | None:
    """The API-key check of ``process`` (None: nobody is authenticated); raises ``Insecure``."""
    if settings.insecure or not settings.real_services:
        return None
    missing = []
    if settings.development_secret:
        missing.append("CQRSKIT_TOKEN_SECRET (a random secret of at least 32 characters, the same for the "
                       "gateway and the query API)")
    url = settings.auth_database_url or (settings.database_url if process == "gateway" else None)
    if url is None:
        missing.append("CQRSKIT_AUTH_DATABASE_URL (the write store as a role that may only SELECT api_keys)")
    if missing:
        raise Insecure(f"refusing to serve the {process} on real services without authentication: set "
                       + " and ".join(missing) + "; or pass --insecure for a local run")
    from cqrskit.producers.gateway import read_only_engine

    return ApiKeys(read_only_engine(url), ttl=settings.auth_ttl_seconds).authenticate


def docs_served(settings: Settings) -> bool:
    """``/docs`` (Swagger UI loads its script from a CDN): on the embedded default and local runs,
    and in production only when ``CQRSKIT_HTTP_DOCS=true``."""
    return settings.http_docs or settings.insecure or not settings.real_services
