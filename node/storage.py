"""Atomic, durable instance files under the storage folder.

Every instance is written to a temporary file in ``instances/.incoming`` (same
filesystem) and ``fsync``-ed, then renamed over its final name and the folder entry
synced, so a crash leaves either the old file, the new one, or a stray ``.tmp`` that
:meth:`Storage.sweep_temporaries` removes at start-up: never a partial instance.

Temporary files are created with ``O_CREAT | O_EXCL`` under names unique to the process
and the :class:`Storage` object (``<pid>.<random>.<serial>.tmp``): two writers never share
one.  A process uses one :class:`Storage` per folder (:meth:`Storage.shared`: the node and a
C-GET sweep inside ``serve`` write through the same object).

When a file of the same instance is already there (a copy acknowledged earlier), the new
copy stays staged until the caller has indexed it (:meth:`Storage.commit`); a failed index
write discards the staged copy (:meth:`Storage.discard`) and the earlier file is untouched.

Layout: ``instances/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm`` and
``jobs/<job id>/`` for pipeline work folders.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import queue
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

INSTANCES = "instances"
JOBS = "jobs"
TMP_SUFFIX = ".tmp"
INCOMING = ".incoming"  # instances/.incoming: staged temporaries, renamed into their series folder
SPARES = 8  # temporary files made ahead of time, at most (one per concurrent association is enough)
FREE_SPACE_RECHECK = 0.5  # seconds between statvfs calls while receiving


class OutOfSpace(OSError):
    """Free space is below the configured floor, or the disk is full."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


