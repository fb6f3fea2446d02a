"""The command envelope: the versioned JSON contract between producers and command workers.

``docs/command-envelope.schema.json`` is generated from these models (``cqrskit schema``) and a
test keeps the two equal. Everything a producer sends is checked here before any handler runs;
unknown fields are refused at every level (G10).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, StringConstraints

from cqrskit.infra.utc import written_as_a_date

IDENTIFIER = r"^[A-Za-z0-9][A-Za-z0-9._:@/-]*$"
Identifier = Annotated[str, StringConstraints(pattern=IDENTIFIER, min_length=1, max_length=128)]
AggregateId = Annotated[str, StringConstraints(pattern=IDENTIFIER, min_length=1, max_length=200)]
TypeName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_.]*$", min_length=1, max_length=200)]


class CommandMetadata(BaseModel):
    """Tracing and provenance. ``correlation_id`` defaults to the command id."""

    model_config = ConfigDict(extra="forbid", title="CommandMetadata")
    correlation_id: Identifier | None = Field(None, description="Shared by every message of one business flow.")
    causation_id: Identifier | None = Field(None, description="The id of the message that caused this command.")
    issued_at: Annotated[datetime, BeforeValidator(written_as_a_date)] | None = Field(
        None, description="When the producer issued the command (RFC 3339).")
    issuer: Annotated[str, StringConstraints(max_length=200, pattern=r"^[^\x00-\x1f]*$")] | None = Field(
        None, description="Who issued it: a system or user name, for audit."
    )


class CommandEnvelope(BaseModel):
    """One command. ``command_id`` is the idempotency key: a command id takes effect at most once."""

    model_config = ConfigDict(extra="forbid", title="CommandEnvelope")
    envelope_version: Literal[1] = Field(1, description="Version of this envelope format.")
    command_id: Identifier = Field(description="Unique per command, chosen by the producer (a UUID is ideal).")
    type: TypeName = Field(description="The command type, e.g. PlaceOrder.")
    aggregate_id: AggregateId = Field(description="The id of the aggregate the command is addressed to.")
    expected_version: Annotated[int, Strict()] | None = Field(  # strict: `false` is not version 0
        None, ge=0, description="Optimistic check: rejected unless the aggregate is at this version (0: new)."
    )
    payload: dict[str, Any] = Field(description="The command's fields; their schema depends on `type`.")
    metadata: CommandMetadata = Field(default_factory=CommandMetadata)

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


def envelope_json_schema() -> dict[str, Any]:
    """The JSON Schema of the envelope, as published under docs/."""
    schema = CommandEnvelope.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://cqrskit.dev/schemas/command-envelope.v1.json"
    return schema


def envelope_json_schema_text() -> str:
    return json.dumps(envelope_json_schema(), indent=2, sort_keys=True) + "\n"
