"""The gateway's HTTP contract: its response models and its OpenAPI document, in which the request
body is one of the registry's command types (the envelope's own JSON Schema for each)."""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from cqrskit.domain.registry import Registry
from cqrskit.infra.envelope import CommandEnvelope
from cqrskit.infra.problems import PROBLEM_JSON, FieldError, Problem

MAX_BATCH_COMMANDS = 1000


class BadItem(BaseModel):
    index: int = Field(description="Position of the bad command in the batch (from 0).")
    detail: str
    errors: list[FieldError] = Field(description="Its first errors (at most 10).")
    more_errors: int | None = Field(None, description="How many more errors it had, not listed.")


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


class GatewayProblem(Problem):
    """RFC 9457 problem details (``cqrskit.infra.problems``); the gateway's extension members:
    ``errors``, ``items`` (batch), ``commands``."""

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
    429: "Too many long polls (?wait=) held by this client, or by this server, at once.",
    503: "The broker did not confirm (nothing is promised: send again, same command id), "
         "or the write store did not answer.",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    schema = {"$ref": "#/components/schemas/Problem"}
    return {status: {"description": _PROBLEM_WHEN[status], "content": {PROBLEM_JSON: {"schema": schema}}}
            for status in statuses}


def request_body(ref: str) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": ref}}}}}


def document(app: FastAPI, registry: Registry) -> dict[str, Any]:
    """The OpenAPI document: the request body is one of the registry's command types, each the
    envelope's own JSON Schema with that type and its payload's schema. Internal command types
    (sent only by process managers) are left out: the gateway refuses them."""
    if app.openapi_schema is None:
        public = {name: model for name, model in registry.commands.items() if name not in registry.internal}
        spec = get_openapi(title=app.title, version=app.version, description=app.description,
                           routes=app.routes)
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        models = {"CommandEnvelope": CommandEnvelope, "Problem": GatewayProblem,
                  **{model.__name__: model for model in public.values()}}
        for name, model in models.items():
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[name] = schema
        mapping = {}
        for name, model in sorted(public.items()):
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
