"""Progress bars that stay readable in log files (rules send stderr to logs/)."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress(iterable=None, **kwargs) -> tqdm:
    """tqdm that updates 10x a second on a terminal, every 10 s in a log file."""
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 10.0)
    return tqdm(iterable, **kwargs)
