"""One clear line per mistake: a misconfiguration or a service that cannot be reached ends a
command with the setting, its value (password masked) and the fix, an exit status other than 0
and no traceback (``cqrskit --debug`` shows it).

``explain`` turns what the drivers raise (SQLAlchemy/psycopg, pika, Dramatiq, the Elasticsearch
client, pydantic's settings validation) into a ``Problem``; ``CliGroup`` is the ``cqrskit``
command's click group, which prints that line for every verb.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterator, Mapping
from urllib.parse import urlsplit, urlunsplit

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from cqrskit.infra.settings import Settings

CONFIG_EXIT = 2
DATABASE, BROKER, SEARCH = "CQRSKIT_DATABASE_URL", "CQRSKIT_BROKER_URL", "CQRSKIT_ELASTICSEARCH_URL"
# variables read outside Settings: the parent's thread count for its Dramatiq children, the
# tests' services
OTHER_VARIABLES = {"CQRSKIT_PROCESS_THREADS", "CQRSKIT_TEST_PG", "CQRSKIT_TEST_AMQP"}


class Problem(Exception):
    """A mistake the user can fix: ``setting=value: what is wrong; the fix``."""

    def __init__(self, setting: str, value: str | None, problem: str, fix: str, exit_code: int = CONFIG_EXIT) -> None:
        super().__init__(problem)
        self.setting, self.value, self.problem, self.fix, self.exit_code = setting, value, problem, fix, exit_code

    def line(self) -> str:
        where = self.setting if self.value is None else f"{self.setting}={mask(self.value)}"
        return f"{where}: {self.problem}; {self.fix}"

    def __str__(self) -> str:
        return self.line()


def mask(value: str) -> str:
    """``value`` with the password of a URL replaced by ``***`` (of each URL of a comma-separated
    list: a cluster's broker nodes)."""
    if "," in value and "://" in value:
        return ",".join(mask(part) for part in value.split(","))
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if not parts.password:
        return value
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0] + ":***"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{netloc[1]}"))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        for arg in getattr(exc, "args", ()):  # pika nests the real cause in its arguments
            if isinstance(arg, BaseException):
                yield from _chain(arg)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def _setting_value(name: str, settings: Settings | None) -> str | None:
    if settings is not None:
        return str(getattr(settings, name.removeprefix("CQRSKIT_").lower()))
    return os.environ.get(name)


def explain(exc: BaseException, settings: Settings | None = None) -> Problem | None:
    """The ``Problem`` behind ``exc`` (anywhere in its chain), or None when it is not one."""
    for link in _chain(exc):
        if isinstance(link, Problem):
            return link
    for explainer in (_settings_problem, _database_problem, _broker_refusal, _broker_problem, _search_problem):
        for link in _chain(exc):
            found = explainer(link, settings)
            if found is not None:
                return found
    return None


def _settings_problem(exc: BaseException, settings: Settings | None) -> Problem | None:
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError) or exc.title != "Settings":
        return None
    first = exc.errors(include_url=False)[0]
    field = str(first["loc"][0]) if first["loc"] else "settings"
    message = re.sub(r"^Value error, ", "", first["msg"])
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return Problem(f"CQRSKIT_{field.upper()}", str(first.get("input")), message + more,
                   f"fix CQRSKIT_{field.upper()} or --{field.replace('_', '-')} (cqrskit --help lists the settings)")


def _database_problem(exc: BaseException, settings: Settings | None) -> Problem | None:
    import sqlalchemy as sa

    if not isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.ArgumentError)):
        return None
    value = _setting_value(DATABASE, settings)
    text = str(getattr(exc, "orig", None) or exc).strip()
    if isinstance(exc, sa.exc.ArgumentError):
        return Problem(DATABASE, value, f"not a SQLAlchemy URL ({text.splitlines()[0]})",
                       "use postgresql+psycopg://user:password@host:5432/db or sqlite:///path")
    if m := re.search(r'database "([^"]+)" does not exist', text):
        return Problem(DATABASE, value, f'database "{m[1]}" does not exist',
                       f"create it (createdb {m[1]}) or fix the URL, then run cqrskit setup")
    if m := re.search(r'authentication failed for user "([^"]+)"', text):
        return Problem(DATABASE, value, f'PostgreSQL refused the password of user "{m[1]}"',
                       "fix the user or the password in the URL")
    if m := re.search(r'role "([^"]+)" does not exist', text):
        return Problem(DATABASE, value, f'PostgreSQL has no user "{m[1]}"', "fix the user in the URL")
    if "Connection refused" in text or "could not connect" in text or "timeout expired" in text:
        host = _host_port(value, 5432)
        return Problem(DATABASE, value, f"nothing answers at {host}", "start PostgreSQL there or fix the URL")
    if "unable to open database file" in text:
        return Problem(DATABASE, value, "cannot open the SQLite file", "fix the path or make its folder writable")
    if "no such table" in text or "does not exist" in text:
        return _setup_missing(DATABASE, value, "the write store has no schema")
    return Problem(DATABASE, value, f"write store error: {text.splitlines()[0][:200]}", "check the URL and the server")


