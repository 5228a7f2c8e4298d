"""The rich console commands print their messages and progress bars through."""

from __future__ import annotations

LOG_WIDTH = 160  # columns of a line written to a file or a pipe


def make_console(stderr: bool = False):
    """A message is one line in a log, not wrapped at 80 columns; a progress bar written to a file keeps its
    counts, rate and time left (rich would cut it at 80 columns there)."""
    from rich.console import Console

    console = Console(stderr=stderr, soft_wrap=True)
    if not console.is_terminal:
        console.width = LOG_WIDTH
    return console
