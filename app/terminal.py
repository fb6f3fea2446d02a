"""What the CLI prints of text it did not write (G11): control characters shown as visible escapes
(``cqrskit.infra.inert``), rich markup escaped, JSON with nothing a terminal would obey."""

from __future__ import annotations

import json
from typing import Any

from rich.markup import escape

from cqrskit.infra.inert import inert, inert_lines


def shown(value: Any) -> str:
    """One line of outside text for a rich table or a markup string."""
    return escape(inert(value))


def shown_lines(value: Any) -> str:
    """Outside text of several lines (a traceback, an error) for a markup string."""
    return escape(inert_lines(value))


def inert_json(document: Any, indent: int | None = 2) -> str:
    """JSON in which every non-ASCII character and DEL is a ``\\u`` escape: C0 controls are escaped by
    JSON itself, C1 controls and bidi overrides are not, and some terminals obey them."""
    return json.dumps(document, indent=indent, ensure_ascii=True, default=str).replace("\x7f", "\\u007f")
