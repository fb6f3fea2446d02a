"""The command gateway (Procfile: ``gateway``): commands over HTTP for systems that do not speak AMQP.

Contracts (docs/commands.md is the envelope; this is the HTTP around it):
- ``POST /commands`` checks the body exactly as the command workers will (the same envelope
  models, the same NUL rule, the registry's payload models), publishes those very bytes and
  answers 202 only once the broker has confirmed them: from then on the command is durable (G1)
  and reaches an outcome (G3).
- Bad input gets a problem document (RFC 9457, ``application/problem+json``) naming every error
  at its path, and nothing is published (G10): 400 for a bad command, 413 for one over
  ``CQRSKIT_MAX_COMMAND_BYTES`` (refused from its Content-Length, before the body is read).
- 503 when the broker did not confirm: nothing is promised; send it again with the same command
  id, which takes effect at most once (G2).
- ``POST /commands/batch`` checks every command first and publishes none unless all are good,
  then publishes them with a window of confirms and says which ones the broker confirmed.
- ``GET /commands/{id}`` answers the outcome; a succeeded one carries a consistency token naming
  the version each written stream reached (G8). ``?wait=`` long-polls (capped).
- The gateway reads the write store and cannot write it: its connections are read-only (G11).
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote

import pydantic_core
import sqlalchemy as sa
import structlog
from fastapi import APIRouter, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from cqrskit.domain.registry import Registry, UnknownType
from cqrskit.infra.db import make_engine
from cqrskit.infra.envelope import IDENTIFIER, CommandEnvelope
from cqrskit.infra.schema import events
from cqrskit.infra.settings import Settings
from cqrskit.infra.store import read_outcome
from cqrskit.infra.tokens import ConsistencyToken
from cqrskit.infra.amqp import AmqpPublisher, CommandNotConfirmed, OutgoingMessage, PublisherClosed
from cqrskit.producers.commands import Publisher

log = structlog.get_logger("cqrskit.gateway")
PROBLEM = "application/problem+json"
PROBLEMS = "https://cqrskit.dev/problems/"
MAX_WAIT = 30.0
MAX_BATCH_COMMANDS = 1000
MAX_BATCH_BYTES = 4 * 1024 * 1024
DRAIN_BYTES = 1024 * 1024  # how far over its limit a body is still read (and dropped) before the 413


class ProblemError(Exception):
    """Answered as a problem document; ``extra`` members are added to it (RFC 9457 extensions)."""

    def __init__(self, status: int, kind: str, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.kind, self.title, self.detail, self.extra = status, kind, title, detail, extra


class InvalidCommand(ProblemError):
    def __init__(self, detail: str, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(400, "invalid-command", "Invalid command", detail, errors=errors or [])
        self.errors = errors or []


class CommandTooLarge(ProblemError):
    def __init__(self, size: int | str, limit: int) -> None:
        detail = f"command of {size} bytes exceeds CQRSKIT_MAX_COMMAND_BYTES={limit}"
        super().__init__(413, "command-too-large", "Command too large", detail)
        self.errors = [_error([], detail, "too_large")]


def _invalid_batch(detail: str, status: int = 400, **extra: Any) -> ProblemError:
    return ProblemError(status, "invalid-batch", "Invalid batch", detail, **extra)


# -- checking commands, as the workers will -------------------------------------------------
def check_command(body: bytes, registry: Registry, max_bytes: int) -> OutgoingMessage:
    """The message to publish for ``body``: the body itself, byte for byte, so that the workers
    decide on exactly what was checked here. Raises InvalidCommand (400) or CommandTooLarge (413)."""
    if len(body) > max_bytes:
        raise CommandTooLarge(len(body), max_bytes)
    try:
        envelope = CommandEnvelope.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidCommand("invalid command envelope", _document_errors(exc, body)) from None
    nul = _find_string(envelope.payload, ["payload"], _has_nul)
    if nul is not None:
        raise InvalidCommand("NUL character in a string", [_nul_error(nul)])
    huge = _find_string(envelope.payload, ["payload"], lambda v: isinstance(v, float) and not math.isfinite(v))
    if huge is not None:
        raise InvalidCommand("number out of range", [_error(huge, "not a finite number", "non_finite")])
    try:
        registry.command_type(envelope.type).model_validate(envelope.payload)
    except UnknownType as exc:
        known = ", ".join(sorted(registry.commands))
        errors = [_error(["type"], str(exc), "unknown_type")]
        raise InvalidCommand(f"{exc}; known types: {known}", errors) from None
    except ValidationError as exc:
        raise InvalidCommand(f"invalid payload for {envelope.type}", _errors(exc, ["payload"])) from None
    return OutgoingMessage(body=body, routing_key=envelope.type, message_id=envelope.command_id)


def check_batch(body: bytes, registry: Registry, max_bytes: int, max_commands: int) -> list[OutgoingMessage]:
    """Every command of a JSON array checked as ``check_command`` checks one, on its own bytes.
    Raises ProblemError: 400 listing each bad command's index and errors, 413 for too many."""
    try:
        count = len(_json_array(body))
        items = _array_items(body)
    except (ValueError, IndexError, RecursionError) as exc:
        raise _invalid_batch(str(exc), errors=_json_errors(body) or []) from None
    if count > max_commands:
        raise _invalid_batch(f"batch of {count} commands exceeds the limit of {max_commands}", 413)
    messages, bad, seen = [], [], {}
    for index, item in enumerate(items):
        try:
            message = check_command(item, registry, max_bytes)
        except (InvalidCommand, CommandTooLarge) as exc:
            bad.append({"index": index, "detail": exc.detail, "errors": exc.errors})
            continue
        if message.message_id in seen:
            detail = f"command_id {message.message_id!r} is also at index {seen[message.message_id]}"
            errors = [_error(["command_id"], detail, "duplicate")]
            bad.append({"index": index, "detail": detail, "errors": errors})
        seen.setdefault(message.message_id, index)
        messages.append(message)
    if bad:
        raise _invalid_batch(f"{len(bad)} of {count} commands are invalid; nothing was published", items=bad)
    return messages