@dataclass(frozen=True)
class StoredFile:
    path: str  # relative to the storage root
    size: int
    sha256: str
    # absolute path of the staged new copy when a file was already there under ``path``: it
    # replaces that file at :meth:`Storage.commit`, or goes at :meth:`Storage.discard`
    staged: str = ""


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
        # makes the next temporary files ahead of time, off the C-STORE path (see write_instance)
        self._maker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prognode-temporaries")
        self._spares: queue.SimpleQueue[tuple[Path, int]] = queue.SimpleQueue()
        self._closed = False
        self._token = secrets.token_hex(4)  # temporary names unique to this object, not only the process
        self._users = 1  # holders of a shared object (see shared()); close() by the last one closes it
        self._key: Path | None = None
        # called with the bytes wanted when free space is below min_free_bytes (node.watermark.Watermark.relieve):
        # True when it freed room
        self.low_space: Callable[[int], bool] | None = None

    @classmethod
    def shared(cls, root: Path, fsync: bool = True, min_free_bytes: int = 0) -> Storage:
        """The process's one :class:`Storage` for ``root`` (made at the first call); each caller
        calls :meth:`close` when done, and the last one closes it.  The settings of the first
        caller hold (they come from the same ``[node]`` configuration)."""
        key = Path(os.path.realpath(root))
        with _SHARED_LOCK:
            found = _SHARED.get(key)
            if found is not None:
                with found._lock:
                    found._users += 1
                if (found.fsync, found.min_free_bytes) != (fsync, min_free_bytes):
                    logger.warning("storage %s is already open with fsync=%s min_free_bytes=%d; keeping those",
                                   key, found.fsync, found.min_free_bytes)
                return found
            made = cls(root, fsync, min_free_bytes)
            made._key = key
            _SHARED[key] = made
            return made

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        rel = Path(INSTANCES, _safe_component(study_uid), _safe_component(series_uid),
                   _safe_component(sop_uid) + ".dcm")
        return rel

    def absolute(self, rel: str | Path) -> Path:
        return self.root / rel

    def check_space(self, needed: int) -> None:
        """Refuse when the write would leave less than ``min_free_bytes``; statvfs at most every
        ``FREE_SPACE_RECHECK`` seconds, counting what was written since.  Below the mark, ``low_space``
        (the disk watermark's purge, node.watermark) runs first when set, then the space is looked at again."""
        free = self._free_space(needed)
        if free - needed < self.min_free_bytes and self.low_space is not None and self.low_space(needed):
            free = self._free_space(needed, fresh=True)
        if free - needed < self.min_free_bytes:
            raise OutOfSpace(f"below node.min_free_bytes: {free} B free, {needed} B sent")

    def _free_space(self, needed: int, fresh: bool = False) -> int:
        with self._lock:
            t = time.monotonic()
            checked, free = self._free
            if fresh or t - checked > FREE_SPACE_RECHECK or free - needed < self.min_free_bytes + needed:
                free = shutil.disk_usage(self.root).free
                checked = t
            self._free = (checked, free - needed)
        return free

    def write_instance(self, study_uid: str, series_uid: str, sop_uid: str,
                       parts: Sequence[bytes | memoryview]) -> StoredFile:
        """Write the concatenation of ``parts`` as the instance's file, in place when this returns:
        :meth:`stage_instance` then :meth:`commit` (for callers with no index write in between)."""
        stored = self.stage_instance(study_uid, series_uid, sop_uid, parts)
        self.commit(stored)
        return stored

    def stage_instance(self, study_uid: str, series_uid: str, sop_uid: str,
                       parts: Sequence[bytes | memoryview]) -> StoredFile:
        """Write the concatenation of ``parts`` as the instance's file: durable (power loss
        included) when this returns.

        The bytes go to a temporary file in ``instances/.incoming`` (one ``writev``), which is
        fsynced, renamed to its final name, and that folder fsynced, all in the calling
        thread: on this path a hand-over to another thread costs more than it saves.  The
        temporary file was created ahead of time by a helper thread (creating a file right after
        the previous instance's fsyncs can wait a millisecond or more on the filesystem
        journal).  When a file is already there under the final name (a copy acknowledged
        earlier), the new copy stays staged (``StoredFile.staged``) and the caller must
        :meth:`commit` it once indexed, or :meth:`discard` it.  On any error the temporary file
        is removed and nothing is left under the final name.  Raises :class:`OutOfSpace` (free
        space under ``min_free_bytes``, or the disk full), :class:`OSError` for other write
        errors, :class:`ValueError` for a UID that cannot be a file name."""
        rel = self.instance_path(study_uid, series_uid, sop_uid)
        size = sum(len(p) for p in parts)
        self.check_space(size)
        digest = hashlib.sha256()
        for p in parts:
            digest.update(p)
        final = self.root / rel
        folder = final.parent
        tmp: Path | None = None
        staged = ""
        try:
            tmp, fd = self._temporary()
            try:
                _write_all(fd, parts)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if folder not in self._known_dirs:
                folder.mkdir(parents=True, exist_ok=True)
                if self.fsync:
                    _fsync_dir(folder.parent)
                    _fsync_dir(folder.parent.parent)
                self._known_dirs.add(folder)
            if os.path.lexists(final):
                staged = str(tmp)  # an earlier copy stays in place until this one is indexed
            else:
                try:
                    os.replace(tmp, final)
                except FileNotFoundError:  # its folder went since (retention removes emptied folders)
                    folder.mkdir(parents=True, exist_ok=True)
                    os.replace(tmp, final)
                if self.fsync:
                    _fsync_dir(folder)
            self._make_next()
        except BaseException as e:
            if tmp is not None:
                _unlink_quietly(tmp)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(e, OutOfSpace):
                raise OutOfSpace(f"disk full writing {rel.name}: {e.strerror}") from e
            raise
        return StoredFile(str(rel), size, digest.hexdigest(), staged)

    def commit(self, stored: StoredFile) -> None:
        """Put a staged copy in place of the earlier file (nothing to do for a new file)."""
        if not stored.staged:
            return
        final = self.root / stored.path
        try:
            try:
                os.replace(stored.staged, final)
            except FileNotFoundError:  # retention purged the earlier copy and its folder meanwhile
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(stored.staged, final)
            if self.fsync:
                _fsync_dir(final.parent)
        except BaseException:
            _unlink_quietly(Path(stored.staged))
            raise

    def discard(self, stored: StoredFile) -> None:
        """Undo :meth:`stage_instance` (its index write failed): a staged copy goes and the earlier
        file stays as it was; a new file is removed."""
        if stored.staged:
            _unlink_quietly(Path(stored.staged))
        else:
            self.remove(stored.path)

    def _temporary(self) -> tuple[Path, int]:
        """A temporary file made ahead of time (or now, if none is ready), opened for writing."""
        try:
            return self._spares.get_nowait()
        except queue.Empty:
            return self._new_temporary()

    def _make_next(self) -> None:
        """Have the helper thread make the next temporary file, once this write's fsyncs are done
        (a file created while they run joins the journal commit they wait for)."""
        if not self._closed:
            try:
                self._maker.submit(self._make_spare)
            except RuntimeError:  # closing
                pass

    def _new_temporary(self) -> tuple[Path, int]:
        incoming = self.root / INSTANCES / INCOMING
        if incoming not in self._known_dirs:
            incoming.mkdir(parents=True, exist_ok=True)
            self._known_dirs.add(incoming)
        while True:
            tmp = incoming / f"{os.getpid()}.{self._token}.{next(self._serial)}{TMP_SUFFIX}"
            try:
                # O_EXCL: never open a file someone else made (another Storage, a reused pid's leftover)
                return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            except FileExistsError:
                logger.warning("temporary file %s already exists: taking the next name", tmp.name)

    def _make_spare(self) -> None:
        if self._spares.qsize() >= SPARES:
            return
        try:
            self._spares.put(self._new_temporary())
        except OSError as e:  # the next write makes its own, and reports the error
            logger.debug("could not make a temporary file ahead of time: %s", e)

    def close(self) -> None:
        """Stop the helper thread and remove the temporary files it made ahead of time (for a
        :meth:`shared` object: once its last holder closes it)."""
        with _SHARED_LOCK:
            with self._lock:
                self._users -= 1
                if self._users > 0:
                    return
            if self._key is not None and _SHARED.get(self._key) is self:
                del _SHARED[self._key]
        if self._closed:
            return
        self._closed = True
        self._maker.shutdown(wait=True)
        while True:
            try:
                tmp, fd = self._spares.get_nowait()
            except queue.Empty:
                break
            os.close(fd)
            _unlink_quietly(tmp)

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
        """Remove temporaries left by a crash (named after a process that is gone); returns how many."""
        n = 0
        for p in (self.root / INSTANCES).rglob(f"*{TMP_SUFFIX}"):
            if _process_alive(p.name.split(".", 1)[0]):
                continue  # another live process's file, made ahead of time or being written
            _unlink_quietly(p)
            n += 1
        if n:
            logger.info("removed %d partial temporary files left by an earlier crash", n)
        return n


_SHARED_LOCK = threading.Lock()
_SHARED: dict[Path, Storage] = {}  # Storage.shared: one object per storage folder in this process


def _process_alive(pid_text: str) -> bool:
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


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
