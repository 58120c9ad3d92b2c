"""The DICOM facts the node acts on, in one place.

- :data:`STORAGE_SOP_CLASSES`: the Storage SOP Classes the node accepts (its SCP, the sweep's C-GET
  SCU and temporary C-MOVE receiver), each with how a series of it completes
  (:class:`Completion`) and whether its IOD carries Pixel Data.
- :data:`TRANSFER_SYNTAXES`: the transfer syntaxes accepted for them (stored as sent, never
  transcoded), each with its encoding (native, deflated, encapsulated), VR and byte order.
- The other SOP Classes the node speaks: Verification and Study Root Query/Retrieve.
- The states of series, jobs, exports, sweeps and sweep items, and the completion reasons, as
  str-valued enums (the strings stored in the database).

No other module of ``node`` spells a SOP Class or transfer syntax UID (``tests/test_dicom_facts.py``
checks it), and docs/node.md's table is checked against this one.  Importing this module imports
pydicom's UID type only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pydicom.uid import UID

# States (the strings stored) ------------------------------------------------------------------


class SeriesState(StrEnum):
    """``series.state``: receiving -> complete; an instance arriving later reopens it (receiving, generation + 1); purged: retention deleted its instances (node.retention)."""  # noqa: E501

    RECEIVING = "receiving"
    COMPLETE = "complete"
    PURGED = "purged"  # instances deleted by retention; their index rows are gone


class CompletionReason(StrEnum):
    """``series.completion_reason``: the evidence that completed a series (node.completion)."""

    GEOMETRY = "geometry"  # a contiguous, evenly spaced stack of slices
    COUNT = "count"  # a stack that agrees with the count the headers announce (ImagesInAcquisition)
    MULTIFRAME = "multiframe"  # multi-frame images (Enhanced CT): each instance holds its volume
    OBJECT = "object"  # non-image objects (SEG, RTSTRUCT, SR): each instance is whole on arrival
    QUIET = "quiet"  # nothing decided: no new instance for completion.quiet_seconds


class JobState(StrEnum):
    """``jobs.state``: pending -> running -> done; a failed attempt: failed (retried), then dead when out of attempts."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # an attempt failed; retried after jobs.retry_seconds
    DEAD = "dead"  # out of attempts