def _broker_refusal(exc: BaseException, settings: Settings | None) -> Problem | None:
    import pika.exceptions as pe

    value = _setting_value(BROKER, settings)
    if isinstance(exc, pe.ProbableAuthenticationError):
        return Problem(BROKER, value, "RabbitMQ refused the user or the password", "fix them in the URL")
    if isinstance(exc, pe.ProbableAccessDeniedError):
        return Problem(BROKER, value, "RabbitMQ refused access to the virtual host",
                       "create the vhost and grant the user permissions (rabbitmqctl set_permissions), or fix the URL")
    if isinstance(exc, pe.ChannelClosedByBroker) and exc.reply_code == 404:
        return _setup_missing(BROKER, value, f"the broker says: {exc.reply_text}")
    return None


def _broker_problem(exc: BaseException, settings: Settings | None) -> Problem | None:
    import pika.exceptions as pe

    value = _setting_value(BROKER, settings)
    if isinstance(exc, pe.AMQPConnectionError) or _is_dramatiq_connection(exc):
        return Problem(BROKER, value, f"nothing answers at {_host_port(value, 5672)}",
                       "start RabbitMQ there or fix the URL")
    return None


def _is_dramatiq_connection(exc: BaseException) -> bool:
    from dramatiq.errors import BrokerConnectionError

    return isinstance(exc, BrokerConnectionError)


def _search_problem(exc: BaseException, settings: Settings | None) -> Problem | None:
    from elastic_transport import ConnectionError as TransportConnectionError
    from elastic_transport import ConnectionTimeout, TlsError
    from elasticsearch import ApiError

    value = _setting_value(SEARCH, settings)
    if isinstance(exc, TlsError):
        return _tls_problem(exc, settings, value)
    if isinstance(exc, (TransportConnectionError, ConnectionTimeout)):
        return Problem(SEARCH, value, f"nothing answers at {_host_port(value, 9200)}",
                       "start a search server there (cqrskit search-server) or fix the URL")
    if isinstance(exc, ApiError) and exc.meta.status == 401:
        setting = _credential_setting(settings)
        return Problem(setting, value if setting == SEARCH else None,
                       f"the search server did not accept the credentials (401: {_es_reason(exc)})",
                       f"set {SEARCH_API_KEY} to an API key of this process's role (the encoded form) "
                       f"or put user:password in {SEARCH}")
    if isinstance(exc, ApiError) and exc.meta.status == 403:
        setting = _credential_setting(settings)
        return Problem(setting, value if setting == SEARCH else None,
                       f"the search server refused this process's role (403: {_es_reason(exc)})",
                       "give the key or user the role `cqrskit setup --privileges` prints for this process")
    return None


SEARCH_API_KEY = "CQRSKIT_ELASTICSEARCH_API_KEY"
SEARCH_CA = "CQRSKIT_ELASTICSEARCH_CA_CERTS"
SEARCH_FINGERPRINT = "CQRSKIT_ELASTICSEARCH_SSL_FINGERPRINT"


