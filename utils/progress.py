"""Progress output: tqdm bars only where a person watches a terminal, and plain lines that never collide with them.

A log redirected to a file gets no bars (their carriage returns would fill it); ``PROGRESS=1`` forces bars on,
``PROGRESS=0`` off. Every progress bar of the project is made here.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm


def bars_wanted() -> bool:
    """Bars on a terminal (stderr, where tqdm draws), unless PROGRESS says otherwise."""
    forced = os.environ.get("PROGRESS", "").strip().lower()
    if forced in ("1", "true", "yes"):
        return True
    if forced in ("0", "false", "no"):
        return False
    return sys.stderr.isatty()


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm bar, off when ``disable`` asks or when no one watches a terminal (``bars_wanted``)."""
    kwargs["disable"] = bool(kwargs.get("disable")) or not bars_wanted()
    return tqdm(iterable, **kwargs)


def say(line: str, file: Any = None) -> None:
    """One line of output above any bar that is drawn, flushed at once (a log follows the work as it happens)."""
    tqdm.write(line, file=file or sys.stdout)
    (file or sys.stdout).flush()