class ExportState(StrEnum):
    """``exports.state``: pending -> sent, or dead (a dead letter)."""

    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class NotificationState(StrEnum):
    """``notifications.state``: pending -> sent, or dead after its attempts (node.notify's outbox)."""

    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class SweepState(StrEnum):
    """``sweeps.state``: running -> done, failed or interrupted (resumed by the next run)."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class SweepItemState(StrEnum):
    """``sweep_items.state``: pending -> skipped, retrieved, failed or planned (dry run)."""

    PENDING = "pending"
    SKIPPED = "skipped"
    RETRIEVED = "retrieved"
    FAILED = "failed"
    PLANNED = "planned"  # dry run: would be retrieved


# Storage SOP Classes --------------------------------------------------------------------------


class Completion(StrEnum):
    """How a series of a SOP Class completes (node.completion)."""

    STACK = "stack"  # single-frame images: by geometry (or the announced count), else quiet time
    MULTIFRAME = "multiframe"  # multi-frame images: each instance holds its volume
    OBJECT = "object"  # non-image objects: each instance is whole when it arrives


@dataclass(frozen=True)
class SopClass:
    uid: UID
    name: str
    completion: Completion
    pixel_data: bool  # the IOD requires Pixel Data (CT, Enhanced CT, SEG): validated at the door

    @property
    def image(self) -> bool:
        """An image (a stack or multi-frame volume), not an object that stands on its own."""
        return self.completion is not Completion.OBJECT


def _sop(uid: str, name: str, completion: Completion, pixel_data: bool) -> SopClass:
    return SopClass(UID(uid), name, completion, pixel_data)


STORAGE_SOP_CLASSES: tuple[SopClass, ...] = (
    _sop("1.2.840.10008.5.1.4.1.1.2", "CT Image Storage", Completion.STACK, True),
    _sop("1.2.840.10008.5.1.4.1.1.2.1", "Enhanced CT Image Storage", Completion.MULTIFRAME, True),
    _sop("1.2.840.10008.5.1.4.1.1.2.2", "Legacy Converted Enhanced CT Image Storage", Completion.MULTIFRAME, True),
    _sop("1.2.840.10008.5.1.4.1.1.66.4", "Segmentation Storage", Completion.OBJECT, True),
    _sop("1.2.840.10008.5.1.4.1.1.66.7", "Label Map Segmentation Storage", Completion.OBJECT, True),
    _sop("1.2.840.10008.5.1.4.1.1.481.3", "RT Structure Set Storage", Completion.OBJECT, False),
    _sop("1.2.840.10008.5.1.4.1.1.88.11", "Basic Text SR Storage", Completion.OBJECT, False),
    _sop("1.2.840.10008.5.1.4.1.1.88.22", "Enhanced SR Storage", Completion.OBJECT, False),
    _sop("1.2.840.10008.5.1.4.1.1.88.33", "Comprehensive SR Storage", Completion.OBJECT, False),
    _sop("1.2.840.10008.5.1.4.1.1.88.34", "Comprehensive 3D SR Storage", Completion.OBJECT, False),
    _sop("1.2.840.10008.5.1.4.1.1.88.35", "Extensible SR Storage", Completion.OBJECT, False),
    _sop("1.2.840.10008.5.1.4.1.1.88.59", "Key Object Selection Document Storage", Completion.OBJECT, False),
)

SOP_CLASSES: dict[str, SopClass] = {c.uid: c for c in STORAGE_SOP_CLASSES}
STORAGE_CLASS_UIDS: tuple[UID, ...] = tuple(c.uid for c in STORAGE_SOP_CLASSES)
PIXEL_DATA_CLASS_UIDS: frozenset[str] = frozenset(c.uid for c in STORAGE_SOP_CLASSES if c.pixel_data)


class ResultFormat(StrEnum):
    """What a destination asks for (``[[destinations]] formats``): which of the result objects it gets."""

    SEG = "seg"  # Segmentation
    SR = "sr"  # TID 1500 Measurement Report (and other SR documents prognode writes)
    SC = "sc"  # Secondary Capture: key slices with outlines and values burned in, for PACS that show neither
    PDF = "pdf"  # Encapsulated PDF report


# The result objects' SOP Classes by format; a result of a class not listed here (a parametric map,
# a Key Object Selection) goes to every destination of its route whatever its formats.
RESULT_FORMAT_CLASSES: dict[str, ResultFormat] = {
    "1.2.840.10008.5.1.4.1.1.66.4": ResultFormat.SEG,  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.66.7": ResultFormat.SEG,  # Label Map Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.88.11": ResultFormat.SR,  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22": ResultFormat.SR,  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33": ResultFormat.SR,  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34": ResultFormat.SR,  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.35": ResultFormat.SR,  # Extensible SR
    "1.2.840.10008.5.1.4.1.1.7": ResultFormat.SC,  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.4": ResultFormat.SC,  # Multi-frame True Color Secondary Capture
    "1.2.840.10008.5.1.4.1.1.104.1": ResultFormat.PDF,  # Encapsulated PDF Storage
}


def result_format(sop_class_uid: str) -> ResultFormat | None:
    """The format a result object of ``sop_class_uid`` belongs to; None: not filtered by format."""
    return RESULT_FORMAT_CLASSES.get(sop_class_uid.strip())

VERIFICATION = UID("1.2.840.10008.1.1")
STUDY_ROOT_FIND = UID("1.2.840.10008.5.1.4.1.2.2.1")  # Study Root Query/Retrieve Information Model (PS3.4 C.6.2)
STUDY_ROOT_MOVE = UID("1.2.840.10008.5.1.4.1.2.2.2")
STUDY_ROOT_GET = UID("1.2.840.10008.5.1.4.1.2.2.3")


def completion_of(sop_class_uid: str) -> Completion:
    """How a series of ``sop_class_uid`` completes; a class not in the table (an index older than
    the table) is treated as single-frame images: geometry, else the quiet time."""
    c = SOP_CLASSES.get(sop_class_uid.strip())
    return c.completion if c is not None else Completion.STACK


# Transfer syntaxes ----------------------------------------------------------------------------


class Encoding(StrEnum):
    NATIVE = "native"  # uncompressed pixel data
    DEFLATED = "deflated"  # the whole dataset deflated (RFC 1951): inflate before reading
    ENCAPSULATED = "encapsulated"  # compressed pixel data in fragments


@dataclass(frozen=True)
class TransferSyntax:
    uid: UID
    name: str
    encoding: Encoding
    implicit_vr: bool = False
    little_endian: bool = True  # no big endian syntax is accepted (Explicit VR Big Endian is retired)
    lossy: bool = False


def _ts(uid: str, name: str, encoding: Encoding, implicit_vr: bool = False, lossy: bool = False) -> TransferSyntax:
    return TransferSyntax(UID(uid), name, encoding, implicit_vr, True, lossy)


# Accepted as sent: the node stores the encoded bytes and never transcodes on receipt.  The order is
# the order of preference the node proposes in (sweeps) and accepts in.
TRANSFER_SYNTAXES: tuple[TransferSyntax, ...] = (
    _ts("1.2.840.10008.1.2.1", "Explicit VR Little Endian", Encoding.NATIVE),
    _ts("1.2.840.10008.1.2", "Implicit VR Little Endian", Encoding.NATIVE, implicit_vr=True),
    _ts("1.2.840.10008.1.2.1.99", "Deflated Explicit VR Little Endian", Encoding.DEFLATED),
    _ts("1.2.840.10008.1.2.4.70", "JPEG Lossless, First-Order Prediction (Process 14 SV1)", Encoding.ENCAPSULATED),
    _ts("1.2.840.10008.1.2.4.57", "JPEG Lossless (Process 14)", Encoding.ENCAPSULATED),
    _ts("1.2.840.10008.1.2.4.80", "JPEG-LS Lossless", Encoding.ENCAPSULATED),
    _ts("1.2.840.10008.1.2.4.81", "JPEG-LS Near-Lossless", Encoding.ENCAPSULATED, lossy=True),
    _ts("1.2.840.10008.1.2.4.90", "JPEG 2000 Lossless", Encoding.ENCAPSULATED),
    _ts("1.2.840.10008.1.2.4.91", "JPEG 2000", Encoding.ENCAPSULATED, lossy=True),
    _ts("1.2.840.10008.1.2.5", "RLE Lossless", Encoding.ENCAPSULATED),
    _ts("1.2.840.10008.1.2.4.50", "JPEG Baseline (Process 1)", Encoding.ENCAPSULATED, lossy=True),
    _ts("1.2.840.10008.1.2.4.51", "JPEG Extended (Process 2 and 4)", Encoding.ENCAPSULATED, lossy=True),
)

TRANSFER_SYNTAX_UIDS: tuple[UID, ...] = tuple(t.uid for t in TRANSFER_SYNTAXES)
TRANSFER_SYNTAX_BY_UID: dict[str, TransferSyntax] = {t.uid: t for t in TRANSFER_SYNTAXES}


# docs/node.md carries these tables (``python -m node.dicom_facts`` prints them; a test compares) ------


def markdown() -> str:
    """The tables above in Markdown, as docs/node.md carries them."""
    rules = {Completion.STACK: "stack: geometry or count, else quiet time",
             Completion.MULTIFRAME: "multi-frame: each instance a volume",
             Completion.OBJECT: "object: whole on arrival"}
    lines = ["| SOP Class | UID | image | Pixel Data | a series completes by |", "|---|---|---|---|---|"]
    lines += [f"| {c.name} | `{c.uid}` | {'yes' if c.image else 'no'} | {'required' if c.pixel_data else '-'} "
              f"| {rules[c.completion]} |" for c in STORAGE_SOP_CLASSES]
    lines += ["", "| Transfer syntax | UID | encoding | VR | lossy |", "|---|---|---|---|---|"]
    lines += [f"| {t.name} | `{t.uid}` | {t.encoding} | {'implicit' if t.implicit_vr else 'explicit'} "
              f"| {'yes' if t.lossy else 'no'} |" for t in TRANSFER_SYNTAXES]
    lines += ["", "| column | values (stored as text) | |", "|---|---|---|"]
    for enum in (SeriesState, CompletionReason, JobState, ExportState, NotificationState, SweepState, SweepItemState):
        column, _, meaning = (enum.__doc__ or "").partition(": ")
        lines.append(f"| {column.replace('``', '`')} | {', '.join(f'`{v}`' for v in enum)} | {meaning.strip().replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
