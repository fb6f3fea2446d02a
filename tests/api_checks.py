"""The schemathesis checks both query-API test modules run (registered once: a check is global)."""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis import checks

HTTP_LINE_LIMIT = 64 * 1024


@schemathesis.check
def conforms_unless_refused_by_uvicorn(ctx: Any, response: Any, case: Any) -> bool | None:
    """Content type and body as documented, except when uvicorn itself refused an oversized request
    line (400, text/plain, before the app sees it): the longest non-ASCII values the schema allows,
    percent-encoded, get there (a token may be 20,000 characters)."""
    if (response.status_code == 400 and len(response.request.url) > HTTP_LINE_LIMIT
            and response.content == b"Invalid HTTP request received."):
        return None
    checks.content_type_conformance(ctx, response, case)
    return checks.response_schema_conformance(ctx, response, case)


CHECKS = [checks.not_a_server_error, checks.status_code_conformance, conforms_unless_refused_by_uvicorn]
