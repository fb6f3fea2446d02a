"""What the gateway publishes: commands checked by ``cqrskit.infra.validation`` (the check the
command workers make), one by one or as a batch, and their errors as problem documents."""

from __future__ import annotations

import json
import re
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


def check_batch(body: bytes, registry: Registry, max_bytes: int, max_commands: int) -> list[OutgoingMessage]:
    """Every command of a JSON array checked as ``check_command`` checks one, on its own bytes.
    Raises ProblemError: 400 listing each bad command's index and errors, or saying there are too many."""
    try:
        count = len(_json_array(body))
        items = _array_items(body)
    except (ValueError, IndexError, RecursionError) as exc:
        raise invalid_batch(str(exc), errors=lone_surrogate_errors(body) or None) from None
    if count > max_commands:
        raise invalid_batch(f"batch of {count} commands exceeds the limit of {max_commands}")  # the schema's maxItems
    messages, bad, seen = [], [], {}
    for index, item in enumerate(items):
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


def _message(body: bytes, registry: Registry, max_bytes: int) -> OutgoingMessage:
    envelope = validate_command(body, registry, max_bytes).envelope
    return OutgoingMessage(body=body, routing_key=envelope.type, message_id=envelope.command_id)


def _bad_item(index: int, detail: str, errors: list[FieldError]) -> dict[str, Any]:
    return {"index": index, "detail": detail, "errors": [e.model_dump(mode="json", exclude_none=True) for e in errors]}


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
