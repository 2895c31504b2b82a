"""The Python examples of README.md and docs/ run as written.

A fenced ```python block right after a ``<!-- runnable -->`` line is run as a
script in a fresh interpreter (from a temporary folder, so its agents
re-import it as ``__main__``), with a bus name of the test's own in place of
``"demo"`` so parallel tests never share a bus. It must exit 0 and leave
nothing in /dev/shm.

Issue 17 found the README's first example failing 8 runs of 8 with
UnknownRecipient: nothing ran the examples.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- runnable -->"
_BLOCK = re.compile(re.escape(MARK) + r"\s*\n```python\n(.*?)\n```", re.S)


def _examples() -> list[tuple[str, str]]:
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, code in enumerate(_BLOCK.findall(page.read_text())):
            found.append((f"{page.relative_to(ROOT)}#{i + 1}", code))
    return found


EXAMPLES = _examples()


def test_the_readme_has_runnable_examples():
    assert sum(1 for where, _ in EXAMPLES if where.startswith("README.md")) >= 2


@pytest.mark.parametrize(("where", "code"), EXAMPLES, ids=[w for w, _ in EXAMPLES])
def test_example_runs_as_written(
    where: str, code: str, names: Callable[[str], str], runtime: str, tmp_path: Path
):
    assert '"demo"' in code, f'{where}: the example names no bus "demo" to replace'
    script = tmp_path / "example.py"
    script.write_text(code.replace('"demo"', repr(names("doc"))))
    env = {**os.environ, "XDG_RUNTIME_DIR": runtime, "SHMBUS_STATE_DIR": str(tmp_path / "state")}
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{where} failed:\n{result.stdout}\n{result.stderr}"
