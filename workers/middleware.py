"""Cross-cutting concerns of the command workers, as Dramatiq middleware."""

from __future__ import annotations

import base64
import binascii

import dramatiq
import structlog
from dramatiq.broker import MessageProxy

from cqrskit.infra.outcomes import Outcome, Status
from cqrskit.infra.broker import COMMAND_ACTOR
from cqrskit.infra import tracing_hooks
from cqrskit.workers.execution import BadCommand, readable_command_id

log = structlog.get_logger("cqrskit.commands")


class LogContext(dramatiq.Middleware):
    """Every log line of one message carries its message id; nothing leaks to the next one."""

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(message_id=message.message_id, queue=message.queue_name)

    def after_process_message(self, broker, message, *, result=None, exception=None):  # type: ignore[no-untyped-def]
        structlog.contextvars.clear_contextvars()

    after_skip_message = after_process_message


class Tracing(dramatiq.Middleware):
    """Each message is a consumer span, a child of the trace context its options carry (the
    producer's ``traceparent``, the relay's); nothing when tracing is off (``cqrskit.infra.tracing``)."""

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        tracing_hooks.message_started(message)

    def after_process_message(self, broker, message, *, result=None, exception=None):  # type: ignore[no-untyped-def]
        tracing_hooks.message_ended(exception)

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        tracing_hooks.message_ended()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        tracing_hooks.worker_stopped()


class DeadOutcomes(dramatiq.Middleware):
    """When a command message is given up (retries exhausted, or unreadable), record outcome
    ``dead`` if its command id can be read and it has no outcome yet (G3). Must come after
    Dramatiq's Retries middleware, which decides ``message.failed``."""

    def __init__(self, runtime) -> None:  # type: ignore[no-untyped-def]
        self.runtime = runtime

    def after_process_message(self, broker, message, *, result=None, exception=None):  # type: ignore[no-untyped-def]
        if exception is None or not message.failed or message.actor_name != COMMAND_ACTOR:
            return
        body = _body(message)
        reason = _reason(exception)
        command_id = readable_command_id(body)
        if command_id is None or isinstance(exception, BadCommand):
            log.error("command.dead_lettered", reason=reason, command_id=command_id, body_bytes=len(body))
            return
        try:
            outcome = self.runtime.store.record_outcome(Outcome(command_id=command_id, status=Status.dead, reason=reason))
        except Exception as exc:  # the store may be the very thing that is down
            log.error("command.dead_lettered", command_id=command_id, reason=reason, outcome_not_recorded=str(exc)[:300])
            return
        log.error("command.dead_lettered", command_id=command_id, reason=reason, outcome=outcome.status.value)


def _body(message: MessageProxy) -> bytes:
    try:
        return base64.b64decode(message.args[0], validate=True)
    except (IndexError, TypeError, binascii.Error):
        return b""


def _reason(exception: BaseException) -> str:
    text = f"{type(exception).__name__}: {exception}"
    return text.replace("\x00", "\\u0000")[:1000]
