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

    def encode(self, secret: str) -> str:
        payload = _b64(json.dumps({"v": 1, "s": [list(s) for s in self.streams]}, separators=(",", ":")).encode())
        return f"{payload}.{_sign(secret, payload)}"

    @classmethod
    def decode(cls, token: str, secret: str) -> ConsistencyToken:
        """Raises InvalidToken unless ``token`` was made by ``encode`` with the same secret."""
        if not isinstance(token, str) or len(token) > 20_000 or token.count(".") != 1:
            raise InvalidToken("malformed consistency token")
        payload, signature = token.split(".")
        if not hmac.compare_digest(_sign(secret, payload), signature):
            raise InvalidToken("consistency token signature does not match")
        try:
            data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            streams = tuple((str(s), int(v)) for s, v in data["s"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidToken(f"malformed consistency token: {exc}") from None
        if data.get("v") != 1 or len(streams) > MAX_STREAMS:
            raise InvalidToken("unsupported consistency token")
        return cls(streams)


def _sign(secret: str, payload: str) -> str:
    return _b64(hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
