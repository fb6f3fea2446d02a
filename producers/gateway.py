"""The command gateway (Procfile: ``gateway``): commands over HTTP for systems that do not speak AMQP.

Contracts (docs/commands.md is the envelope; this is the HTTP around it):
- ``POST /commands`` checks the body exactly as the command workers will (both call
  ``cqrskit.infra.validation.validate_command``), publishes those very bytes and
  answers 202 only once the broker has confirmed them: from then on the command is durable (G1)
  and reaches an outcome (G3).
- Bad input gets a problem document (RFC 9457, ``cqrskit.infra.problems``) naming every error
  at its path, and nothing is published (G10): 400 for a bad command, 413 for one over
  ``CQRSKIT_MAX_COMMAND_BYTES`` (refused from its Content-Length, before the body is read).
- 503 when the broker did not confirm: nothing is promised; send it again with the same command
  id, which takes effect at most once (G2).
- ``POST /commands/batch`` checks every command first and publishes none unless all are good,
  then publishes them with a window of confirms and says which ones the broker confirmed.
- ``GET /commands/{id}`` answers the outcome; a succeeded one carries a consistency token naming
  the version each written stream reached (G8). ``?wait=`` long-polls (capped).
- The gateway reads the write store and cannot write it: its connections are read-only (G11).

Here: the app, its routes and its resources; ``gateway_checks`` checks what it publishes,
``gateway_dto`` holds its response models and OpenAPI document.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import quote

import sqlalchemy as sa
import structlog
from fastapi import APIRouter, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from cqrskit.domain.registry import Registry
from cqrskit.infra.db import make_engine
from cqrskit.infra.delivery import ISSUER_HEADER
from cqrskit.infra.envelope import IDENTIFIER
from cqrskit.infra.http_auth import Authenticate, Authentication, current_key, declare_security, server_limits
from cqrskit.infra.problems import Problem, ProblemError, add_problem_handlers, problem_response, problem_type
from cqrskit.infra.http_observe import observe
from cqrskit.infra.tracing_hooks import command_trace, publishing
from cqrskit.infra.settings import Settings
from cqrskit.infra.store import read_outcome, stream_versions
from cqrskit.infra.tokens import ConsistencyToken
from cqrskit.infra.amqp import AmqpPublisher, CommandNotConfirmed, OutgoingMessage, PublisherClosed
from cqrskit.infra.validation import CommandTooLarge
from cqrskit.producers.commands import Publisher
from cqrskit.producers.gateway_checks import check_batch, check_command, command_problem
from cqrskit.producers.gateway_dto import (MAX_BATCH_COMMANDS, Accepted, BatchAccepted, BatchItem, Health,
                                           OutcomeView, document, problem_responses, request_body)

__all__ = ["check_command", "create_app", "read_only_engine", "run_gateway"]

log = structlog.get_logger("cqrskit.gateway")
MAX_WAIT = 30.0
MAX_BATCH_BYTES = 4 * 1024 * 1024
DRAIN_BYTES = 1024 * 1024  # how far over its limit a body is still read (and dropped) before the 413


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
        """The newest version of every stream the command wrote, signed."""
        streams = stream_versions(conn, positions)
        return ConsistencyToken(streams, command_trace(conn, positions)).encode(self.settings.token_secret)


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


def create_app(settings: Settings, *, registry: Registry, publisher: Publisher | None = None,
               max_batch_bytes: int = MAX_BATCH_BYTES, max_wait: float = MAX_WAIT,
               authenticate: Authenticate | None = None, docs: bool = True) -> FastAPI:
    """The gateway app; nothing connects before its lifespan starts. ``publisher``: one the caller
    owns (e.g. the embedded broker's); by default an AmqpPublisher on the commands exchange.
    ``max_wait`` caps the long poll of ``GET /commands/{id}?wait=``. ``authenticate``: API keys
    (``cqrskit.infra.api_keys``): every request but ``/health`` needs one, a command is sent only
    if its type is in the key's scope and records the key as its issuer (G11); None: nobody is
    authenticated (the embedded default, ``--insecure``). Each client holds at most
    ``settings.max_consistency_waits`` outcome long polls (``?wait=``) at once, the process
    ``max_consistency_waits_total`` (429 beyond). ``docs``: serve ``/docs``."""
    if publisher is None and settings.embedded_broker:
        raise ValueError("the gateway publishes to RabbitMQ: set CQRSKIT_BROKER_URL to an amqp:// URL")
    commands = registry

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

    app = FastAPI(title="cqrskit command gateway", version="1", description=__doc__, lifespan=lifespan,
                  docs_url="/docs" if docs else None, redoc_url=None)
    app.include_router(router)
    app.add_middleware(Authentication, authenticate=authenticate, open_paths=("/health",), wait_parameter="wait",
                       max_waits=settings.max_consistency_waits, max_total_waits=settings.max_consistency_waits_total)
    add_problem_handlers(app, log, {sa.exc.DBAPIError: _on_store_error})
    if authenticate is None:
        app.openapi = lambda: document(app, commands)  # type: ignore[method-assign]
    else:
        app.openapi = lambda: declare_security(document(app, commands), wait_parameter="wait")  # type: ignore[method-assign]
    return observe(app, "gateway")  # access log and GET /metrics


# -- the endpoints ----------------------------------------------------------------------------
router = APIRouter()
CommandIdPath = Annotated[str, Path(pattern=IDENTIFIER, max_length=128, description="The command id.")]
WaitSeconds = Annotated[float, Query(ge=0, allow_inf_nan=False, description=(
    f"Seconds to wait for the outcome when there is none yet (long poll), capped at {MAX_WAIT:g}."))]


@router.post("/commands", status_code=202, response_model=Accepted, summary="Send one command",
             response_description="Accepted: the broker confirmed the command.",
             openapi_extra=request_body("#/components/schemas/Command"),
             responses=problem_responses(400, 413, 415, 503))
async def send_command(request: Request) -> JSONResponse:
    """Check the command as the workers will and publish it with a broker confirm. 202: the
    broker holds it (durable); its outcome will be at ``outcome_url`` (also the Location header)."""
    gateway: Gateway = request.app.state.gateway
    max_bytes = gateway.settings.max_command_bytes
    message = _as_issued(request, check_command(await _read_body(request, max_bytes), gateway.registry, max_bytes))
    with publishing([message], gateway.settings.commands_exchange) as traced:  # its traceparent in the headers
        await gateway.publish(traced[0])
    log.info("gateway.accepted", command_id=message.message_id, type=message.routing_key)
    url = _outcome_url(request, message.message_id)  # type: ignore[arg-type]
    accepted = {"command_id": message.message_id, "status": "accepted", "outcome_url": url}
    return JSONResponse(accepted, status_code=202, headers={"Location": url})


@router.post("/commands/batch", status_code=202, response_model=BatchAccepted, summary="Send many commands",
             response_description="Accepted, each command with whether the broker confirmed it.",
             openapi_extra=request_body("#/components/schemas/CommandBatch"),
             responses=problem_responses(400, 413, 415, 503))
async def send_batch(request: Request) -> BatchAccepted:
    """Check every command (400 lists each bad one by index; then nothing is published), then
    publish them with a window of confirms. 202 says which ones the broker confirmed: send the
    others again. 503 when it confirmed none."""
    gateway: Gateway = request.app.state.gateway
    body = await _read_body(request, gateway.max_batch_bytes)
    key = current_key(request)
    messages = await run_in_threadpool(check_batch, body, gateway.registry, gateway.settings.max_command_bytes,
                                       MAX_BATCH_COMMANDS, key.may_send if key is not None else None)
    messages = [_as_issued(request, message) for message in messages]
    try:
        with publishing(messages, gateway.settings.commands_exchange) as traced:  # their traceparent in the headers
            report = await run_in_threadpool(gateway.publisher.publish_many, traced)
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
            responses=problem_responses(404, 422, 429, 503))
async def command_outcome(request: Request, command_id: CommandIdPath, wait: WaitSeconds = 0) -> OutcomeView:
    """The command's terminal outcome (G3); a succeeded one carries ``consistency_token`` for
    read-your-writes queries (G8). 404 while there is none (pending or never received)."""
    gateway: Gateway = request.app.state.gateway
    if len(request.query_params.getlist("wait")) > 1:  # FastAPI would keep the last one, silently
        raise ProblemError(422, "invalid-parameters", "Invalid parameters", "wait is given more than once")
    key = current_key(request)
    deadline, pause = time.monotonic() + min(wait, gateway.max_wait), 0.02
    # an outcome the key may not see is waited for as an unknown id is: the same 404 at the same time
    while (view := await run_in_threadpool(gateway.outcome, command_id)) is None or not _visible(key, view):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or await request.is_disconnected():
            raise ProblemError(404, "outcome-not-known", "Outcome not known",
                               f"command {command_id!r} is not known yet: pending or never received")
        await asyncio.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.25)
    return view


def _visible(key: Any, view: OutcomeView) -> bool:
    return key is None or bool(view.type and key.may_send(view.type))


def _as_issued(request: Request, message: OutgoingMessage) -> OutgoingMessage:
    """``message`` with the issuer header of the request's API key, if its scope allows the type
    (403 otherwise). The workers honour the header only from the gateway's own RabbitMQ user."""
    key = current_key(request)
    if key is None:
        return message
    if not key.may_send(message.routing_key):
        raise ProblemError(403, "not-allowed", "Not allowed",
                           f"API key {key.key_id!r} may not send {message.routing_key}")
    return dataclasses.replace(message, headers={ISSUER_HEADER: key.issuer})


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
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise ProblemError(415, "unsupported-media-type", "Unsupported media type",
                           f"send the command as application/json, not {media_type!r}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + DRAIN_BYTES:
        raise command_problem(CommandTooLarge(declared, limit))
    chunks, size = [], 0
    async for chunk in _stream_in_time(request, request.app.state.gateway.settings.http_body_timeout):
        size += len(chunk)
        if size > limit + DRAIN_BYTES:
            raise command_problem(CommandTooLarge(f"more than {limit + DRAIN_BYTES}", limit))
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise command_problem(CommandTooLarge(size, limit))
    return b"".join(chunks)


async def _stream_in_time(request: Request, timeout: float) -> AsyncIterator[bytes]:
    """The body's chunks, or a 408 once the client took more than ``timeout`` seconds to send it all
    (a slow body must not hold a connection and a task for ever)."""
    deadline = time.monotonic() + timeout
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - time.monotonic()))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise ProblemError(408, "request-timeout", "Request timeout",
                               f"the request body did not arrive within {timeout:g} s",
                               headers={"Connection": "close"}) from None
        yield chunk


