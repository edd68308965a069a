"""Ordered parallel map over worker processes, with the same results as a plain loop."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def ordered_map(
    func: Callable[[Any], Any],
    items: Iterable[Any],
    workers: int = 1,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
) -> Iterator[Any]:
    """map(func, items) in `workers` processes (1 = this process), results in input order."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(func, items)
        return
    ctx = mp.get_context("spawn")  # fork + onnxruntime/dlib threads can deadlock
    with ctx.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        yield from pool.imap(func, items, chunksize=2)
