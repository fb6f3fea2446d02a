"""The Elasticsearch client, made at start-up, and the embedded search server.

The official client sends ``application/vnd.elasticsearch+json; compatible-with=N`` headers;
Elasticsearch 8/9 equally accept plain ``application/json``, and osmem (the embedded server)
accepts only that, so every request is sent with plain JSON media types.
"""

from __future__ import annotations

import re
from typing import Any

from elastic_transport import Urllib3HttpNode
from elasticsearch import Elasticsearch

from cqrskit.infra.settings import EMBEDDED_SEARCH, Settings

_COMPAT = re.compile(r"application/vnd\.elasticsearch\+(json|x-ndjson); compatible-with=\d+")


class PlainJsonNode(Urllib3HttpNode):
    """A transport node that sends plain JSON media types (see module docstring)."""

    def perform_request(self, method: str, target: str, body: bytes | None = None,
                        headers: Any = None, request_timeout: Any = None):  # type: ignore[no-untyped-def,override]
        if headers:
            headers = headers.copy()
            for name in ("accept", "content-type"):
                if name in headers:
                    headers[name] = _COMPAT.sub(r"application/\1", headers[name])
        return super().perform_request(method, target, body=body, headers=headers, request_timeout=request_timeout)


def make_client(url: str, *, timeout: float = 30.0) -> Elasticsearch:
    """A client for ``url`` (an http(s) URL; the embedded server must be started first)."""
    if url == EMBEDDED_SEARCH:
        raise ValueError("start the embedded search server first (cqrskit.read_models.search.EmbeddedSearch)")
    return Elasticsearch(url, node_class=PlainJsonNode, request_timeout=timeout, retry_on_timeout=False, max_retries=0)


class EmbeddedSearch:
    """Context manager: an osmem server for this process when the settings ask for the
    embedded default; otherwise the configured URL. ``url`` is where to connect."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server = None
        self.url = settings.elasticsearch_url

    def __enter__(self) -> EmbeddedSearch:
        if self.settings.elasticsearch_url == EMBEDDED_SEARCH:
            from osmem_server import OsmemServer

            self.server = OsmemServer.start(japanese=False)
            self.url = self.server.url
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.close()
