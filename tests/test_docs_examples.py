"""Every fenced ```python block of README.md and docs/ runs here, so the docs cannot rot.

The blocks of one page run in order in one namespace (a later block may use what an earlier one defined), with
the working directory a fresh temporary folder per page (examples may write `runs/...`). A block that cannot run
on this machine carries, on the line right before its fence, an HTML comment that MkDocs and GitHub do not show:

    <!-- not-run: needs a downloaded checkpoint -->

Such a block still has its syntax checked and its top-level imports run (moved modules are the commonest rot), then
it is reported as skipped with its reason; a marker without a reason fails. ```bash and other fences are not run.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```\s*(\w*)")
MARKER = re.compile(r"^<!--\s*not-run\s*:?(.*?)-->\s*$")


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    code: str
    not_run: str | None  # the marker's reason; "" for a marker without one; None when the block runs


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(text: str, page: str) -> list[Block]:
    """The ```python (or ```py) blocks of one Markdown page, in order, with the not-run marker before each."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise ValueError(f"{page}:{i + 1}: code fence never closed")
        if fence.group(1) in ("python", "py"):
            marker = MARKER.match(lines[i - 1].strip()) if i > 0 else None
            not_run = marker.group(1).strip() if marker else None
            blocks.append(Block(page, i + 1, "\n".join(lines[i + 1 : end]) + "\n", not_run))
        i = end + 1
    return blocks


def all_blocks() -> list[Block]:
    return [b for p in doc_pages() for b in python_blocks(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]


BLOCKS = all_blocks()


class PageRun:
    """One namespace and one working folder per page; blocks run in order, each at most once."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.namespace: dict = {"__name__": "__docs__"}
        self.done: set[int] = set()
        self.failed: Block | None = None


@pytest.fixture(scope="session")
def page_runs() -> dict[str, PageRun]:
    return {}


def run_code(code: str, filename: str, namespace: dict, folder: Path) -> None:
    """exec `code` with `folder` as the working directory; the filename makes tracebacks point at the page."""
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        exec(compile(code, filename, "exec"), namespace)
    finally:
        os.chdir(cwd)


def block_source(block: Block) -> tuple[str, str]:
    """The block's code padded so that line numbers in a traceback are the page's own, and its filename."""
    return "\n" * block.line + block.code, block.page


def test_the_docs_have_python_blocks():
    pages = {b.page for b in BLOCKS}
    assert "README.md" in pages and any(p.startswith("docs/") for p in pages)


def test_markers_are_read():
    page = "text\n\n<!-- not-run: needs a GPU -->\n```python\nx = 1\n```\n\n```bash\nls\n```\n```py\ny = x\n```\n"
    blocks = python_blocks(page, "t.md")
    assert [(b.line, b.not_run, b.code) for b in blocks] == [(4, "needs a GPU", "x = 1\n"), (11, None, "y = x\n")]
    assert python_blocks("<!-- not-run -->\n```python\npass\n```\n", "t.md")[0].not_run == ""
    with pytest.raises(ValueError, match=r"t.md:1: code fence never closed"):
        python_blocks("```python\nx = 1\n", "t.md")


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.page}:{b.line}" for b in BLOCKS])
def test_docs_example(block: Block, page_runs, tmp_path_factory):
    code, filename = block_source(block)
    if block.not_run is not None:
        if not block.not_run:
            pytest.fail(f"{block.page}:{block.line - 1}: a not-run marker must give a reason", pytrace=False)
        tree = ast.parse(code, filename)  # a syntax error fails even a block that is not run
        imports = ast.Module([n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)], type_ignores=[])
        exec(compile(imports, filename, "exec"), {})
        pytest.skip(f"not run ({block.not_run}); syntax and imports checked")

    if block.page not in page_runs:
        page_runs[block.page] = PageRun(tmp_path_factory.mktemp(Path(block.page).stem))
    run = page_runs[block.page]
    # Earlier runnable blocks of the page first (they may be deselected, e.g. with -k), in order, once each.
    for earlier in (b for b in BLOCKS if b.page == block.page and b.line <= block.line and b.not_run is None):
        if earlier.line in run.done:
            continue
        if run.failed is not None:
            pytest.fail(f"an earlier block of this page failed: {run.failed.page}:{run.failed.line}", pytrace=False)
        try:
            run_code(*block_source(earlier), run.namespace, run.folder)
        except BaseException:
            run.failed = earlier
            raise
        run.done.add(earlier.line)
