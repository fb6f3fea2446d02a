"""Checking one command body: the single set of rules for everyone who checks a command, the
command workers before they decide (``cqrskit.workers.execution``) and the HTTP gateway before
it publishes (``cqrskit.producers.gateway``). The gateway's 202 promises that the workers will
not find the command invalid; that holds because both call ``validate_command``.

Contracts:
- ``validate_command`` returns the envelope and the command model, or raises ``InvalidCommand``
  (``CommandTooLarge`` over the byte limit) with a reason and every error at its path; it never
  raises anything else for any input, however hostile;
- the steps, in order: size limit, JSON and envelope (lone surrogates and NUL named precisely),
  NUL in payload strings, non-finite numbers, known command type, the type's payload model;
- errors never echo the input, and their text is safe to store or encode anywhere (no NUL, no
  lone surrogates, bounded lengths); at most 50 errors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cqrskit.domain.process import COMMAND_ID_PREFIX
from cqrskit.domain.registry import Registry, UnknownType
from cqrskit.infra.envelope import CommandEnvelope

MAX_ERRORS = 50


class FieldError(BaseModel):
    """One error at a path of some input (a command, a request's parameters)."""

    model_config = ConfigDict(frozen=True)
    loc: list[str | int] = Field(description="Path of the bad value, as pydantic gives it, e.g. "
                                             "['payload', 'lines', 0, 'quantity']; [] is the whole input.")
    msg: str
    type: str = Field(description="Machine-readable error type: missing, extra_forbidden, lone_surrogate...")
    pointer: str | None = Field(None, description="For an error in a JSON body: the same path as a JSON "
                                                  "Pointer (RFC 6901).")

    @classmethod
    def at(cls, loc: Sequence[str | int], msg: str, type: str, *, pointer: bool = False) -> FieldError:
        """An error with ``loc``'s parts and ``msg`` made safe (see ``safe_text``)."""
        safe = [part if isinstance(part, int) else safe_text(str(part), 100) for part in loc]
        where = "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in safe)
        return cls(loc=safe, msg=safe_text(msg, 500), type=type, pointer=where if pointer else None)

    def dotted(self) -> str:
        """The path as one dotted string, e.g. ``payload.lines.0.quantity`` ('': the whole input)."""
        return ".".join(str(part) for part in self.loc if part != "")[:300]

    def record(self) -> dict[str, str]:
        """As a command outcome stores it: ``{loc, msg, type}`` with a dotted ``loc``."""
        return {"loc": self.dotted(), "msg": self.msg, "type": self.type}


def field_errors(exc: ValidationError, prefix: Sequence[str | int] = (), *, pointer: bool = False
                 ) -> list[FieldError]:
    """Pydantic's errors with their paths (under ``prefix``); the (hostile) input is never echoed."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)[:MAX_ERRORS]
    return [FieldError.at([*prefix, *e["loc"]], e["msg"], e["type"], pointer=pointer) for e in errors]


def safe_text(text: str, limit: int) -> str:
    """``text`` encodable and storable anywhere (no lone surrogates, no NUL), cut to ``limit``."""
    return text.encode("utf-8", "backslashreplace").decode().replace("\x00", "\\u0000")[:limit]


class InvalidCommand(Exception):
    """A command that must not be executed. ``envelope`` is set when only the payload (or its type)
    is wrong; ``document`` is the body as ``json.loads`` reads it (None when it cannot), to look for
    a command id in when the envelope itself is wrong."""

    def __init__(self, reason: str, errors: list[FieldError], *, envelope: CommandEnvelope | None = None,
                 document: Any = None) -> None:
        super().__init__(reason)
        self.reason, self.errors, self.envelope, self.document = reason, errors, envelope, document


class ReservedCommandId(InvalidCommand):
    """A command id of the process managers' own (``pm:...``) on a command no reaction sent: never
    recorded (its outcome would take the id from the command a reaction will send), dead-lettered."""


class CommandTooLarge(InvalidCommand):
    def __init__(self, size: int | str, limit: int) -> None:
        reason = f"command of {size} bytes exceeds CQRSKIT_MAX_COMMAND_BYTES={limit}"
        super().__init__(reason, [FieldError.at([], reason, "too_large", pointer=True)])


@dataclass(frozen=True)
class ValidCommand:
    envelope: CommandEnvelope
    command: BaseModel


def validate_command(body: bytes, registry: Registry, max_bytes: int,
                     sent_internally: Callable[[CommandEnvelope], bool] | None = None) -> ValidCommand:
    """``body`` checked as a command of ``registry``: the envelope and the command, or InvalidCommand.
    An internal command type (``Registry.command(..., internal=True)``), or a command id with the
    process managers' prefix, passes only when ``sent_internally`` vouches for the envelope (a
    reaction sent it: the command workers ask the outbox; the gateway vouches for nothing)."""
    if len(body) > max_bytes:  # one byte over: what a worker keeps of a larger body (infra.broker)
        raise CommandTooLarge(len(body) if len(body) > max_bytes + 1 else f"more than {max_bytes}", max_bytes)
    try:
        envelope = CommandEnvelope.model_validate_json(body)
    except ValidationError as exc:
        document = _loads(body)
        errors = _document_errors(exc, body, document)
        raise InvalidCommand("invalid command envelope", errors, document=document) from None
    nul = _find_string(envelope.payload, ["payload"], _has_nul)
    if nul is not None:
        raise InvalidCommand("NUL character in a string", [_nul_error(nul)], envelope=envelope)
    huge = _find_string(envelope.payload, ["payload"], _is_non_finite)
    if huge is not None:
        error = FieldError.at(huge, "not a finite number", "non_finite", pointer=True)
        raise InvalidCommand("number out of range", [error], envelope=envelope)
    try:
        command = registry.command_type(envelope.type).model_validate(envelope.payload)
    except UnknownType as exc:
        known = ", ".join(sorted(registry.commands))
        error = FieldError.at(["type"], str(exc), "unknown_type", pointer=True)
        raise InvalidCommand(f"{exc}; known types: {known}", [error], envelope=envelope) from None
    except ValidationError as exc:
        errors = field_errors(exc, ["payload"], pointer=True)
        raise InvalidCommand(f"invalid payload for {envelope.type}", errors, envelope=envelope) from None
    _refuse_internal(envelope, registry, sent_internally)
    return ValidCommand(envelope, command)


def _refuse_internal(envelope: CommandEnvelope, registry: Registry,
                     sent_internally: Callable[[CommandEnvelope], bool] | None) -> None:
    reserved = envelope.command_id.startswith(COMMAND_ID_PREFIX)
    if not reserved and envelope.type not in registry.internal:
        return
    if sent_internally is not None and sent_internally(envelope):
        return
    if reserved:
        reason = f"command ids starting with {COMMAND_ID_PREFIX!r} are the process managers' own"
        raise ReservedCommandId(reason, [FieldError.at(["command_id"], reason, "reserved_id", pointer=True)])
    reason = f"internal command: {envelope.type} is sent only by the app's process managers"
    raise InvalidCommand(reason, [FieldError.at(["type"], reason, "internal_command", pointer=True)], envelope=envelope)


def lone_surrogate_errors(body: bytes) -> list[FieldError]:
    """The path of a lone surrogate in ``body`` (a JSON document), when that is why the JSON is
    refused (pydantic's parser refuses them, ``json`` decodes them); [] when there is none."""
    return _surrogate_errors(_loads(body))


def _document_errors(exc: ValidationError, body: bytes, document: Any) -> list[FieldError]:
    """Pydantic's errors, made precise where its own are not: lone surrogates and NUL."""
    if any(e["type"] == "json_invalid" for e in exc.errors()):
        return _surrogate_errors(document) or field_errors(exc, pointer=True)
    nul = _find_string(document, [], _has_nul)
    return field_errors(exc, pointer=True) + ([] if nul is None else [_nul_error(nul)])


def _surrogate_errors(document: Any) -> list[FieldError]:
    where = _find_string(document, [], _is_surrogate)
    if where is None:
        return []
    msg = "lone surrogate (unpaired \\ud800-\\udfff escape) in a string"
    return [FieldError.at(where, msg, "lone_surrogate", pointer=True)]


def _nul_error(path: list[str | int]) -> FieldError:
    return FieldError.at(path, "NUL (\\u0000) is not allowed", "nul", pointer=True)


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _has_nul(value: Any) -> bool:
    return isinstance(value, str) and "\x00" in value


def _is_surrogate(value: Any) -> bool:
    return isinstance(value, str) and any("\ud800" <= char <= "\udfff" for char in value)


def _is_non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _find_string(value: Any, path: list[str | int], bad: Callable[[Any], bool]) -> list[str | int] | None:
    """The path of the first leaf value or key for which ``bad`` holds, if any."""
    try:
        return _find(value, path, bad)
    except RecursionError:  # deeper than any command; the parser's error says so
        return None


def _find(value: Any, path: list[str | int], bad: Callable[[Any], bool]) -> list[str | int] | None:
    if isinstance(value, dict):
        for key, item in value.items():
            where = [*path, str(key)]
            found = where if bad(key) else _find(item, where, bad)
            if found is not None:
                return found
        return None
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _find(item, [*path, index], bad)
            if found is not None:
                return found
        return None
    return path if bad(value) else None