def _json_array(body: bytes) -> list[Any]:
    try:
        items = pydantic_core.from_json(body)
    except ValueError as exc:
        raise ValueError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(items, list) or not items:
        raise ValueError("the body must be a JSON array of 1 or more commands")
    return items


_BLANK = re.compile(r"[ \t\n\r]*")


def _array_items(body: bytes) -> list[bytes]:
    """The bytes of each item of a JSON array (one ``_json_array`` accepted)."""
    text, decoder, items = body.decode(), json.JSONDecoder(), []
    at = _BLANK.match(text, _BLANK.match(text).end() + 1).end()  # type: ignore[union-attr]  # past "["
    while text[at] != "]":
        _, end = decoder.raw_decode(text, at)
        items.append(text[at:end].encode())
        at = _BLANK.match(text, end).end()  # type: ignore[union-attr]
        at = _BLANK.match(text, at + 1).end() if text[at] == "," else at  # type: ignore[union-attr]
    return items


def _document_errors(exc: ValidationError, body: bytes) -> list[dict[str, str]]:
    """Pydantic's errors, made precise where its own are not: lone surrogates and NUL."""
    if any(e["type"] == "json_invalid" for e in exc.errors()):
        return _json_errors(body) or _errors(exc)
    nul = _find_string(_loads(body), [], _has_nul)
    return _errors(exc) + ([] if nul is None else [_nul_error(nul)])


def _nul_error(path: list[str]) -> dict[str, str]:
    return _error(path, "NUL (\\u0000) is not allowed", "nul")


