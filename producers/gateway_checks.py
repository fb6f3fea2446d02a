"""What the gateway publishes: commands checked by ``cqrskit.infra.validation`` (the check the
command workers make), one by one or as a batch, and their errors as problem documents."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pydantic_core

from cqrskit.domain.registry import Registry
from cqrskit.infra.amqp import OutgoingMessage
from cqrskit.infra.problems import FieldError, ProblemError
from cqrskit.infra.validation import CommandTooLarge, InvalidCommand, lone_surrogate_errors, validate_command


def command_problem(exc: InvalidCommand) -> ProblemError:
    """400 for an invalid command (every error at its path), 413 for one too large."""
    if isinstance(exc, CommandTooLarge):  # the body may not have been read to its end
        return ProblemError(413, "command-too-large", "Command too large", exc.reason,
                            headers={"Connection": "close"})
    return ProblemError(400, "invalid-command", "Invalid command", exc.reason, errors=exc.errors or None)


def invalid_batch(detail: str, status: int = 400, **extensions: Any) -> ProblemError:
    return ProblemError(status, "invalid-batch", "Invalid batch", detail, **extensions)


def check_command(body: bytes, registry: Registry, max_bytes: int) -> OutgoingMessage:
    """The message to publish for ``body``: the body itself, byte for byte, so that the workers
    decide on exactly what was checked here. Raises ProblemError: 400, or 413 when too large."""
    try:
        return _message(body, registry, max_bytes)
    except InvalidCommand as exc:
        raise command_problem(exc) from None


MAX_REPORTED = 20  # bad commands listed in a 400 (validation stops there); errors listed for each
MAX_ERRORS_EACH = 10


def check_batch(body: bytes, registry: Registry, max_bytes: int, max_commands: int,
                may_send: Callable[[str], bool] | None = None) -> list[OutgoingMessage]:
    """Every command of a JSON array checked as ``check_command`` checks one, on its own bytes.
    ``may_send``: the caller's scope, checked on every item's type before anything is validated
    (403 naming the first items outside it). Raises ProblemError: 400 listing the first
    ``MAX_REPORTED`` bad commands by index (``MAX_ERRORS_EACH`` errors each; validation stops
    there), or saying there are too many. CPU-bound: call it off the event loop."""
    try:
        parsed = _json_array(body)
    except (ValueError, IndexError, RecursionError) as exc:
        raise invalid_batch(str(exc), errors=lone_surrogate_errors(body) or None) from None
    count = len(parsed)
    if count > max_commands:
        raise invalid_batch(f"batch of {count} commands exceeds the limit of {max_commands}")  # the schema's maxItems
    if may_send is not None:
        _check_scope(parsed, may_send)
    try:
        items = _array_items(body)
    except (ValueError, IndexError, RecursionError) as exc:
        raise invalid_batch(str(exc)) from None
    messages, bad, seen = [], [], {}
    for index, item in enumerate(items):
        if len(bad) == MAX_REPORTED:
            raise invalid_batch(f"at least {len(bad)} of {count} commands are invalid (the first {len(bad)} are "
                                "listed); nothing was published", items=bad)
        try:
            message = _message(item, registry, max_bytes)
        except InvalidCommand as exc:
            bad.append(_bad_item(index, exc.reason, exc.errors))
            continue
        if message.message_id in seen:
            detail = f"command_id {message.message_id!r} is also at index {seen[message.message_id]}"
            bad.append(_bad_item(index, detail, [FieldError.at(["command_id"], detail, "duplicate", pointer=True)]))
        seen.setdefault(message.message_id, index)
        messages.append(message)
    if bad:
        raise invalid_batch(f"{len(bad)} of {count} commands are invalid; nothing was published", items=bad)
    return messages


def _check_scope(parsed: list[Any], may_send: Callable[[str], bool]) -> None:
    outside = [(index, item["type"]) for index, item in enumerate(parsed)
               if isinstance(item, dict) and isinstance(item.get("type"), str) and not may_send(item["type"])]
    if outside:
        shown = ", ".join(f"{index} ({kind[:100]!r})" for index, kind in outside[:MAX_REPORTED])
        raise ProblemError(403, "not-allowed", "Not allowed",
                           f"{len(outside)} of {len(parsed)} commands have a type this API key may not send, at "
                           f"index {shown}; nothing was published")


def _message(body: bytes, registry: Registry, max_bytes: int) -> OutgoingMessage:
    envelope = validate_command(body, registry, max_bytes).envelope
    return OutgoingMessage(body=body, routing_key=envelope.type, message_id=envelope.command_id)


def _bad_item(index: int, detail: str, errors: list[FieldError]) -> dict[str, Any]:
    listed = [e.model_dump(mode="json", exclude_none=True) for e in errors[:MAX_ERRORS_EACH]]
    more = {"more_errors": len(errors) - MAX_ERRORS_EACH} if len(errors) > MAX_ERRORS_EACH else {}
    return {"index": index, "detail": detail, "errors": listed} | more


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
