"""The Elasticsearch client, made at start-up, and the embedded search server.

The official client sends ``application/vnd.elasticsearch+json; compatible-with=N`` headers;
Elasticsearch 8/9 equally accept plain ``application/json``, and osmem (the embedded server)
accepts only that, so every request is sent with plain JSON media types.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import threading
from typing import IO, Any

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


def make_client(url: str, *, timeout: float | None = None, settings: Settings | None = None) -> Elasticsearch:
    """A client for ``url`` (an http(s) URL; the embedded server must be started first), with the
    TLS and credential settings of ``settings`` (``connection_options``); ``timeout``: seconds per
    request (default ``settings.elasticsearch_timeout``, or 30 s)."""
    if url == EMBEDDED_SEARCH:
        raise ValueError("start the embedded search server first (cqrskit.read_models.search.EmbeddedSearch)")
    if timeout is None:
        timeout = settings.elasticsearch_timeout if settings is not None else 30.0
    options = connection_options(settings) if settings is not None else {}
    return Elasticsearch(url, node_class=PlainJsonNode, request_timeout=timeout, retry_on_timeout=False, max_retries=0,
                         **options)


def search_client(settings: Settings, *, timeout: float | None = None) -> Elasticsearch:
    """The client of ``settings.elasticsearch_url`` with its TLS and credential settings."""
    return make_client(settings.elasticsearch_url, timeout=timeout, settings=settings)


def connection_options(settings: Settings) -> dict[str, Any]:
    """The elasticsearch-py options of the search settings, under the client's own names:
    ``ca_certs`` (a PEM file), ``ssl_assert_fingerprint`` (the SHA-256 of the server's
    certificate), ``api_key`` (the encoded form of the create-API-key call). Basic auth rides in
    the URL (``https://user:password@host:9200``)."""
    options: dict[str, Any] = {}
    if settings.elasticsearch_ca_certs is not None:
        options["ca_certs"] = str(settings.elasticsearch_ca_certs)
    if settings.elasticsearch_ssl_fingerprint:
        options["ssl_assert_fingerprint"] = settings.elasticsearch_ssl_fingerprint
    if settings.elasticsearch_api_key:
        options["api_key"] = settings.elasticsearch_api_key
    return options


def replicas_of(settings: Settings) -> int:
    """The read models' ``number_of_replicas``: the setting, else 1 on a real cluster (a node's
    loss leaves every read model green once its replica is promoted) and 0 on the embedded server."""
    if settings.elasticsearch_replicas is not None:
        return settings.elasticsearch_replicas
    return 0 if settings.elasticsearch_url == EMBEDDED_SEARCH else 1


class EmbeddedSearch:
    """Context manager: an osmem server for this process when the settings ask for the
    embedded default; otherwise the configured URL. ``url`` is where to connect. ``stderr``:
    where the server's own lines go (a file object; default: this process's stderr)."""

    def __init__(self, settings: Settings, stderr: IO[str] | None = None) -> None:
        self.settings = settings
        self.server = None
        self.url = settings.elasticsearch_url
        self.stderr = stderr

    def __enter__(self) -> EmbeddedSearch:
        if self.settings.elasticsearch_url == EMBEDDED_SEARCH:
            self.server = start_osmem(stderr=self.stderr)
            self.url = self.server.url
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.close()


def osmem_command(addr: str | None = None, *, watch_parent: bool = True) -> list[str]:
    """The command line of the bundled osmem server (``--no-stdin-watch`` when it must outlive
    its stdin, as under a process manager)."""
    from osmem_server import resolve_binary

    args = [resolve_binary(), "-no-ja"]
    if watch_parent:
        args += ["-parent-pid", str(os.getpid())]
    else:
        args.append("-no-stdin-watch")
    return args + (["-addr", addr] if addr else [])


def start_osmem(addr: str | None = None, stderr: IO[str] | None = None, timeout: float = 30.0) -> Any:
    """An ``osmem_server.OsmemServer`` started like ``OsmemServer.start``, its own lines
    (``exiting: stdin closed``...) written to ``stderr``."""
    from osmem_server import OsmemError, OsmemServer

    process = subprocess.Popen(osmem_command(addr), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=stderr, text=True)
    ready: dict[str, Any] = {}

    def read_ready() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            with contextlib.suppress(ValueError):
                message = json.loads(line)
                if isinstance(message, dict) and "url" in message:
                    ready.update(message)
                    return

    reader = threading.Thread(target=read_ready, daemon=True)
    reader.start()
    reader.join(timeout)
    if not ready:
        process.kill()
        raise OsmemError(f"osmem: the server did not start within {timeout} s")
    return OsmemServer(process, ready["url"], ready.get("pid", process.pid), ready.get("version", ""), False,
                       list(ready.get("indices", [])))
