"""Authentication of every request to an HTTP API (G11), as one ASGI middleware that wraps the
whole app, whatever routes it has.

- A request presents its API key as ``Authorization: Bearer ck_...`` (or ``X-API-Key: ck_...``);
  without a live key it gets ``401`` (a problem document, ``WWW-Authenticate: Bearer``), before any
  route runs. Only ``open_paths`` (health checks) need no key.
- ``scope(key, path)`` says whether the key may use that path at all (the query API: the read
  model named by the path's first segment); ``403`` otherwise. Finer checks (the command types of
  a body) are the routes' own, through ``request.state.api_key``.
- ``max_waits``: requests that ask to wait (the query parameter ``wait_parameter``: the query API's
  ``consistent_with``, the gateway's outcome long poll ``wait``) hold a slot of
  their key's (or, without authentication, their address's); over the cap, ``429``. ``max_total_waits``
  caps them in the whole process, whoever holds them (``429`` too): many keys cannot together
  take every task a process has.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Collection
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from cqrskit.infra.api_keys import ApiKey
from cqrskit.infra.http_server import GuardedH11Protocol
from cqrskit.infra.problems import Problem, problem_response, problem_type
from cqrskit.infra.settings import Settings

Authenticate = Callable[[str], "ApiKey | None"]
Scope = Callable[[ApiKey, str], bool]


class Authentication:
    """ASGI middleware: ``app.add_middleware(Authentication, authenticate=..., ...)``. With
    ``authenticate=None`` (the embedded default, ``--insecure``) nobody is authenticated and only
    the consistency-wait cap applies."""

    def __init__(self, app: Any, *, authenticate: Authenticate | None, scope: Scope | None = None,
                 open_paths: Collection[str] = ("/health",), max_waits: int = 0, max_total_waits: int = 0,
                 wait_parameter: str = "consistent_with") -> None:
        self.app, self.authenticate, self.scope = app, authenticate, scope
        self.open_paths, self.max_waits, self.max_total_waits = frozenset(open_paths), max_waits, max_total_waits
        self.wait_parameter = wait_parameter
        self._waits: Counter[str] = Counter()
        self._lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] in self.open_paths:  # no key needed; a valid one is still known to the route
            if self.authenticate is not None and (key := await self._key(Request(scope))) is not None:
                scope.setdefault("state", {})["api_key"] = key
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        key = None
        if self.authenticate is not None:
            key = await self._key(request)
            if key is None:
                await _deny(request, 401, "unauthenticated", "Authentication required",
                            "send a live API key as 'Authorization: Bearer ck_...'",
                            {"WWW-Authenticate": 'Bearer realm="cqrskit"'})(scope, receive, send)
                return
            if self.scope is not None and not self.scope(key, scope["path"]):
                await _deny(request, 403, "forbidden", "Not allowed",
                            f"API key {key.key_id!r} may not use this path")(scope, receive, send)
                return
            scope.setdefault("state", {})["api_key"] = key
        client = key.key_id if key else (request.client.host if request.client else "?")
        if not (self.max_waits or self.max_total_waits) or self.wait_parameter not in request.query_params:
            await self.app(scope, receive, send)
            return
        refused = self._take_wait(client)
        if refused:
            await _deny(request, 429, "too-many-waits", "Too many consistency waits", refused,
                        {"Retry-After": "1"})(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            with self._lock:
                self._waits[client] -= 1
                if self._waits[client] <= 0:
                    del self._waits[client]

    def _take_wait(self, client: str) -> str | None:
        """Take a wait slot for ``client``; or why not (None: taken)."""
        with self._lock:
            if self.max_waits and self._waits[client] >= self.max_waits:
                return f"at most {self.max_waits} requests with {self.wait_parameter} at a time per client"
            if self.max_total_waits and sum(self._waits.values()) >= self.max_total_waits:
                return (f"this server holds its {self.max_total_waits} requests with {self.wait_parameter} at a "
                        f"time; retry shortly, or ask without {self.wait_parameter}")
            self._waits[client] += 1
        return None

    async def _key(self, request: Request) -> ApiKey | None:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not token or len(token) > 200 or not token.isascii():
            return None
        return await run_in_threadpool(self.authenticate, token)  # type: ignore[arg-type]


def _deny(request: Request, status: int, slug: str, title: str, detail: str,
          headers: dict[str, str] | None = None) -> Any:
    return problem_response(request, Problem(type=problem_type(slug), title=title, status=status, detail=detail),
                            headers)


def current_key(request: Request) -> ApiKey | None:
    """The API key the request was authenticated with (None without authentication)."""
    return getattr(request.state, "api_key", None)


def read_model_scope(read_models: Collection[str]) -> Scope:
    """A path under a read model's name (``/bookings``, ``/bookings/{id}``) needs that model in the
    key's scope; any other path (the OpenAPI document) needs only a key."""
    names = frozenset(read_models)

    def allowed(key: ApiKey, path: str) -> bool:
        first = path.lstrip("/").split("/", 1)[0]
        return first not in names or key.may_read(first)

    return allowed


SECURITY_SCHEMES = {"bearer": {"type": "http", "scheme": "bearer", "description": (
    "An API key (`cqrskit keys create`): `Authorization: Bearer ck_...` (or `X-API-Key: ck_...`).")}}
_REFUSALS = {401: "No live API key.", 403: "The API key's scope does not cover this.",
             429: "Too many waits held by this client, or by this server, at once."}


def declare_security(spec: dict[str, Any], open_paths: Collection[str] = ("/health",),
                     wait_parameter: str = "consistent_with") -> dict[str, Any]:
    """``spec`` (an OpenAPI document, changed in place and returned) saying what ``Authentication``
    enforces: every operation outside ``open_paths`` needs a key and may answer 401
    and 403, and 429 when it takes ``wait_parameter``. Idempotent."""
    spec.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    for path, operations in spec.get("paths", {}).items():
        if path in open_paths:
            continue
        for operation in operations.values():
            operation["security"] = [{"bearer": []}]
            waits = any(p.get("name") == wait_parameter for p in operation.get("parameters", []))
            for status in (401, 403, *((429,) if waits else ())):
                operation.setdefault("responses", {}).setdefault(str(status), {
                    "description": _REFUSALS[status],
                    "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}})
    return spec


def server_limits(settings: Settings) -> dict[str, Any]:
    """uvicorn's options that bound what one client can hold: connections and tasks at once
    (beyond: 503), idle keep-alive, header size, and the deadlines on a request's head and body
    (``cqrskit.infra.http_server``)."""
    protocol = GuardedH11Protocol.configure(settings.http_header_timeout, settings.http_body_timeout)
    return {"limit_concurrency": settings.http_limit_concurrency, "timeout_keep_alive": 5,
            "h11_max_incomplete_event_size": 16 * 1024, "http": protocol}
