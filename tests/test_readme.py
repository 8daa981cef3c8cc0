"""The README's Python snippets run as written (each block on its own, as a user pastes it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

#: The README's snippets are CPU code.
pytestmark = pytest.mark.cpu_only

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_snippets() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index: int) -> None:
    code = BLOCKS[index]
    exec(compile(code, f"README.md[block {index}]", "exec"), {"__name__": "__readme__"})