def _tls_problem(exc: BaseException, settings: Settings | None, url: str | None) -> Problem:
    text = " ".join(str(link) for link in [*_chain(exc), *getattr(exc, "errors", ())])
    reason = re.sub(r"\s+", " ", (re.search(r"\[SSL[^\]]*\] ([^(\)]+)", text) or re.search(r"(Fingerprints did not match[^'\\]*)", text)
                                  or re.search(r"(.{0,120})", text))[1]).strip()
    where = _host_port(url, 9200)
    fingerprint = settings.elasticsearch_ssl_fingerprint if settings is not None else os.environ.get(SEARCH_FINGERPRINT)
    if "wrong version number" in text or "record layer failure" in text:
        return Problem(SEARCH, url, f"TLS with {where} failed ({reason}): it does not speak HTTPS",
                       "use http:// in the URL, or the server's HTTPS port")
    if fingerprint:
        return Problem(SEARCH_FINGERPRINT, fingerprint, f"TLS with {where} failed ({reason})",
                       "set it to the SHA-256 of the server's certificate (Elasticsearch prints it at first start)")
    ca = settings.elasticsearch_ca_certs if settings is not None else os.environ.get(SEARCH_CA)
    return Problem(SEARCH_CA, str(ca) if ca else None, f"TLS with {where} failed ({reason})",
                   "set it to the PEM file of the CA that signed the server's certificate (Elasticsearch 8/9: "
                   f"config/certs/http_ca.crt), or set {SEARCH_FINGERPRINT}")


def _credential_setting(settings: Settings | None) -> str:
    """The setting that carries this process's search credentials: the API key, unless only the URL has some."""
    key = settings.elasticsearch_api_key if settings is not None else os.environ.get(SEARCH_API_KEY)
    url = _setting_value(SEARCH, settings) or ""
    return SEARCH if not key and "@" in urlsplit(url).netloc else SEARCH_API_KEY


def _es_reason(exc: object) -> str:
    """The ``error.reason`` of an Elasticsearch error body, shortened to one line."""
    body = getattr(exc, "body", None)
    error = body.get("error") if isinstance(body, dict) else None
    reason = error.get("reason") if isinstance(error, dict) else (error if isinstance(error, str) else None)
    text = re.sub(r"\s+", " ", str(reason or getattr(exc, "message", "") or "no reason given"))
    return text[:300] + ("..." if len(text) > 300 else "")


def _setup_missing(setting: str, value: str | None, problem: str) -> Problem:
    return Problem(setting, value, problem, "run cqrskit setup")


def _host_port(url: str | None, default_port: int) -> str:
    if url and "," in url:  # a cluster's nodes
        return " or ".join(_host_port(part, default_port) for part in url.split(","))
    try:
        parts = urlsplit(url or "")
        return f"{parts.hostname or '127.0.0.1'}:{parts.port or default_port}"
    except ValueError:
        return str(url)


# -- unknown variables ----------------------------------------------------------------------------
def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per ``CQRSKIT_*`` variable that no setting reads, with the nearest known name."""
    known = {f"CQRSKIT_{name.upper()}" for name in Settings.model_fields} | OTHER_VARIABLES
    warnings = []
    for name in sorted(environ if environ is not None else os.environ):
        if name.startswith("CQRSKIT_") and name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]}?" if near else ""
            warnings.append(f"{name} is not a cqrskit setting and is ignored{hint}")
    return warnings


# -- the command line -----------------------------------------------------------------------------
class CliGroup(TyperGroup):
    """The ``cqrskit`` group: a ``Problem`` (or an error ``explain`` understands) from any verb
    ends the command with its one line and exit status 2; ``--debug`` lets the traceback through.
    Ctrl-C ends quietly with status 130. Flags show no type placeholder in --help."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        _plain_flags(self)

    def invoke(self, ctx: typer.Context) -> object:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):
            raise
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            problem = explain(exc, ctx.obj if isinstance(ctx.obj, Settings) else None)
            if problem is None:
                raise
            typer.echo(problem.line(), err=True)
            raise typer.Exit(problem.exit_code) from None


def _plain_flags(command: object) -> None:
    """``--json`` rather than ``--json <bool>`` in the help of ``command`` and its sub-commands."""
    for param in getattr(command, "params", []):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    help_option = getattr(command, "get_help_option", None)
    if help_option is not None:
        def plain_help_option(ctx: object) -> object:
            option = help_option(ctx)
            if option is not None and option.metavar is None:
                option.metavar = ""
            return option

        command.get_help_option = plain_help_option  # type: ignore[attr-defined]
    for sub in getattr(command, "commands", {}).values():
        _plain_flags(sub)
