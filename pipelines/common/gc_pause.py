"""Hold the cyclic garbage collector off while a stage builds many short-lived objects.

Building a SEG of a few hundred frames (highdicom) and writing it (pydicom) creates some
hundred thousand small datasets and elements.  With the CT series' own datasets alive in the
same process, each full collection the allocation triggers walks all of them: about 0.2 s of
the writer stage on a 300-slice series, for objects that are either kept or freed by
reference counting anyway.  :func:`gc_paused` turns automatic collection off for the block
and restores it afterwards (nested and concurrent blocks count, so the last one out turns it
back on); nothing is collected by hand.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """Automatic garbage collection off inside the block (as it was before, after it)."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
