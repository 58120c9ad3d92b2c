"""Disk watermarks: free space of the storage folder against two marks, checked cheaply.

* ``[node] min_free_bytes`` (the first mark): below it the node first purges what ``[retention]`` allows
  (:meth:`Watermark.relieve`, called by :meth:`node.storage.Storage.check_space` before it refuses), then
  answers C-STORE ``0xA700`` (Refused: Out of Resources) with the reason in ErrorComment.
* ``[node] associate_min_free_bytes`` (the second, lower mark; default half the first): below it new
  associations are rejected, A-ASSOCIATE-RJ rejected-transient, source service-provider (presentation),
  reason local-limit-exceeded (:func:`association_handlers`), so that no peer starts sending at all.

Free space comes from ``statvfs`` at most every ``[retention] check_seconds`` for the association check and
the level (:class:`FreeSpace`); the C-STORE path keeps its own cached check (node.storage).  Each change of
level is logged and audited once (``disk_watermark``: level, free_bytes, the marks), not at every request;
each refused instance and rejected association has its own audit record as usual.  With ``[retention]
enabled`` a monitor (:meth:`Watermark.run`) also purges ahead of time, oldest first, whenever free space is
under ``min_free_bytes + headroom_bytes``.

:func:`for_node` builds the node's watermark from its configuration and :func:`attach` hooks its relief into
a :class:`~node.storage.Storage`: ``prognode serve`` (node.service) and ``prognode sweep`` (node.sweep.cli)
both do, so a sweep run from the command line purges what retention allows before it refuses too.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pynetdicom import evt

from node.access import (
    DIAG_LOCAL_LIMIT_EXCEEDED,
    REJECT_TRANSIENT,
    SOURCE_SERVICE_PROVIDER_PRESENTATION,
    reject_association,
)
from node.audit import AuditSink

if TYPE_CHECKING:
    from node.config import Config
    from node.retention import Retention
    from node.storage import Storage

logger = logging.getLogger(__name__)

NOTHING_TO_PURGE_SECONDS = 30.0  # after a purge that freed nothing, C-STOREs are refused at once for this long

Purge = Callable[[int], int]  # purge(free bytes wanted) -> bytes freed (node.retention.Retention.free_up)


class Level(StrEnum):
    """Where free space stands against the marks."""

    OK = "ok"
    LOW = "low"  # below min_free_bytes: C-STORE refused (0xA700) once retention purged what it may
    CRITICAL = "critical"  # below associate_min_free_bytes: new associations rejected


class FreeSpace:
    """Free bytes of the filesystem holding ``path`` (for the node's user), from ``statvfs`` at most every
    ``max_age`` seconds; ``probe`` replaces the statvfs call in tests."""

    def __init__(self, path: Path, max_age: float, probe: Callable[[Path], int] | None = None) -> None:
        self.path = path
        self.max_age = max_age
        self.probe = probe or (lambda p: shutil.disk_usage(p).free)
        self._lock = threading.Lock()
        self._at = -1e18
        self._free = 0

    def free(self, fresh: bool = False) -> int:
        with self._lock:
            t = time.monotonic()
            if fresh or t - self._at > self.max_age:
                self._free, self._at = int(self.probe(self.path)), t
            return self._free


class Watermark:
    """The two marks, the level, and the purge that relieves the first one (None: nothing is deleted)."""

    def __init__(self, space: FreeSpace, min_free_bytes: int, associate_min_free_bytes: int, headroom_bytes: int,
                 audit: AuditSink | None, purge: Purge | None = None) -> None:
        self.space = space
        self.min_free = min_free_bytes
        self.associate_min_free = associate_min_free_bytes
        self.headroom = headroom_bytes
        self.audit = audit
        self.purge = purge
        self._level = Level.OK
        self._level_lock = threading.Lock()
        self._purge_lock = threading.Lock()
        self._nothing_until = 0.0

    def level(self, fresh: bool = False) -> Level:
        """The level now; a change is logged and audited once."""
        free = self.space.free(fresh)
        level = (Level.CRITICAL if free < self.associate_min_free else Level.LOW if free < self.min_free
                 else Level.OK)
        with self._level_lock:
            before, self._level = self._level, level
        if level != before:
            log = logger.info if level is Level.OK else logger.warning
            log("disk watermark %s -> %s: %d bytes free in %s (instances refused below %d, associations below %d)",
                before, level, free, self.space.path, self.min_free, self.associate_min_free)
            if self.audit is not None:
                self.audit.write("disk_watermark", level=level.value, previous=before.value, free_bytes=free,
                                 min_free_bytes=self.min_free, associate_min_free_bytes=self.associate_min_free)
        return level

    def relieve(self, needed: int) -> bool:
        """Free space is short of ``needed`` + ``min_free_bytes``: purge what retention allows (one purge at a
        time; a caller that waited sees what it freed).  True when there is room again.  Without a purge, or
        shortly after a purge that found nothing to delete, False at once."""
        if self.purge is None or time.monotonic() < self._nothing_until:
            self.level()  # the caller (node.storage) has just looked at the disk: the cache is enough
            return False
        with self._purge_lock:
            if self.space.free(fresh=True) - needed >= self.min_free:  # a purge that held the lock made room
                return True
            if time.monotonic() < self._nothing_until:
                return False
            freed = self.purge(self.min_free + self.headroom + needed)
            if freed <= 0:
                self._nothing_until = time.monotonic() + NOTHING_TO_PURGE_SECONDS
            ok = self.space.free(fresh=True) - needed >= self.min_free
        self.level(fresh=False)
        return ok

    def check(self) -> Level:
        """One round of the monitor: the level, and a purge ahead of time under ``min_free + headroom``."""
        level = self.level(fresh=True)
        if self.purge is not None and self.headroom and self.space.free() < self.min_free + self.headroom:
            with self._purge_lock:
                if time.monotonic() >= self._nothing_until:
                    if self.purge(self.min_free + self.headroom) <= 0:
                        self._nothing_until = time.monotonic() + NOTHING_TO_PURGE_SECONDS
            level = self.level(fresh=True)
        return level

    def run(self, stop: threading.Event) -> None:
        """The monitor loop (a thread of the node): :meth:`check` every ``max_age`` of the free-space cache."""
        while not stop.is_set():
            try:
                self.check()
            except Exception:
                logger.exception("disk watermark check failed")
            stop.wait(self.space.max_age)


def for_node(config: Config, audit: AuditSink | None, retention: Retention | None,
             probe: Callable[[Path], int] | None = None) -> Watermark:
    """The node's watermark: the marks of ``[node]``, free space every ``[retention] check_seconds``, and the
    purge of ``retention`` when ``[retention] enabled`` (else nothing is deleted); ``probe`` as for
    :class:`FreeSpace`."""
    purge = retention.free_up if retention is not None and config.retention.enabled else None
    return Watermark(FreeSpace(config.storage_dir, config.retention.check_seconds, probe), config.node.min_free_bytes,
                     config.node.associate_floor, config.retention.headroom_bytes, audit, purge)


def attach(storage: Storage, watermark: Watermark) -> bool:
    """Below ``min_free_bytes`` ``storage`` asks ``watermark`` to relieve before it refuses; True when attached
    (a shared Storage keeps the relief attached first: one per process, see :meth:`Storage.shared`)."""
    if storage.low_space is not None:
        return False
    storage.low_space = watermark.relieve
    return True


def detach(storage: Storage, watermark: Watermark) -> None:
    """Undo :func:`attach` (only if ``watermark``'s relief is the one attached)."""
    if storage.low_space == watermark.relieve:
        storage.low_space = None


def _on_requested(event: Any, watermark: Watermark, audit: AuditSink | None) -> None:
    assoc = event.assoc
    if getattr(assoc, "is_rejected", False) or getattr(assoc, "is_aborted", False):
        return
    if watermark.level() is not Level.CRITICAL:
        return
    calling = str(assoc.requestor.primitive.calling_ae_title).strip()
    reason = (f"disk nearly full: {watermark.space.free()} bytes free, below node.associate_min_free_bytes "
              f"{watermark.associate_min_free}")
    reject_association(assoc, calling, str(assoc.requestor.address), reason, DIAG_LOCAL_LIMIT_EXCEEDED, audit,
                       result=REJECT_TRANSIENT, source=SOURCE_SERVICE_PROVIDER_PRESENTATION)


def association_handlers(watermark: Watermark,
                         audit: AuditSink | None) -> list[tuple[Any, Callable[..., Any], list[Any]]]:
    """``evt_handlers`` entries rejecting new associations below the lower mark (cached free space)."""
    return [(evt.EVT_REQUESTED, _on_requested, [watermark, audit])]
