"""Atomic, durable instance files under the storage folder.

Every instance is written to a temporary file in ``instances/.incoming`` (same
filesystem) and ``fsync``-ed, in a helper thread while the C-STORE handler decodes it;
then renamed over its final name and the folder entry synced, so a crash leaves either
the old file, the new one, or a stray ``.tmp`` that :meth:`Storage.sweep_temporaries`
removes at start-up: never a partial instance.

Layout: ``instances/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm`` and
``jobs/<job id>/`` for pipeline work folders.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

INSTANCES = "instances"
JOBS = "jobs"
TMP_SUFFIX = ".tmp"
INCOMING = ".incoming"  # instances/.incoming: staged temporaries, renamed into their series folder
WRITERS = 8
FREE_SPACE_RECHECK = 0.5  # seconds between statvfs calls while receiving


class OutOfSpace(OSError):
    """Free space is below the configured floor, or the disk is full."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


@dataclass(frozen=True)
class Staged:
    """A write in progress (see :meth:`Storage.stage`)."""

    tmp: Path
    parts: Sequence[bytes | memoryview]
    size: int
    written: Future[None]


@dataclass(frozen=True)
class StoredFile:
    path: str  # relative to the storage root
    size: int
    sha256: str


def _safe_component(uid: str) -> str:
    if not uid or "/" in uid or "\\" in uid or uid in {".", ".."} or "\x00" in uid:
        raise ValueError(f"unusable UID for a file name: {uid!r}")
    return uid


class Storage:
    """The storage folder: instance files and job work folders.

    Parameters
    ----------
    root
        The storage folder (created if missing).
    fsync
        Flush every file and its folder entry to disk before returning.
    min_free_bytes
        Refuse a write when less than this much space would remain.
    """

    def __init__(self, root: Path, fsync: bool = True, min_free_bytes: int = 0) -> None:
        self.root = root
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        (root / INSTANCES).mkdir(parents=True, exist_ok=True)
        (root / JOBS).mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()
        self._free: tuple[float, int] = (0.0, 0)  # (monotonic time, free bytes) of the last statvfs
        self._lock = threading.Lock()
        self._serial = itertools.count()
        # writes and fsyncs run here while the C-STORE handler decodes; one per concurrent association
        self._pool = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="prognode-write")

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        rel = Path(INSTANCES, _safe_component(study_uid), _safe_component(series_uid),
                   _safe_component(sop_uid) + ".dcm")
        return rel

    def absolute(self, rel: str | Path) -> Path:
        return self.root / rel

    def check_space(self, needed: int) -> None:
        """Refuse when the write would leave less than ``min_free_bytes``; statvfs at most every
        ``FREE_SPACE_RECHECK`` seconds, counting what was written since."""
        with self._lock:
            t = time.monotonic()
            checked, free = self._free
            if t - checked > FREE_SPACE_RECHECK or free - needed < self.min_free_bytes + needed:
                free = shutil.disk_usage(self.root).free
                checked = t
            self._free = (checked, free - needed)
        if free - needed < self.min_free_bytes:
            raise OutOfSpace(f"free space {free} B minus {needed} B is below min_free_bytes {self.min_free_bytes}")

    def stage(self, parts: Sequence[bytes | memoryview]) -> Staged:
        """Start writing the concatenation of ``parts`` to a temporary file (one ``writev``, then
        fsync) in a helper thread, so that the caller can decode and validate meanwhile.

        Every :class:`Staged` must end in :meth:`commit` or :meth:`discard`; ``parts`` must stay
        valid until then.  Raises :class:`OutOfSpace` when the write would pass ``min_free_bytes``."""
        size = sum(len(p) for p in parts)
        self.check_space(size)
        incoming = self.root / INSTANCES / INCOMING
        if incoming not in self._known_dirs:
            incoming.mkdir(parents=True, exist_ok=True)
            self._known_dirs.add(incoming)
        tmp = incoming / f"{os.getpid()}.{next(self._serial)}{TMP_SUFFIX}"
        return Staged(tmp, parts, size, self._pool.submit(self._write_temporary, tmp, parts))

    def commit(self, staged: Staged, study_uid: str, series_uid: str, sop_uid: str) -> StoredFile:
        """Wait for the staged write, rename it to its final name and fsync that folder: durable
        (power loss included) when it returns.  On any error the temporary file is removed."""
        try:
            rel = self.instance_path(study_uid, series_uid, sop_uid)
            digest = hashlib.sha256()
            for p in staged.parts:  # while the helper thread waits for fsync (hashlib drops the GIL)
                digest.update(p)
            staged.written.result()
            final = self.root / rel
            folder = final.parent
            if folder not in self._known_dirs:
                folder.mkdir(parents=True, exist_ok=True)
                if self.fsync:
                    _fsync_dir(folder.parent)
                    _fsync_dir(folder.parent.parent)
                self._known_dirs.add(folder)
            os.replace(staged.tmp, final)
            if self.fsync:
                _fsync_dir(folder)
        except BaseException as e:
            self.discard(staged)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(e, OutOfSpace):
                raise OutOfSpace(f"disk full writing {staged.tmp.name}: {e.strerror}") from e
            raise
        return StoredFile(str(rel), staged.size, digest.hexdigest())

    def discard(self, staged: Staged) -> None:
        """Wait for the staged write (its outcome does not matter) and remove the temporary file."""
        try:
            staged.written.result()
        except Exception:
            pass
        _unlink_quietly(staged.tmp)

    def write_instance(self, study_uid: str, series_uid: str, sop_uid: str,
                       parts: Sequence[bytes | memoryview]) -> StoredFile:
        """:meth:`stage` then :meth:`commit`: the file is durable when this returns."""
        self.instance_path(study_uid, series_uid, sop_uid)  # refuse unusable UIDs before writing
        return self.commit(self.stage(parts), study_uid, series_uid, sop_uid)

    def _write_temporary(self, tmp: Path, parts: Sequence[bytes | memoryview]) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            _write_all(fd, parts)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Stop the helper threads (pending writes finish first)."""
        self._pool.shutdown(wait=True)

    def remove(self, rel: str | Path) -> None:
        _unlink_quietly(self.root / rel)

    def work_dir(self, job_id: int, fresh: bool = True) -> Path:
        """The job's work folder, emptied when ``fresh`` (a re-run starts clean)."""
        d = self.root / JOBS / str(job_id)
        if fresh and d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def sweep_temporaries(self) -> int:
        """Remove temporaries left by a crash; returns how many."""
        n = 0
        for p in (self.root / INSTANCES).rglob(f"*{TMP_SUFFIX}"):
            _unlink_quietly(p)
            n += 1
        if n:
            logger.info("removed %d partial temporary files left by an earlier crash", n)
        return n


def _write_all(fd: int, parts: Sequence[bytes | memoryview]) -> None:
    """``writev`` until every byte of ``parts`` is written (a regular file rarely needs a second call)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:  # pragma: no cover - nothing more to do
        logger.warning("could not remove %s: %s", p, e)
