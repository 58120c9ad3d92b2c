"""Forked workers for the segmentation stage (``pipelines.common.forked``): the same masks as threads, a closure
run in child processes, and no fork while another thread runs.

The checks that fork run in a fresh interpreter, as a job runner's worker process runs the pipeline: the test
process may hold other tests' threads, where the stage rightly falls back to threads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pipelines.common.forked import fork_safe, map_forked

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import logging, os, sys
    from pathlib import Path
    import numpy as np
    from pipelines.body_composition.phantom import PhantomSpec, write_phantom
    from pipelines.body_composition.stages import ClassicalBackend, LevelFinder, SegmentInput, TissueSegmenter
    from pipelines.common.forked import map_forked
    from pipelines.common.volume import load_series

    # a closure over a local array runs in the children, results in the items' order
    data = np.arange(40) * 3
    with map_forked(lambda i: (os.getpid(), int(data[i])), list(range(40)), 2) as it:
        got = list(it)
    assert [v for _, v in got] == list(data), got
    pids = {p for p, _ in got}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2, pids

    # the stage: forked workers and threads give the same masks, on every slice of the 3D range and its neighbours
    records = []
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pipelines.body_composition.stages").setLevel(logging.DEBUG)
    logging.getLogger("pipelines.body_composition.stages").addHandler(logging.Handler())
    logging.getLogger("pipelines.body_composition.stages").handlers[-1].emit = records.append
    ct = Path(sys.argv[1])
    write_phantom(PhantomSpec(size=96, pixel_mm=4.0, noise_sd=5.0, seed=2), ct)
    vol = load_series(sorted(ct.iterdir())).canonical_axial()[0]
    backend = ClassicalBackend()
    level = LevelFinder(backend, ("L3",)).run(vol)
    forked = TissueSegmenter(backend).run(SegmentInput(vol, level))
    assert any("forked processes" in r.getMessage() for r in records), [r.getMessage() for r in records]
    threads = TissueSegmenter(backend, processes=False).run(SegmentInput(vol, level))
    assert forked.volume_range == threads.volume_range and forked.volume_range is not None
    k0, k1 = forked.volume_range
    for key, m in threads.volume_masks.items():
        assert np.array_equal(forked.volume_masks[key], m), key
        assert m[k0 : k1 + 1].any(axis=(1, 2)).sum() > (k1 - k0) // 2, key  # the masks are not all empty
    for a, b in zip(forked.neighbour_masks, threads.neighbour_masks, strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in b)
    assert all(np.array_equal(forked.slice_seg.masks[k], m) for k, m in threads.slice_seg.masks.items())
    print("ok", len(pids))
""")


def test_forked_workers_match_threads(tmp_path: Path) -> None:
    """In a single-threaded process (a job worker's): ``map_forked`` runs a closure in child processes and keeps
    the items' order; the segmentation stage's 3D muscles, level slice and neighbour slices from forked workers are
    the masks that threads give."""
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "ct")], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]


def test_no_fork_while_another_thread_runs() -> None:
    """Fork copies only the calling thread: with another thread running, ``fork_safe`` is false and
    ``map_forked`` refuses (the stage then uses threads)."""
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, daemon=True)
    t.start()
    try:
        assert not fork_safe()
        with pytest.raises(RuntimeError, match="another thread"):
            with map_forked(lambda i: i, [1, 2, 3], 2):
                pass
    finally:
        stop.set()
        t.join(5)


ORPHAN = textwrap.dedent("""
    import multiprocessing, time
    from pipelines.common.forked import map_forked
    with map_forked(lambda i: time.sleep(120), list(range(8)), 2) as it:
        print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
        time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has ended


def test_forked_workers_die_with_their_parent() -> None:
    """A job killed with SIGKILL (the node's timeout, or the node itself dying) leaves no forked worker computing:
    each child asked the kernel for SIGKILL when its parent dies."""
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    try:
        assert proc.stdout is not None
        pids = [int(v) for v in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids), pids
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    deadline = time.monotonic() + 20.0
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), [p for p in pids if _alive(p)]
