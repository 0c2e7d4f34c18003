"""Threads that work ahead of their consumer: the one worker count and the one bounded, ordered
decode-ahead used by prediction, evaluation, zero-shot runs and manifest building."""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers(cap: int = 8) -> int:
    """Threads (or processes) to use by default: the CPU count, at most ``cap``."""
    return max(1, min(cap, os.cpu_count() or 1))


def decode_ahead(fn: Callable[[T], R], items: Iterable[T], window: int, workers: int) -> Iterator[R]:
    """``fn(item)`` for each item, in order, computed by ``workers`` threads with at most ``window`` items
    submitted ahead of the consumer (so memory does not grow with the number of items)."""
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
