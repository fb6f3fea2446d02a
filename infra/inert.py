"""Text from outside, made inert before an operator's terminal shows it (G11).

A command's type, aggregate id or reason, a dead letter's headers or a forged traceback may carry
terminal control sequences (ESC ``[2J``, an OSC title, C1 ``CSI``), carriage returns that overwrite
a line, or bidirectional overrides that reorder what is read. ``inert`` shows every such character
as a visible escape (``\\x1b``, ``\\x9b``, ``\\u202e``), so that what is printed is what was sent,
and nothing of it is obeyed. Rich's ``escape()`` neutralises markup only: apply both.
"""

from __future__ import annotations

import re
from typing import Any

# C0 (but the newline and tab of a multi-line text), DEL, C1, and the Unicode controls that reorder
# or hide text: bidi embeddings, overrides and isolates, zero-width marks, line/paragraph separators.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_LINE_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def inert(value: Any) -> str:
    """``value`` as one line of inert text: every control character (newlines and tabs too) shown
    as an escape. ``None`` is ``''``; bytes are decoded with replacement."""
    if value is None:
        return ""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return _LINE_CONTROLS.sub(_visible, text)


def inert_lines(value: Any) -> str:
    """Like ``inert`` but keeps newlines and tabs (a traceback, a JSON document)."""
    if value is None:
        return ""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return _CONTROLS.sub(_visible, text)
