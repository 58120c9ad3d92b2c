"""Map a function over items in forked worker processes, for pure numpy/scipy stages that threads do not speed up.

A stage of many small numpy and scipy calls holds the GIL for much of its time: on two cores, two threads ran the
body-composition 3D muscles only 1.3 times faster than one. Forked processes run them side by side. The
function may be a closure: the children inherit it, and the volume it reads (copy on write), through the pool's
initializer, so only the items and the results cross a pipe.

Fork copies only the calling thread. A lock that another thread held at that moment stays held in the child for
ever, so ``fork_safe()`` allows it only in a process that runs one thread (the CLI, a job runner's worker
process); elsewhere (a Ray worker, a test process with servers in threads) the caller falls back to threads.
The children die with their parent (Linux), as the node's workers do.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_FN: Callable[[Any], Any] | None = None  # set in each forked child by ``_init``


def fork_safe() -> bool:
    """Whether this process may fork workers: the platform forks, and no other thread runs."""
    return "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1


def die_with_parent(parent: int | None) -> None:
    """Ask the kernel (Linux) to kill this process when its parent dies, so a killed node or job leaves no child
    computing; exit at once if the parent (``parent``: its pid, as this process was started by it) is already gone,
    having died before the signal was armed."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def _init(fn: Callable[[Any], Any], parent: int) -> None:
    global _FN
    _FN = fn
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _call(item: Any) -> Any:
    assert _FN is not None, "forked.map_forked's child was not initialised"
    return _FN(item)


@contextmanager
def map_forked(fn: Callable[[T], R], items: Sequence[T], workers: int, chunks_per_worker: int = 4
               ) -> Iterator[Iterator[R]]:
    """``fn`` over ``items`` in ``workers`` forked processes; yields the results' iterator, in ``items``' order.

    Every item is submitted on entry, so the caller can work in the meantime (the parent is a third worker). Items
    go in contiguous chunks (neighbouring items share what ``fn`` caches). Raises ``RuntimeError`` where
    ``fork_safe()`` is false; a child that dies raises ``concurrent.futures.process.BrokenProcessPool``."""
    if not fork_safe():
        raise RuntimeError("map_forked: another thread runs in this process (fork could copy a held lock)")
    chunk = max(1, -(-len(items) // max(1, workers * chunks_per_worker)))
    # with the fork method, every child is forked at the first submit, before the pool starts its own thread
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"),
                             initializer=_init, initargs=(fn, os.getpid())) as pool:
        yield pool.map(_call, items, chunksize=chunk)
