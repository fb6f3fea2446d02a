"""Events on the wire: what the relay publishes to the events exchange for other systems.

``docs/event-message.schema.json`` is generated from ``EventMessage``; a test keeps them equal.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cqrskit.infra.store import StoredEvent
from cqrskit.infra.utc import as_utc


class EventMessage(BaseModel):
    """One committed event. Delivered at least once: deduplicate by ``event_id`` (or by
    ``stream_id`` + ``version``). Per stream, ``version`` increases by one per event."""

    model_config = ConfigDict(extra="forbid", title="EventMessage")
    message_version: int = Field(1, description="Version of this message format.")
    event_id: str = Field(description="Unique id of the event (UUID).")
    position: int = Field(description="Global position in the write store's log (increasing, not gap-free).")
    stream_id: str = Field(description="<stream_type>:<aggregate_id>")
    stream_type: str = Field(description="The aggregate type, e.g. order.")
    aggregate_id: str
    version: int = Field(description="The event's version within its stream (1, 2, ...).")
    type: str = Field(description="The event type, e.g. OrderPlaced.")
    schema_version: int = Field(description="Version of the data's shape for this type.")
    data: dict[str, Any]
    command_id: str | None = Field(None, description="The command that caused this event.")
    correlation_id: str | None = None
    causation_id: str | None = Field(None, description="The id of the message that caused it: the command id.")
    recorded_at: datetime

    @classmethod
    def from_stored(cls, event: StoredEvent) -> EventMessage:
        meta = event.metadata or {}
        return cls(
            event_id=event.event_id,
            position=event.position,
            stream_id=event.stream_id,
            stream_type=event.stream_type,
            aggregate_id=event.stream_id.split(":", 1)[1],
            version=event.version,
            type=event.type,
            schema_version=event.schema_version,
            data=event.data,
            command_id=meta.get("command_id"),
            correlation_id=meta.get("correlation_id"),
            causation_id=meta.get("causation_id"),
            recorded_at=as_utc(event.recorded_at),
        )

    def routing_key(self) -> str:
        return f"{self.stream_type}.{self.type}"


def event_message_schema_text() -> str:
    schema = EventMessage.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://cqrskit.dev/schemas/event-message.v1.json"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
