"""rich consoles for CLI output that is read by people at a terminal and by scripts and logs everywhere else."""

from __future__ import annotations

import os

from rich.console import Console

UNWRAPPED_WIDTH = 1000
"""Width used when the stream is not a terminal: wide enough that no line or table is folded."""


def make_console(*, stderr: bool = False) -> Console:
    """A ``Console`` on stdout (or stderr) that wraps at the terminal's width, but not at rich's default 80 columns
    when the stream is a pipe or a file (CI logs, ``| grep``): there lines keep their full length. ``$COLUMNS``
    still sets the width when given."""
    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, width=UNWRAPPED_WIDTH)
    return console
