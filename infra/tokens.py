"""Consistency tokens (G8): what a command's outcome hands to a client so that a later query can
wait until the read models reflect that command.

A token names the streams the command wrote and their new versions, and is signed (HMAC-SHA256
with ``CQRSKIT_TOKEN_SECRET``, shared by the gateway and the query API) so that a forged or
altered token is refused. Opaque to clients: ``<payload>.<signature>``, both base64url.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass

MAX_STREAMS = 200


class InvalidToken(ValueError):
    """Malformed, altered or forged token."""


@dataclass(frozen=True)
class ConsistencyToken:
    streams: tuple[tuple[str, int], ...]  # (stream id, version), e.g. ("order:o-1", 3)
    trace: str | None = None  # the W3C traceparent of the command that wrote them (when tracing is on)

    def encode(self, secret: str) -> str:
        data: dict[str, object] = {"v": 1, "s": [list(s) for s in self.streams]}
        if self.trace:
            data["t"] = self.trace
        payload = _b64(json.dumps(data, separators=(",", ":")).encode())
        return f"{payload}.{_sign(secret, payload)}"

    @classmethod
    def decode(cls, token: str, secret: str) -> ConsistencyToken:
        """Raises InvalidToken unless ``token`` was made by ``encode`` with the same secret; never
        anything else, whatever the token holds (non-ASCII, huge numbers, lone surrogates)."""
        if not isinstance(token, str) or len(token) > 20_000 or token.count(".") != 1 or not token.isascii():
            raise InvalidToken("malformed consistency token")
        payload, signature = token.split(".")
        if not hmac.compare_digest(_sign(secret, payload).encode(), signature.encode()):
            raise InvalidToken("consistency token signature does not match")
        try:
            data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            streams = tuple(_stream(s, v) for s, v in data["s"])
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise InvalidToken(f"malformed consistency token: {str(exc)[:200]}") from None
        trace = data.get("t")
        if data.get("v") != 1 or len(streams) > MAX_STREAMS or not (trace is None or _is_trace(trace)):
            raise InvalidToken("unsupported consistency token")
        return cls(streams, trace)


def _is_trace(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 128 and value.isascii() and value.isprintable()


def _stream(stream_id: object, version: object) -> tuple[str, int]:
    """One (stream id, version) of a token, checked as the write store could have made it."""
    if not isinstance(stream_id, str) or not 0 < len(stream_id) <= 300 or not stream_id.isprintable() \
            or any("\ud800" <= char <= "\udfff" for char in stream_id):
        raise ValueError("a stream id is not a stream id")
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version < 2**31:
        raise ValueError("a version is not a stream version")
    return stream_id, version


def _sign(secret: str, payload: str) -> str:
    return _b64(hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
