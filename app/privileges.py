"""``cqrskit setup --privileges``: the least-privilege roles of docs/operations.md, provisioned
(G11), idempotently.

- **PostgreSQL**: one login role per process type (``<prefix>_worker``, ``_relay``, ``_indexer``,
  ``_gateway``, ``_query``, ``_operator``) with exactly the grants of docs/operations.md; none may
  create anything (no ``CREATE`` on the schema, owns nothing). A role is created with a random
  password, printed once; an existing role keeps its password and gets its grants again.
- **RabbitMQ**: one user per process type (``<prefix>-worker``...) and one per ``--producer``,
  with the configure/write/read permissions of docs/operations.md on this deployment's names,
  set with ``rabbitmqctl`` on the broker's host (printed instead where there is none).
- **Elasticsearch**: the role definitions (``<prefix>_indexer``, ``_query``, ``_operator``) are
  printed, for the cluster's security API; there is nothing to create on a server without security.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg import sql
from sqlalchemy import make_url

from cqrskit.infra.settings import Settings

Say = Callable[[str], None]
ALL_TABLES = ("events", "streams", "command_outcomes", "unique_claims", "relay_checkpoints", "leases",
              "parked_documents", "read_model_indices", "producers", "producer_grants", "api_keys",
              "process_instances", "process_handled", "process_outbox", "process_timers")
# role -> {privileges: tables}; "USAGE" lists sequences.
PG_GRANTS: dict[str, dict[str, tuple[str, ...]]] = {
    "worker": {"SELECT, INSERT": ("events",),  # history is appended, never rewritten
               "SELECT, INSERT, UPDATE": ("streams", "command_outcomes"),
               "SELECT, INSERT, DELETE": ("unique_claims",),
               "SELECT": ("producers", "producer_grants", "process_outbox"),  # process_outbox: internal commands
               # a vouched-for issuer must be a live key allowed the type: names and scopes, no digests
               "SELECT (name, commands, revoked_at)": ("api_keys",),
               "USAGE": ("events_position_seq",)},
    "relay": {"SELECT": ("events",), "SELECT, INSERT, UPDATE": ("relay_checkpoints", "leases"),
              "SELECT (read_model)": ("parked_documents",)},  # its metrics count the parked documents
    "indexer": {"SELECT": ("events", "streams", "read_model_indices"),
                "SELECT, INSERT, UPDATE, DELETE": ("parked_documents",), "USAGE": ("parked_documents_id_seq",)},
    "process_managers": {"SELECT": ("events",),
                         "SELECT, INSERT, UPDATE": ("relay_checkpoints", "process_instances", "process_handled",
                                                    "process_outbox"),
                         "SELECT, INSERT, UPDATE, DELETE": ("process_timers",)},
    # a consistency token names the stream versions of a command's events: nothing of their data
    "gateway": {"SELECT": ("command_outcomes", "api_keys"), "SELECT (position, stream_id, version)": ("events",)},
    # a read-your-writes wait that times out names the parked document it waited for
    "query": {"SELECT": ("api_keys",), "SELECT (read_model, doc_id, error)": ("parked_documents",)},
    "operator": {"SELECT": ALL_TABLES, "INSERT, DELETE": ("command_outcomes",),
                 "INSERT, UPDATE, DELETE": ("parked_documents", "read_model_indices", "producers", "producer_grants",
                                            "api_keys"),
                 "USAGE": ("parked_documents_id_seq",)},
}


@dataclass(frozen=True)
class Permission:
    configure: str
    write: str
    read: str


def rabbitmq_permissions(settings: Settings) -> dict[str, Permission]:
    """The permissions of each process type on this deployment's exchanges and queues. Only the
    workers may write to ``amq.default`` (their own retries): it reaches every queue, the commands
    queue included. The relay and the indexers reach the indexer queues through their own direct
    exchange (``indexer_exchange``: write to publish, read to bind a queue to it)."""
    from cqrskit.infra.broker import indexer_exchange

    c = re.escape(settings.commands_queue)
    i = re.escape(settings.indexer_queue) + "(\\.p[0-9]+)?"  # its partitions: indexer, indexer.p1, ...
    ce, ee = re.escape(settings.commands_exchange), re.escape(settings.events_exchange)
    ix = re.escape(indexer_exchange(settings))
    return {
        "gateway": Permission("^$", f"^{ce}$", "^$"),
        "process_managers": Permission("^$", f"^{ce}$", "^$"),  # publishes the commands its reactions sent
        "worker": Permission(f"^{c}(\\.DQ|\\.XQ)?$", f"^(amq\\.default|{c}(\\.DQ|\\.XQ)?)$", f"^{c}(\\.DQ)?$"),
        "relay": Permission(f"^({ee}|{ix}|{i}(\\.DQ|\\.XQ)?)$", f"^({ee}|{ix}|{i}(\\.DQ|\\.XQ)?)$", f"^{ix}$"),
        "indexer": Permission(f"^({ix}|{i}(\\.DQ|\\.XQ)?)$", f"^({ix}|{i}(\\.DQ|\\.XQ)?)$", f"^({ix}|{i}(\\.DQ)?)$"),
        "operator": Permission(".*", f"^{ce}$", f"^{c}\\.XQ$"),
    }


PRODUCER = "producer"


def elasticsearch_roles(settings: Settings, read_models: Sequence[str], prefix: str = "cqrskit") -> dict[str, Any]:
    """Role definitions for Elasticsearch's security API (``PUT _security/role/<prefix>_<role>``),
    exactly what each process sends (the suite's search front checks every request against them):

    - indexer: bulk writes through the aliases (``index``) and preflight's alias and mapping
      checks (``view_index_metadata``), on the read models' aliases and indices only;
    - query: searches and gets (``read``) and the same checks, on the live aliases only;
    - operator (setup, rebuild, verify, status, search): ``GET /`` (cluster ``monitor``) and
      creating, swapping and deleting the read models' indices (``manage``), reading, writing.
    """
    index_prefix = settings.index_prefix
    aliases = [f"{index_prefix}-{m}" for m in read_models]
    names = [name for m in read_models for name in (f"{index_prefix}-{m}", f"{index_prefix}-{m}-*")]
    return {
        f"{prefix}_indexer": {"cluster": [], "indices": [{"names": names, "privileges": ["index", "view_index_metadata"]}]},
        f"{prefix}_query": {"cluster": [], "indices": [{"names": aliases, "privileges": ["read", "view_index_metadata"]}]},
        f"{prefix}_operator": {"cluster": ["monitor"],
                               "indices": [{"names": names, "privileges": ["manage", "read", "index"]}]},
    }


def provision(settings: Settings, read_models: Sequence[str], *, prefix: str = "cqrskit",
              producers: Sequence[str] = (), say: Say = print) -> dict[str, str]:
    """Every role and user; returns the passwords of those created now (name -> password)."""
    made = provision_postgres(settings.database_url, prefix, say) if settings.database_url.startswith("postgresql") \
        else {}
    if settings.database_url.startswith("sqlite"):
        say("write store: SQLite has no roles (the embedded default); nothing to provision")
    if not settings.embedded_broker:
        made |= provision_rabbitmq(settings, prefix, producers, say)
    say("Elasticsearch roles (PUT _security/role/<name> on a cluster with security):")
    say(json.dumps(elasticsearch_roles(settings, read_models, prefix), indent=2))
    return made


# -- PostgreSQL ---------------------------------------------------------------------------------
def provision_postgres(url: str, prefix: str, say: Say) -> dict[str, str]:
    made: dict[str, str] = {}
    with psycopg.connect(_dsn(url), autocommit=True) as conn:
        database = conn.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        # no role makes temporary tables either (PostgreSQL grants TEMPORARY to PUBLIC by default)
        conn.execute(sql.SQL("REVOKE TEMPORARY ON DATABASE {} FROM PUBLIC").format(sql.Identifier(database)))
        for role, grants in PG_GRANTS.items():
            name = f"{prefix}_{role}"
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
            if not exists:
                made[name] = secrets.token_hex(24)  # hex: never starts with "-" (rabbitmqctl would take it as an option)
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}")
                             .format(sql.Identifier(name), sql.Literal(made[name])))
            _grant(conn, name, database, grants)
            say(f"PostgreSQL role {name}: " + ("created" if not exists else "exists, grants renewed"))
    return made


def _grant(conn: psycopg.Connection, role: str, database: str, grants: dict[str, tuple[str, ...]]) -> None:
    who = sql.Identifier(role)
    conn.execute(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {}").format(who))
    conn.execute(sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {}").format(who))
    conn.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM {}").format(who))
    conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), who))
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(who))
    # every process checks the schema's revision before it starts (preflight): harmless to read
    conn.execute(sql.SQL("GRANT SELECT ON TABLE alembic_version TO {}").format(who))
    for privileges, objects in grants.items():
        kind = "SEQUENCE" if privileges == "USAGE" else "TABLE"
        names = sql.SQL(", ").join(sql.Identifier(o) for o in objects)
        conn.execute(sql.SQL(f"GRANT {privileges} ON {kind} {{}} TO {{}}").format(names, who))


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# -- RabbitMQ -----------------------------------------------------------------------------------
def provision_rabbitmq(settings: Settings, prefix: str, producers: Sequence[str], say: Say) -> dict[str, str]:
    vhost = unquote(urlsplit(settings.broker_urls[0]).path[1:] or "/") or "/"
    permissions = rabbitmq_permissions(settings)
    users = {f"{prefix}-{role}": p for role, p in permissions.items()}
    users |= {name: permissions["gateway"] for name in producers}  # a producer: publish commands, nothing else
    ctl = shutil.which("rabbitmqctl")
    made: dict[str, str] = {}
    existing = set(_ctl(ctl, "list_users", "--quiet", "--no-table-headers").split()) if ctl else set()
    for user, p in users.items():
        steps = []
        if user not in existing:
            made[user] = secrets.token_hex(24)
            steps.append(("add_user", user, made[user]))
        steps.append(("set_permissions", "-p", vhost, user, p.configure, p.write, p.read))
        for step in steps:
            if ctl:
                _ctl(ctl, *step)
            else:
                say("rabbitmqctl " + " ".join(_shell(a) for a in step))
        say(f"RabbitMQ user {user}: " + ("created" if user in made else "exists, permissions renewed")
            + ("" if ctl else " (run the commands above on the broker's host)"))
    return made


def _ctl(ctl: str | None, *args: str) -> str:
    done = subprocess.run([ctl or "rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {args[0]} failed: {(done.stderr or done.stdout).strip()[:300]}")
    return done.stdout


def _shell(arg: str) -> str:
    return arg if re.fullmatch(r"[\w./:-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"
