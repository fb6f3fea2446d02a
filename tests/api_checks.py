"""The schemathesis checks the API test modules run (registered once: a check is global).

``ALL_CHECKS`` is what ``schemathesis run --checks all`` runs: every check schemathesis ships
(no 5xx, documented statuses, content types, headers and bodies, valid data accepted, invalid
data refused, missing headers refused, undeclared methods 405, authentication enforced, and the
stateful ones, which look at the links between operations), with two substitutions: the
conformance checks of content type and body go through ``conforms_unless_refused_by_uvicorn``, and
``positive_data_acceptance`` through ``accepts_valid_data_but_forged_opaque_values``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import schemathesis
from sqlalchemy import make_url
from schemathesis import checks
from schemathesis.checks import CHECKS as REGISTRY, is_check_class, load_all_checks

from cqrskit.infra.api_keys import ApiKeys
from cqrskit.infra.db import make_engine
from cqrskit.infra.http_auth import Authenticate
from cqrskit.producers.gateway import read_only_engine

HTTP_LINE_LIMIT = 16 * 1024  # uvicorn's h11_max_incomplete_event_size (cqrskit.infra.http_auth.server_limits)


@schemathesis.check
def conforms_unless_refused_by_uvicorn(ctx: Any, response: Any, case: Any) -> bool | None:
    """Content type and body as documented, except when uvicorn itself refused an oversized request
    head (400, text/plain, before the app sees it): the longest non-ASCII values the schema allows,
    percent-encoded, get there (a token may be 20,000 characters)."""
    if (response.status_code == 400 and len(response.request.url) > HTTP_LINE_LIMIT // 2
            and response.content == b"Invalid HTTP request received."):
        return None
    checks.content_type_conformance(ctx, response, case)
    return checks.response_schema_conformance(ctx, response, case)


OPAQUE = {"consistent_with": "invalid-token", "cursor": "bad-cursor"}  # parameter -> its problem type


@schemathesis.check
def accepts_valid_data_but_forged_opaque_values(ctx: Any, response: Any, case: Any) -> bool | None:
    """Valid data is accepted, except a consistency token or a cursor the server did not make: they
    are signed or encoded by the server (like credentials, which schemathesis excuses the same
    way), so no schema can say which strings are genuine, and a forged one is a 400 problem; nor can
    a JSON Schema state a rule between several values (``sort=relevance`` needs ``text``; one line
    per sku), which descriptions state and an error located at their container enforces."""
    if response.status_code == 400:
        problem = str(_json(response).get("type", ""))
        if any(name in (case.query or {}) and problem.endswith(slug) for name, slug in OPAQUE.items()):
            return None
    if response.status_code in (400, 422) and _only_rules_between_values(_json(response), case):
        return None
    return checks.positive_data_acceptance(ctx, response, case)


def _only_rules_between_values(problem: dict[str, Any], case: Any) -> bool:
    """Whether every error of the problem is a rule between several values, which a JSON Schema
    cannot state: on the query as a whole (``sort=relevance`` needs ``text``), on a list or an
    object of the body (a sku on two lines of one order), or a duplicate (one command id twice in
    a batch); or an integer written as a float."""
    located = [(case.body, e) for e in problem.get("errors") or []]
    for item in problem.get("items") or []:
        located += [(case.body[item["index"]], e) for e in item.get("errors") or []]
    return bool(located) and all(e.get("type") == "duplicate" or _integral_float(body, e)
                                 or isinstance(_at(body, case.query, e.get("loc", [])), (dict, list))
                                 for body, e in located)


def _integral_float(body: Any, error: dict[str, Any]) -> bool:
    """An integer written as ``2.0``: JSON Schema calls it an integer; the models (strict, as the
    domain's commands are) want it written as one (``2``), and say so."""
    value = _at(body, None, error.get("loc", []))
    return error.get("type") == "int_type" and isinstance(value, float) and value.is_integer()


def _at(body: Any, query: Any, loc: list[Any]) -> Any:
    value = {"query": query, "body": body, **(body if isinstance(body, dict) else {})}
    for step in loc:
        if isinstance(value, dict) and step in value:
            value = value[step]
        elif isinstance(value, list) and isinstance(step, int) and 0 <= step < len(value):
            value = value[step]
        else:
            return None
    return value


def _json(response: Any) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


CHECKS_SUBSTITUTED = {"content_type_conformance", "response_schema_conformance", "positive_data_acceptance"}
CHECKS_SHIPPED = {"not_a_server_error", "status_code_conformance", "content_type_conformance",
                  "response_headers_conformance", "response_schema_conformance", "negative_data_rejection",
                  "positive_data_acceptance", "missing_required_header", "unsupported_method",
                  "allow_header_conformance", "use_after_free", "ensure_resource_availability", "ignored_auth",
                  "object_level_authorization"}


def _all_checks() -> list[Any]:
    load_all_checks()
    shipped = [c for c in REGISTRY.get_all() if not is_check_class(c) and c.__module__.startswith("schemathesis")]
    names = {c.__name__ for c in shipped}
    assert names >= CHECKS_SHIPPED, f"schemathesis no longer ships {CHECKS_SHIPPED - names}"
    return [c for c in shipped if c.__name__ not in CHECKS_SUBSTITUTED] + [conforms_unless_refused_by_uvicorn,
                                                                         accepts_valid_data_but_forged_opaque_values]


ALL_CHECKS = _all_checks()


@contextmanager
def key_store(pg_admin: str, read_models: list[str] | None = None,
              commands: list[str] | None = None) -> Iterator[tuple[Authenticate, str]]:
    """A fresh, migrated PostgreSQL database holding one live API key of the given scope (all
    read models and command types by default), looked up through read-only sessions as the HTTP
    processes do: yields (authenticate, the key's token)."""
    from tests.conftest import _admin_dsn, _migrate

    name = f"cqrskit_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_admin_dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(pg_admin).set(database=name).render_as_string(hide_password=False)
    _migrate(url)
    owner = make_engine(url)
    _key, token = ApiKeys(owner).create("schemathesis", commands or ["*"], read_models or ["*"])
    owner.dispose()
    engine = read_only_engine(url)
    try:
        yield ApiKeys(engine, ttl=60).authenticate, token
    finally:
        engine.dispose()
        with psycopg.connect(_admin_dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def no_key(_token: str) -> None:
    """An ``authenticate`` for building the OpenAPI document of an authenticated app offline."""
    return None


def credentials(case: Any, headers: dict[str, str]) -> dict[str, str] | None:
    """``headers`` (a real key) for a case that carries the declared credentials; none for a case
    generated without them (a negative case that drops the required ``Authorization``), which must
    then be refused."""
    present = {name.lower() for name in (case.headers or {})}
    return headers if all(name.lower() in present for name in headers) else None
