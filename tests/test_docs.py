"""Docs examples are tests. Every fenced code block in README.md, docs/*.md and examples/**/README.md is
collected (with markdown-it, the CommonMark parser rich already depends on):

* tagged ``python``, ``bash``, ``sh`` or ``console``: executed, unless the line just above the fence is
  ``<!-- not-run: <reason> -->`` (the reason must be given). Python blocks run in a fresh interpreter, shell blocks
  with ``bash -e``, console blocks run their ``$ `` lines; all with ``DEVREP_ADDRESS`` pointing at a real
  ``devrep serve`` started for this module, the repository as the working directory, the virtualenv's ``python``
  and ``devrep`` first on ``PATH``, ``$DOC_TMP`` a scratch directory, and a bounded timeout (each block runs in
  its own process group, killed with it);
* tagged with anything else (``text``, ``yaml``, ``proto``, ``mermaid``, ...): not executable, nothing to do;
* untagged: a failure — say what it is (``text`` for output).

Each block is its own test, named ``<file>:<line of the fence>``, and a failure message starts with that location.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _devrep_service import server_process
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
RUN_TAGS = {"python", "py", "bash", "sh", "shell", "console"}
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:\s*(?P<reason>.*?)\s*-->\s*$")
BLOCK_TIMEOUT = 180


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    tag: str
    code: str
    not_run: str | None  # the reason, when marked

    @property
    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").rglob("*.md"))]
    return [f for f in files if f.is_file()]


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    lines = text.splitlines()
    out = []
    for token in MarkdownIt().parse(text):
        if token.type != "fence" or token.map is None:
            continue
        start = token.map[0]
        above = lines[start - 1] if start > 0 else ""
        match = NOT_RUN.match(above)
        tag = token.info.strip().split()[0].lower() if token.info.strip() else ""
        out.append(Block(path, start + 1, tag, token.content, match.group("reason") if match else None))
    return out


ALL = [b for f in doc_files() for b in blocks(f)]
RUNNABLE = [b for b in ALL if b.tag in RUN_TAGS and b.not_run is None]


@pytest.fixture(scope="module")
def server_address() -> Iterator[str]:
    with server_process() as (address, _):
        yield address


def console_script(code: str) -> str:
    """The commands of a console transcript: ``$ `` lines (with their ``\\`` continuations); output is ignored."""
    commands, continuing = [], False
    for line in code.splitlines():
        if continuing or line.startswith("$ "):
            commands.append(line if continuing else line[2:])
            continuing = line.rstrip().endswith("\\")
    return "\n".join(commands) + "\n"


def test_docs_have_blocks() -> None:
    """The collector finds the blocks (an empty parametrization would make every other test vacuous)."""
    assert any(b.path.name == "README.md" and b.tag == "python" for b in ALL), [b.where for b in ALL]
    assert len(RUNNABLE) >= 3, [b.where for b in RUNNABLE]


def test_every_block_is_tagged() -> None:
    untagged = [b.where for b in ALL if not b.tag]
    assert not untagged, (f"fenced blocks without a language tag at {untagged}; use python/bash/sh/console "
                          "(executed), text for output, or yaml/proto/... for non-executable content")


def test_not_run_markers_give_a_reason() -> None:
    bad = [b.where for b in ALL if b.not_run is not None and not b.not_run]
    assert not bad, f"<!-- not-run: --> without a reason at {bad}"
    for f in doc_files():  # a marker not directly above a fence is a mistake (it would mark nothing)
        lines = f.read_text().splitlines()
        for i, line in enumerate(lines):
            if NOT_RUN.match(line) and not (i + 1 < len(lines) and lines[i + 1].lstrip().startswith(("```", "~~~"))):
                pytest.fail(f"{f.relative_to(ROOT)}:{i + 1}: not-run marker is not directly above a code fence")


@pytest.mark.timeout(BLOCK_TIMEOUT + 60)
@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.where)
def test_doc_block_runs(block: Block, server_address: str) -> None:
    env = {**os.environ, "DEVREP_ADDRESS": server_address, "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("PYTHONPATH", str(ROOT))
    with tempfile.TemporaryDirectory(prefix="devrep-doc-") as tmp:
        env["DOC_TMP"] = tmp
        if block.tag in ("python", "py"):
            script = Path(tmp) / "block.py"
            script.write_text(block.code)
            argv = [sys.executable, str(script)]
        else:
            script = Path(tmp) / "block.sh"
            script.write_text(console_script(block.code) if block.tag == "console" else block.code)
            argv = ["bash", "-e", str(script)]
        # Its own process group: on a timeout everything the block started goes too.
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"{block.where}: {block.tag} block did not finish within {BLOCK_TIMEOUT}s (a watch without "
                        f"max_events/timeout?)\n--- stdout ---\n{stdout[-3000:]}\n--- stderr ---\n{stderr[-3000:]}")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # nothing a block started outlives it
    print(stdout)
    assert proc.returncode == 0, (f"{block.where}: {block.tag} block exited {proc.returncode}\n--- block ---\n"
                                  f"{block.code}\n--- stdout ---\n{stdout[-3000:]}\n--- stderr ---\n"
                                  f"{stderr[-5000:]}")


def test_collector_reads_tags_lines_and_markers(tmp_path: Path) -> None:
    """The extractor itself: tags, fence line numbers, not-run reasons, console commands."""
    doc = tmp_path / "doc.md"
    doc.write_text("# t\n\n```python\nprint(1)\n```\n\n<!-- not-run: needs a GPU -->\n```sh\nnvidia-smi\n```\n\n"
                   "```\nraw\n```\n\n```console\n$ echo a \\\n  b\na b\n$ true\n```\n")
    got = [(b.line, b.tag, b.not_run) for b in blocks(doc)]
    assert got == [(3, "python", None), (8, "sh", "needs a GPU"), (12, "", None), (16, "console", None)], got
    assert console_script(blocks(doc)[3].code) == "echo a \\\n  b\ntrue\n"
    assert blocks(doc)[0].where == f"{doc}:3"
