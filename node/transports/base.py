"""The :class:`Sender` interface: one session to one destination (open, send files, close), and the
:class:`Outcome` of each file, which :mod:`node.export` turns into sent, retried or dead letter.

A sender never decides about retries: it only says whether a failure could go away by itself
(:attr:`Outcome.permanent` false: the peer is down, overloaded, timed out) or not (the peer refused
this file for good).  The back-off, the dead letters and the probes live in :mod:`node.export`
alone, the same for every kind."""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import pydicom


@dataclass(frozen=True)
class Outcome:
    """What became of one file: ``status`` is the peer's answer (``0x0000``, ``200``), ``error`` why it
    failed (empty when ``ok``); ``permanent`` failures are dead letters at once; ``unreachable`` ones
    say the peer did not answer at all (it is probed from then on, as when ``open`` fails)."""

    ok: bool
    status: str = ""
    error: str = ""
    permanent: bool = False
    unreachable: bool = False


class Sender(abc.ABC):
    """One session to one destination.  ``open`` returns an empty string once the session is open,
    else why not (the destination is unreachable: every file of the batch waits, the destination is
    probed); ``send`` / ``send_all`` never raise for the peer's sake; ``close`` ends the session."""

    kind: ClassVar[str]

    @abc.abstractmethod
    def describe(self) -> str:
        """The peer for log lines (``AE@host:port``, the service root URL); never a secret."""

    @abc.abstractmethod
    def open(self, datasets: Sequence[pydicom.Dataset]) -> str:
        """Open a session fit for ``datasets`` (their SOP classes and transfer syntaxes)."""

    @abc.abstractmethod
    def send(self, ds: pydicom.Dataset) -> Outcome:
        """Send one file in the open session."""

    def send_all(self, datasets: Sequence[pydicom.Dataset]) -> list[Outcome]:
        """Send ``datasets`` in the open session, one :class:`Outcome` each, in order (a kind that can
        send several files in one request does so)."""
        return [self.send(ds) for ds in datasets]

    @abc.abstractmethod
    def close(self) -> None:
        """End the session (idempotent)."""

    @abc.abstractmethod
    def echo(self) -> tuple[bool, str]:
        """Does the destination answer (C-ECHO, a QIDO-RS request)?  (answered, what it said or why not)"""

    def problems(self) -> list[str]:
        """Settings that cannot be used (a missing file), each naming its key; for ``prognode config check``."""
        return []


def file_size(ds: pydicom.Dataset) -> int:
    """Bytes of the file ``ds`` was read from (0 when it was not read from a file)."""
    name = getattr(ds, "filename", None)
    if isinstance(name, str) and name:
        try:
            return os.path.getsize(name)
        except OSError:
            return 0
    return 0
