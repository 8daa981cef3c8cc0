"""The README and the documentation pages as a user reads them: every Python block runs as
written (each on its own, as it is pasted), every other block says why it does not run, the
docstring examples run, and the README stays short and free of links that break on the package
index page."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

from cct_loss import queue
from cct_loss.clients import clip, metric_learning
from cct_loss.front import functional, modules
from cct_loss.maths import reduction

#: The pages' snippets are CPU code.
pytestmark = pytest.mark.cpu_only

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
#: A fence, the line before it, its language and its body.
FENCE = re.compile(r"(?P<before>[^\n]*)\n```(?P<lang>[^\n]*)\n(?P<body>.*?)```", re.DOTALL)
#: What a block that does not run carries on the line before it.
NOT_RUN = re.compile(r"<!-- not run: [^>]+ -->")
#: Blocks that are not code: formulas, tables of numbers, outputs.
NOT_CODE = {"text"}


def blocks(page: Path) -> list[tuple[str, str, str]]:
    """``(language, body, the line before)`` of every fenced block of ``page``."""
    text = "\n" + page.read_text()
    return [(m["lang"].strip(), m["body"], m["before"]) for m in FENCE.finditer(text)]


PYTHON = [
    pytest.param(body, id=f"{page.name}[{i}]")
    for page in PAGES
    for i, (lang, body, before) in enumerate(blocks(page))
    if lang == "python" and not NOT_RUN.search(before)
]


def test_the_pages_have_python_blocks() -> None:
    assert len(PYTHON) >= 15


#: A line that prints what its comment shows: ``print(...)  # what it prints``.
PRINTS = re.compile(r"^\s*print\(.*\)\s+#\s?(?P<shown>.*)$", re.MULTILINE)


@pytest.mark.parametrize("code", PYTHON)
def test_python_block_runs_and_prints_what_it_shows(
    code: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every block runs; a ``print`` whose comment shows its output prints that (``...``
    stands for any text), so that a reader can check a pasted block by eye."""
    exec(compile(code, "<docs>", "exec"), {"__name__": "__docs__"})
    shown = [m["shown"] for m in PRINTS.finditer(code)]
    if not shown:
        return
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(shown), f"printed {printed}, the comments show {shown}"
    checker = doctest.OutputChecker()
    for want, got in zip(shown, printed, strict=True):
        assert checker.check_output(want + "\n", got + "\n", doctest.ELLIPSIS), (
            f"printed {got!r}, the comment shows {want!r}"
        )


def test_every_readme_block_prints_something_to_check() -> None:
    """The README's blocks each show a newcomer what to expect."""
    readme = [b for lang, b, before in blocks(ROOT / "README.md") if lang == "python"]
    assert readme and all(PRINTS.search(b) for b in readme)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_block_runs_or_says_why_not(page: Path) -> None:
    for lang, body, before in blocks(page):
        runs = lang == "python" and not NOT_RUN.search(before)
        marked = NOT_RUN.search(before) is not None
        assert runs or marked or lang in NOT_CODE, (
            f"{page.name}: a ```{lang} block neither runs nor says why not: {body[:80]!r}"
        )


def test_readme_fits_on_a_screen_and_its_links_work_on_the_package_index() -> None:
    """At most 250 lines; no relative link (it would break on the package index page), and
    nothing but absolute addresses."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    targets = re.findall(r"\]\(([^)]+)\)", text) + re.findall(r'src="([^"]+)"', text)
    assert targets, "the README links the paper"
    for target in targets:
        assert target.startswith("https://"), f"README link {target!r} is not absolute"


@pytest.mark.parametrize("module", [functional, modules, queue, reduction, clip, metric_learning])
def test_docstring_examples_run(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)  # type: ignore[arg-type]
    assert result.attempted > 0 or module is reduction
    assert result.failed == 0
