"""A read model's declarations are typed: the ``ReadModel`` protocol names everything cqrskit
reads, anything else is one line when the app is resolved, and a document's external version
comes from the streams it was built from (G6: the version that refuses stale writes cannot
drift from ``streams``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cqrskit.app.api import Document, streams_of
from cqrskit.examples.shop.domain import Customer, Order
from cqrskit.read_models.model import declaration_problems

MISSPELT = """
from cqrskit.app.api import App, Registry

class Things:
    name, stream_type, id_field = "things", "thing", "thing_id"
    mappings = {"properties": {"thing_id": {"type": "keyword"}}}
    reflect = {"thing": "held"}

    def affected(self, source, events):
        return {}

    def build(self, source, ids):
        return {}

app = App("misspelt", Registry(), read_models=[Things()])
"""


def test_a_misspelt_declaration_is_one_line_at_start_up(tmp_path: Path) -> None:
    """G10 for the developer: a read model's unknown attribute is refused, with the name meant."""
    (tmp_path / "misspelt.py").write_text(MISSPELT)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_")}
    done = subprocess.run([sys.executable, "-m", "cqrskit.app", "--app", "misspelt:app", "status"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**clean, "COLUMNS": "300"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert "unknown attribute 'reflect' (did you mean 'reflects'?)" in done.stderr, done.stderr


def test_the_example_read_models_declare_only_what_cqrskit_reads() -> None:
    from cqrskit.examples.hotel import app as hotel
    from cqrskit.examples.shop import app as shop

    assert [p for model in (*shop.read_models, *hotel.read_models) for p in declaration_problems(model)] == []


def test_a_document_takes_its_version_from_its_streams() -> None:
    """G6: the external version is the sum of the versions of the streams the document lists."""
    order, customer = Order("o1", 3), Customer("c1", 2)
    document = Document("o1", source={"streams": streams_of(order, customer)})
    assert document.version == 5
    assert Document("o1", 7, {"streams": []}).version == 7  # stated explicitly, it is kept
    with pytest.raises(ValueError, match="no version given and no 'streams'"):
        Document("o1", source={"title": "no streams"})