def _outcome_url(request: Request, command_id: str) -> str:
    return f"{request.scope.get('root_path', '')}/commands/{quote(command_id, safe='')}"


def _broker_problem(reason: str, **extensions: Any) -> ProblemError:
    return ProblemError(503, "broker-unavailable", "Broker did not confirm",
                        "the broker did not confirm the command, so nothing is promised; send it again "
                        f"with the same command id: {reason}", headers={"Retry-After": "1"}, **extensions)


async def _on_store_error(request: Request, exc: sa.exc.DBAPIError) -> JSONResponse:
    log.warning("gateway.write_store_error", error=type(exc.orig).__name__)
    problem = Problem(type=problem_type("write-store-unavailable"), title="Write store unavailable", status=503,
                      detail="the write store did not answer; try again")
    return problem_response(request, problem, {"Retry-After": "1"})


# -- running it ----------------------------------------------------------------------------
def run_gateway(settings: Settings, registry: Registry, host: str = "127.0.0.1", port: int = 8000,
                workers: int = 1, factory: str = "", app: FastAPI | None = None) -> None:
    """Serve the gateway with uvicorn until interrupted; ``workers`` > 1 runs that many processes
    from ``factory`` (a ``module:callable`` import string), each with its own publisher and engine;
    the settings reach them through the environment."""
    import uvicorn

    options: dict[str, Any] = dict(host=host, port=port, log_config=None, access_log=False,
                                   server_header=False, timeout_graceful_shutdown=10, **server_limits(settings))
    if workers == 1:
        uvicorn.run(app or create_app(settings, registry=registry), **options)
        return
    os.environ.update(settings.environment())
    uvicorn.run(factory, factory=True, workers=workers, **options)
