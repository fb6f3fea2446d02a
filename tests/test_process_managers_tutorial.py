"""docs/process-managers.md, run as written: its files make a project whose tests pass (the
process manager's given/when/then, and the Harness firing the timer with no sleep, refusing the
internal command from outside). No file of cqrskit is edited for it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.processes import PROJECT

DOC = PROJECT / "docs" / "process-managers.md"
BLOCK = re.compile(r"^`([^`]+)`:\n\n```[a-z]*\n(.*?)\n```$", re.MULTILINE | re.DOTALL)


def test_the_tutorials_project_passes_its_own_tests(tmp_path: Path) -> None:
    """G13: the page's process manager sends the internal command once its timer is due (a clock
    moved by the test), and the pipeline refuses that command from a producer."""
    files = dict(BLOCK.findall(DOC.read_text()))
    assert set(files) == {"library/domain.py", "library/app.py", "library/test_holds.py"}
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text + "\n")
    (tmp_path / "library" / "__init__.py").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "library/test_holds.py"],
                          cwd=tmp_path, env={**env, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout
