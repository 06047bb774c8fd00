"""Helpers the test suite shares (and nothing outside it needs): child programs, bounded waits, small servers.

Child programs live as real modules in ``tests/children/`` (ruff and mypy check them like any code) and run by
path in a fresh interpreter: ``child_argv("name", *args)`` is the argv. Run by path, the child's ``sys.path[0]`` is
``tests/children``; it imports ``devrep`` as the test process does (the editable install, or ``PYTHONPATH``).
"""

from __future__ import annotations

import sys
from pathlib import Path

CHILDREN = Path(__file__).resolve().with_name("children")


def child_path(name: str) -> Path:
    """The file of child program ``name`` (``tests/children/<name>.py``)."""
    path = CHILDREN / f"{name}.py"
    assert path.is_file(), f"no child program {path}"
    return path


def child_argv(name: str, *args: str) -> list[str]:
    """The argv that runs child program ``name`` with ``args`` in this interpreter."""
    return [sys.executable, str(child_path(name)), *args]