def _json_errors(body: bytes) -> list[dict[str, str]] | None:
    """A lone surrogate's path, when that is why the JSON was refused (``json`` decodes them)."""
    where = _find_string(_loads(body), [], lambda v: isinstance(v, str) and any("\ud800" <= c <= "\udfff" for c in v))
    if where is None:
        return None
    return [_error(where, "lone surrogate (unpaired \\ud800-\\udfff escape) in a string", "lone_surrogate")]


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _find_string(value: Any, path: list[str], bad: Callable[[str], bool]) -> list[str] | None:
    """The path of the first string or key for which ``bad`` holds."""
    try:
        return _find(value, path, bad)
    except RecursionError:  # deeper than any command; the parser's error says so
        return None


def _has_nul(value: Any) -> bool:
    return isinstance(value, str) and "\x00" in value


def _find(value: Any, path: list[str], bad: Callable[[Any], bool]) -> list[str] | None:
    if not isinstance(value, (dict, list)):
        return path if bad(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = [*path, str(key)]
        found = where if isinstance(key, str) and bad(key) else _find(item, where, bad)
        if found is not None:
            return found
    return None


def _errors(exc: ValidationError, prefix: Sequence[str] = ()) -> list[dict[str, str]]:
    """Pydantic's errors with their paths; the (hostile) input is never echoed."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)[:50]
    return [_error([*prefix, *map(str, e["loc"])], e["msg"], e["type"]) for e in errors]


def _error(path: Sequence[str], msg: str, type: str) -> dict[str, str]:
    safe = [_safe(part, 100) for part in path]
    pointer = "".join("/" + part.replace("~", "~0").replace("/", "~1") for part in safe)
    return {"loc": ".".join(safe), "pointer": pointer, "msg": _safe(msg, 500), "type": type}


def _safe(text: str, limit: int) -> str:
    """Encodable anywhere (no lone surrogates, no NUL), cut to ``limit``."""
    return text.encode("utf-8", "backslashreplace").decode().replace("\x00", "\\u0000")[:limit]


# -- the HTTP contract: DTOs and the OpenAPI document ----------------------------------------
class FieldError(BaseModel):
    loc: str = Field(description="Dotted path of the bad value, e.g. payload.lines.0.quantity ('': body).")
    pointer: str = Field(description="The same path as a JSON Pointer (RFC 6901).")
    msg: str
    type: str = Field(description="Machine-readable error type: missing, extra_forbidden, lone_surrogate...")


class BadItem(BaseModel):
    index: int = Field(description="Position of the bad command in the batch (from 0).")
    detail: str
    errors: list[FieldError]


class Accepted(BaseModel):
    command_id: str
    status: Literal["accepted"] = Field(description="The broker confirmed the command: it is durable.")
    outcome_url: str = Field(description="Where the outcome will be (GET; 404 until there is one).")


class BatchItem(BaseModel):
    command_id: str
    confirmed: bool = Field(description="False: the broker did not take it; send it again (same command id).")
    reason: str | None = Field(None, description="Why it was not confirmed.")
    outcome_url: str


class BatchAccepted(BaseModel):
    confirmed: int
    failed: int
    commands: list[BatchItem] = Field(description="One per command, in the order sent.")


class Problem(BaseModel):
    """RFC 9457 problem details; extension members: ``errors``, ``items`` (batch), ``commands``."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[FieldError] | None = Field(None, description="Every validation error, with its path.")
    items: list[BadItem] | None = Field(None, description="Batch: each bad command, by index.")
    commands: list[BatchItem] | None = Field(None, description="Batch refused by the broker: each command.")


class OutcomeView(BaseModel):
    command_id: str
    status: Literal["succeeded", "rejected", "invalid", "dead"]
    type: str | None = None
    aggregate_id: str | None = None
    reason: str | None = Field(None, description="Rejected, invalid, dead: why.")
    errors: list[dict[str, Any]] | None = Field(None, description="Invalid: each error as {loc, msg, type}.")
    aggregate_version: int | None = Field(None, description="Succeeded: the aggregate's new version.")
    positions: list[int] = Field(default_factory=list, description="Succeeded: positions of its events.")
    correlation_id: str | None = None
    causation_id: str | None = None
    recorded_at: datetime
    consistency_token: str | None = Field(
        None, description="Succeeded: pass as consistent_with to the query API to read your write (G8)."
    )


class Health(BaseModel):
    status: Literal["ok"]
    write_store: str = Field(description="'ok', or why the write store (outcomes) did not answer.")


_PROBLEM_WHEN = {
    400: "Invalid command(s): every error with its path; nothing was published.",
    404: "No outcome yet: the command is pending or was never received.",
    413: "Over CQRSKIT_MAX_COMMAND_BYTES (or the batch limits); nothing was published.",
    415: "The body is not application/json.",
    422: "Invalid path or query parameters.",
    503: "The broker did not confirm (nothing is promised: send again, same command id), "
         "or the write store did not answer.",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    schema = {"$ref": "#/components/schemas/Problem"}
    return {status: {"description": _PROBLEM_WHEN[status], "content": {PROBLEM: {"schema": schema}}}
            for status in statuses}


def _body(ref: str) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": ref}}}}}


def document(app: FastAPI, registry: Registry) -> dict[str, Any]:
    """The OpenAPI document: the request body is one of the registry's command types, each the
    envelope's own JSON Schema with that type and its payload's schema."""
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, description=app.description,
                           routes=app.routes)
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        for model in (CommandEnvelope, Problem, *registry.commands.values()):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        mapping = {}
        for name, model in sorted(registry.commands.items()):
            variant = copy.deepcopy(schemas["CommandEnvelope"])
            variant["title"] = f"{name} command"
            variant["properties"]["type"] = {"const": name, "type": "string"}
            variant["properties"]["payload"] = {"$ref": f"#/components/schemas/{model.__name__}"}
            schemas[f"{name}Command"] = variant
            mapping[name] = f"#/components/schemas/{name}Command"
        schemas["Command"] = {"oneOf": [{"$ref": ref} for ref in mapping.values()],
                              "discriminator": {"propertyName": "type", "mapping": mapping}}
        schemas["CommandBatch"] = {"type": "array", "items": {"$ref": "#/components/schemas/Command"},
                                   "minItems": 1, "maxItems": MAX_BATCH_COMMANDS}
        app.openapi_schema = spec
    return app.openapi_schema


# -- the application ------------------------------------------------------------------------
class Gateway:
    """The resources of one gateway process (made in the app's lifespan, released at its end)
    and its limits."""

    def __init__(self, settings: Settings, registry: Registry, publisher: Publisher, engine: Engine, *,
                 max_batch_bytes: int, max_wait: float) -> None:
        self.settings, self.registry, self.publisher, self.engine = settings, registry, publisher, engine
        self.max_batch_bytes, self.max_wait = max_batch_bytes, max_wait
        self._waiting: list[tuple[OutgoingMessage, asyncio.Future[None]]] = []
        self._groups: set[asyncio.Task[None]] = set()  # referenced until done (the loop holds tasks weakly)

    async def publish(self, message: OutgoingMessage) -> None:
        """Returns once the broker confirmed ``message``; raises a 503 ProblemError otherwise.
        The messages of requests that get here in one turn of the event loop go to the broker
        together (one ``publish_many`` in a worker thread), each request awaiting its own confirm."""
        confirmed = asyncio.get_running_loop().create_future()
        if not self._waiting:
            asyncio.get_running_loop().call_soon(self._hand_over)
        self._waiting.append((message, confirmed))
        try:
            await confirmed
        except (CommandNotConfirmed, PublisherClosed) as exc:
            log.warning("gateway.not_confirmed", command_id=message.message_id, reason=str(exc))
            raise _broker_problem(str(exc)) from None

    def _hand_over(self) -> None:
        group, self._waiting = self._waiting, []
        task = asyncio.ensure_future(self._publish_group(group))
        self._groups.add(task)
        task.add_done_callback(self._groups.discard)

    async def _publish_group(self, group: list[tuple[OutgoingMessage, asyncio.Future[None]]]) -> None:
        try:
            report = await run_in_threadpool(self.publisher.publish_many, [message for message, _ in group])
        except Exception as exc:  # PublisherClosed, or a bug: every waiting request hears of it
            failed, error = {}, exc
        else:  # a command id sent twice at once, and not confirmed once, counts as not confirmed
            failed, error = dict(report.failed), None
        for message, confirmed in group:
            if confirmed.done():  # the client went away
                continue
            if error is not None:
                confirmed.set_exception(error)
            elif message.message_id in failed:
                confirmed.set_exception(CommandNotConfirmed(message.message_id, failed[message.message_id]))
            else:
                confirmed.set_result(None)

    def outcome(self, command_id: str) -> OutcomeView | None:
        with self.engine.connect() as conn:
            outcome = read_outcome(conn, command_id)
            if outcome is None:
                return None
            view = OutcomeView.model_validate(outcome.model_dump(exclude={"duplicate"}))
            if outcome.status.value == "succeeded":
                view.consistency_token = self._token(conn, outcome.positions)
        return view

    def _token(self, conn: sa.Connection, positions: list[int]) -> str:
        """The newest version of every stream the command wrote (one query on the events), signed."""
        query = (
            sa.select(events.c.stream_id, sa.func.max(events.c.version))
            .where(events.c.position.in_(positions))
            .group_by(events.c.stream_id)
            .order_by(events.c.stream_id)
        )
        streams = tuple((stream, version) for stream, version in conn.execute(query)) if positions else ()
        return ConsistencyToken(streams).encode(self.settings.token_secret)


def read_only_engine(url: str) -> Engine:
    """An engine whose every transaction is read-only (PostgreSQL) or query-only (SQLite)."""
    engine = make_engine(url, pool_size=4)

    @sa.event.listens_for(engine, "connect")
    def _read_only(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        cursor = dbapi_connection.cursor()
        if engine.dialect.name == "postgresql":
            cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            dbapi_connection.commit()
        else:
            cursor.execute("PRAGMA query_only = ON")
        cursor.close()

    return engine


def create_app(settings: Settings, *, registry: Registry | None = None, publisher: Publisher | None = None,
               max_batch_bytes: int = MAX_BATCH_BYTES, max_wait: float = MAX_WAIT) -> FastAPI:
    """The gateway app; nothing connects before its lifespan starts. ``publisher``: one the caller
    owns (e.g. the embedded broker's); by default an AmqpPublisher on the commands exchange.
    ``max_wait`` caps the long poll of ``GET /commands/{id}?wait=``."""
    if publisher is None and settings.embedded_broker:
        raise ValueError("the gateway publishes to RabbitMQ: set CQRSKIT_BROKER_URL to an amqp:// URL")
    commands = registry or _shop_registry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        amqp = None if publisher else AmqpPublisher(settings.broker_url, settings.commands_exchange,
                                                    confirm_timeout=10.0)
        engine = read_only_engine(settings.database_url)
        app.state.gateway = Gateway(settings, commands, publisher or amqp, engine,  # type: ignore[arg-type]
                                    max_batch_bytes=max_batch_bytes, max_wait=max_wait)
        if amqp is not None:
            amqp.__enter__()  # connect now, not on the first command
        try:
            yield
        finally:
            if amqp is not None:
                await run_in_threadpool(amqp.close)
            engine.dispose()

    app = FastAPI(title="cqrskit command gateway", version="1", description=__doc__, lifespan=lifespan)
    app.include_router(router)
    for error, handler in PROBLEM_HANDLERS.items():
        app.add_exception_handler(error, handler)
    app.openapi = lambda: document(app, commands)  # type: ignore[method-assign]
    return app


def _shop_registry() -> Registry:
    from cqrskit.domain.shop import registry

    return registry


# -- the endpoints ----------------------------------------------------------------------------
router = APIRouter()
CommandIdPath = Annotated[str, Path(pattern=IDENTIFIER, max_length=128, description="The command id.")]
WaitSeconds = Annotated[float, Query(ge=0, allow_inf_nan=False, description=(
    f"Seconds to wait for the outcome when there is none yet (long poll), capped at {MAX_WAIT:g}."))]


@router.post("/commands", status_code=202, response_model=Accepted, summary="Send one command",
             response_description="Accepted: the broker confirmed the command.",
             openapi_extra=_body("#/components/schemas/Command"),
             responses=problem_responses(400, 413, 415, 503))
async def send_command(request: Request) -> JSONResponse:
    """Check the command as the workers will and publish it with a broker confirm. 202: the
    broker holds it (durable); its outcome will be at ``outcome_url`` (also the Location header)."""
    gateway: Gateway = request.app.state.gateway
    max_bytes = gateway.settings.max_command_bytes
    message = check_command(await _read_body(request, max_bytes), gateway.registry, max_bytes)
    await gateway.publish(message)
    log.info("gateway.accepted", command_id=message.message_id, type=message.routing_key)
    url = _outcome_url(request, message.message_id)  # type: ignore[arg-type]
    accepted = {"command_id": message.message_id, "status": "accepted", "outcome_url": url}
    return JSONResponse(accepted, status_code=202, headers={"Location": url})


@router.post("/commands/batch", status_code=202, response_model=BatchAccepted, summary="Send many commands",
             response_description="Accepted, each command with whether the broker confirmed it.",
             openapi_extra=_body("#/components/schemas/CommandBatch"),
             responses=problem_responses(400, 413, 415, 503))
async def send_batch(request: Request) -> BatchAccepted:
    """Check every command (400 lists each bad one by index; then nothing is published), then
    publish them with a window of confirms. 202 says which ones the broker confirmed: send the
    others again. 503 when it confirmed none."""
    gateway: Gateway = request.app.state.gateway
    body = await _read_body(request, gateway.max_batch_bytes)
    messages = check_batch(body, gateway.registry, gateway.settings.max_command_bytes, MAX_BATCH_COMMANDS)
    try:
        report = await run_in_threadpool(gateway.publisher.publish_many, messages)
    except PublisherClosed as exc:
        raise _broker_problem(str(exc)) from None
    failed = dict(report.failed)
    items = [_batch_item(request, m.message_id, failed) for m in messages]  # type: ignore[arg-type]
    if not report.confirmed:
        raise _broker_problem(report.failed[0][1], commands=[item.model_dump() for item in items])
    log.info("gateway.batch_accepted", confirmed=report.confirmed, failed=len(failed))
    return BatchAccepted(confirmed=report.confirmed, failed=len(failed), commands=items)


def _batch_item(request: Request, command_id: str, failed: dict[str | None, str]) -> BatchItem:
    return BatchItem(command_id=command_id, confirmed=command_id not in failed, reason=failed.get(command_id),
                     outcome_url=_outcome_url(request, command_id))


@router.get("/commands/{command_id:path}", response_model=OutcomeView, response_model_exclude_none=True,
            summary="The outcome of a command", response_description="The outcome.",
            responses=problem_responses(404, 422, 503))
async def command_outcome(request: Request, command_id: CommandIdPath, wait: WaitSeconds = 0) -> OutcomeView:
    """The command's terminal outcome (G3); a succeeded one carries ``consistency_token`` for
    read-your-writes queries (G8). 404 while there is none (pending or never received)."""
    gateway: Gateway = request.app.state.gateway
    deadline, pause = time.monotonic() + min(wait, gateway.max_wait), 0.02
    while (view := await run_in_threadpool(gateway.outcome, command_id)) is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or await request.is_disconnected():
            raise ProblemError(404, "outcome-not-known", "Outcome not known",
                               f"command {command_id!r} is not known yet: pending or never received")
        await asyncio.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.25)
    return view


@router.get("/health", response_model=Health, summary="Liveness, and whether the write store answers")
async def health(request: Request) -> Health:
    gateway: Gateway = request.app.state.gateway
    try:
        await run_in_threadpool(_ping, gateway.engine)
    except sa.exc.SQLAlchemyError as exc:
        return Health(status="ok", write_store=f"unreachable: {type(exc).__name__}")
    return Health(status="ok", write_store="ok")


def _ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) once it is known to exceed ``limit``: from Content-Length before
    reading anything when it is far over, else after reading and dropping up to DRAIN_BYTES more
    (a server that closes on a client still sending resets the connection, and the client may
    then never see the answer). 415 unless it is JSON."""
    media_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ProblemError(415, "unsupported-media-type", "Unsupported media type",
                           f"send the command as application/json, not {media_type!r}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + DRAIN_BYTES:
        raise CommandTooLarge(declared, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit + DRAIN_BYTES:
            raise CommandTooLarge(f"more than {limit + DRAIN_BYTES}", limit)
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise CommandTooLarge(size, limit)
    return b"".join(chunks)


def _outcome_url(request: Request, command_id: str) -> str:
    return f"{request.scope.get('root_path', '')}/commands/{quote(command_id, safe='')}"


def _broker_problem(reason: str, **extra: Any) -> ProblemError:
    return ProblemError(503, "broker-unavailable", "Broker did not confirm",
                        "the broker did not confirm the command, so nothing is promised; send it again "
                        f"with the same command id: {reason}", **extra)


# -- problem documents (RFC 9457) -----------------------------------------------------------
def problem(request: Request, status: int, title: str, detail: str, type: str,
            headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body = Problem(type=type, title=title, status=status, detail=detail, instance=request.url.path)
    content = {**body.model_dump(exclude_none=True), **extra}
    return JSONResponse(content, status_code=status, media_type=PROBLEM, headers=headers)


async def _on_problem(request: Request, exc: ProblemError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 503 else {}
    if exc.status == 413:
        headers["Connection"] = "close"  # the body may not have been read to its end
    extra = {key: value for key, value in exc.extra.items() if value}
    return problem(request, exc.status, exc.title, exc.detail, PROBLEMS + exc.kind, headers, **extra)


async def _on_invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [_error([str(part) for part in e["loc"]], e["msg"], e["type"]) for e in exc.errors()[:50]]
    return problem(request, 422, "Invalid request", "invalid request parameters",
                   PROBLEMS + "invalid-request", errors=errors)


async def _on_http(request: Request, exc: HTTPException) -> JSONResponse:
    return problem(request, exc.status_code, exc.detail, exc.detail, "about:blank", exc.headers or {})


async def _on_store_error(request: Request, exc: sa.exc.DBAPIError) -> JSONResponse:
    log.warning("gateway.write_store_error", error=type(exc.orig).__name__)
    return problem(request, 503, "Write store unavailable", "the write store did not answer; try again",
                   PROBLEMS + "write-store-unavailable", {"Retry-After": "1"})


async def _on_bug(request: Request, exc: Exception) -> JSONResponse:
    log.error("gateway.unexpected_error", exc_info=exc)
    return problem(request, 500, "Internal error", "the gateway failed unexpectedly (a bug)", "about:blank")


PROBLEM_HANDLERS: dict[Any, Callable[..., Any]] = {
    ProblemError: _on_problem, RequestValidationError: _on_invalid_request, HTTPException: _on_http,
    sa.exc.DBAPIError: _on_store_error, Exception: _on_bug,
}


# -- running it ----------------------------------------------------------------------------
def run_gateway(settings: Settings, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
                factory: str = "") -> None:
    """Serve the gateway with uvicorn until interrupted; ``workers`` > 1 runs that many processes
    from ``factory`` (a ``module:callable`` import string), each with its own publisher and engine;
    the settings reach them through the environment."""
    import uvicorn

    options: dict[str, Any] = dict(host=host, port=port, log_config=None, access_log=False,
                                   server_header=False, timeout_graceful_shutdown=10)
    if workers == 1:
        uvicorn.run(create_app(settings), **options)
        return
    os.environ.update(settings.environment())
    uvicorn.run(factory, factory=True, workers=workers, **options)
