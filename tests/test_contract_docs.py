"""The published contract stays true: the JSON Schema under docs/ equals the one generated from
the pydantic models, and the schema accepts what the models accept (G10's first line)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from cqrskit.app.cli import app
from cqrskit.infra.envelope import CommandEnvelope, envelope_json_schema, envelope_json_schema_text
from cqrskit.producers.commands import new_command

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_schema_file_equals_the_models() -> None:
    assert (DOCS / "command-envelope.schema.json").read_text() == envelope_json_schema_text(), (
        "docs/command-envelope.schema.json is stale: run `cqrskit schema`"
    )


def test_schema_describes_every_envelope_field_and_forbids_others() -> None:
    schema = envelope_json_schema()
    assert set(schema["properties"]) == set(CommandEnvelope.model_fields)
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"command_id", "type", "aggregate_id", "payload"}


def test_cli_schema_check_passes_from_the_repository_root(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(DOCS.parent)
    result = CliRunner().invoke(app, ["schema", "--check"])
    assert result.exit_code == 0, result.output


def test_an_envelope_round_trips_through_its_json() -> None:
    envelope = new_command("PlaceOrder", "o-1", {"customer_id": "c-1", "lines": [{"sku": "S", "quantity": 1}]},
                           correlation_id="flow-1", issuer="shop-frontend")
    again = CommandEnvelope.model_validate_json(envelope.to_json())
    assert again == envelope
    assert json.loads(envelope.to_json())["metadata"]["issuer"] == "shop-frontend"
