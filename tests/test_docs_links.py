"""The documentation points only at what exists: every relative Markdown link, and every file
named in backticks (``tests/test_relay.py``, ``docs/commands.md``...), resolves to a file or
folder of the repository, from the document's folder or from the repository's root."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.processes import PROJECT

DOCS = sorted([PROJECT / "README.md", *(PROJECT / "docs").glob("*.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)")
FILE = re.compile(r"`([\w./-]+\.(?:py|md|json|toml|sh|ini|yml|yaml)|[\w.-]+/(?:[\w.-]+/?)*)`")
# names the documents use for files a user makes, not files of this repository (docs/extending.md's
# tutorial project, made by `cqrskit new todo`)
# (and a media type; schema.json: the file of Elastic's npm package the conformance check reads)
EXAMPLES = {"commands.jsonl", "command.json", "tests/test_todo.py", "application/json", "schema.json"}
# config/certs/: an Elasticsearch install's own folder; library/: docs/process-managers.md's tutorial
# project; var/: made at run time (git-ignored)
USER_FOLDERS = ("todo/", "config/certs/", "library/", "var/")


def targets(doc: Path) -> list[str]:
    text = doc.read_text()
    links = [link.split("#")[0] for link in LINK.findall(text)
             if not link.startswith(("http://", "https://", "mailto:", "#"))]
    return [t for t in links + FILE.findall(text) if t and t not in EXAMPLES and not t.startswith(("/", *USER_FOLDERS))]  # /x: a URL path


def resolves(doc: Path, target: str) -> bool:
    """From the document's folder or the root; a bare name (``store.py`` in a table of a folder's
    files) anywhere in the repository's own folders."""
    if any((base / target).exists() for base in (doc.parent, PROJECT)):
        return True
    name = target.rstrip("/")
    return "/" not in name and any(p for p in PROJECT.rglob(name) if ".venv" not in p.parts and ".git" not in p.parts)


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(PROJECT)))
def test_every_file_the_docs_name_exists(doc: Path) -> None:
    missing = sorted({t for t in targets(doc) if not resolves(doc, t)})
    assert not missing, f"{doc.relative_to(PROJECT)} names what is not in the repository: {missing}"
