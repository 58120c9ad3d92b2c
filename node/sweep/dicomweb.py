"""A ``kind = "dicomweb"`` source: QIDO-RS queries and WADO-RS retrieval with ``dicomweb-client``.

:func:`client` builds one :class:`dicomweb_client.DICOMwebClient` per source with the session every
DICOMweb peer gets (:func:`node.transports.dicomweb.peer_session`: the Bearer token of ``token_file`` or
HTTP Basic with ``username`` + ``password_file``, the source's peer TLS table) and its timeout.
:func:`search_studies` / :func:`search_series` return QIDO-RS matches as pydicom Datasets (the same shape
as C-FIND identifiers); :func:`retrieve_series` yields each instance of a series as the Part 10 bytes the
server sent (``transfer-syntax=*``: as stored there, never transcoded on the way), which
:mod:`node.sweep.retrieve` stores through the node's own C-STORE handler.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.web import _Transaction
from pydicom.dataset import Dataset

from node.config import DicomwebSourceConfig
from node.sweep.plan import SERIES_RETURN_KEYS, STUDY_RETURN_KEYS, SweepError
from node.tls import TlsError
from node.transports.dicomweb import peer_client, peer_session, peer_where

log = logging.getLogger(__name__)

# WADO-RS: every instance as application/dicom in the transfer syntax the server holds it in
ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


class DicomwebError(RuntimeError):
    """A DICOMweb request failed (names the source and what was asked)."""


def client(src: DicomwebSourceConfig, base_dir: Path) -> DICOMwebClient:
    """The source's client; a credential or TLS setting that cannot be used raises :class:`DicomwebError`
    (naming the key, never the secret).  Its retries are off: the sweep retries a failed series itself
    (once, later)."""
    try:
        session = peer_session(src, base_dir, peer_where(src))
    except (ValueError, TlsError) as e:
        raise DicomwebError(str(e)) from e
    return peer_client(src, session, src.timeout_seconds)


QIDO_PAGE = 500  # matches asked for per QIDO-RS request
STUDY_UID_TAG, SERIES_UID_TAG = "0020000D", "0020000E"


def _pages(search: Callable[..., list[dict[str, Any]]], key: str, what: str) -> list[Dataset]:
    """Every match of a QIDO-RS search, ``QIDO_PAGE`` at a time (``limit``/``offset``), keyed by ``key`` (a UID tag).

    A server that ignores ``offset`` (Orthanc's DICOMweb plug-in does with ModalitiesInStudy) sends the same
    page again: paging stops at the first page with nothing new, with a warning when that page was full."""
    seen: dict[str, dict[str, Any]] = {}
    offset = 0
    while True:
        page = search(limit=QIDO_PAGE, offset=offset)
        new = 0
        for m in page:
            uid = str((m.get(key) or {}).get("Value", [""])[0])
            if uid and uid not in seen:
                seen[uid] = m
                new += 1
        if len(page) < QIDO_PAGE:
            break
        if not new:
            log.warning("%s: the server sent the same %d matches again (offset ignored); going on with %d",
                        what, len(page), len(seen))
            break
        offset += len(page)
    return [Dataset.from_json(m) for m in seen.values()]


def search_studies(c: DICOMwebClient, src: DicomwebSourceConfig, filters: Mapping[str, str],
                   fields: Sequence[str] = ()) -> list[Dataset]:
    """QIDO-RS ``/studies`` with ``filters`` (keyword = value, e.g. ``StudyDate = 20260301-20260310``), all pages."""
    what = f"QIDO-RS studies of {src.name} ({src.url})"
    try:
        return _pages(functools.partial(c.search_for_studies, search_filters=dict(filters),
                                        fields=list(fields) or None), STUDY_UID_TAG, what)
    except (requests.RequestException, ValueError) as e:
        raise DicomwebError(f"{what}: {e}") from e


def search_series(c: DICOMwebClient, src: DicomwebSourceConfig, study_uid: str,
                  fields: Sequence[str] = ()) -> list[Dataset]:
    """QIDO-RS ``/studies/{study}/series``, all pages."""
    what = f"QIDO-RS series of study {study_uid} on {src.name} ({src.url})"
    try:
        return _pages(functools.partial(c.search_for_series, study_uid, fields=list(fields) or None),
                      SERIES_UID_TAG, what)
    except (requests.RequestException, ValueError) as e:
        raise DicomwebError(f"{what}: {e}") from e


PART_OVERHEAD_BYTES = 64 << 10  # a part's MIME headers and boundary beside its data set


class _PartCap:
    """Counts the response bytes read since the last part came out of the multipart decoder, and stops the
    transfer once they exceed ``cap``: the decoder holds a part in memory until its boundary arrives, so a
    part (or a missing boundary) larger than any instance the node would store is refused while it arrives."""

    def __init__(self, response: requests.Response, cap: int, what: str) -> None:
        self.cap, self.what, self.pending = cap, what, 0
        read = response.iter_content

        def iter_content(chunk_size: int | None = 1, decode_unicode: bool = False) -> Iterator[bytes]:
            for chunk in read(chunk_size):  # the decoder reads bytes
                self.pending += len(chunk)
                if self.pending > self.cap:
                    raise DicomwebError(f"{self.what}: a part of more than {self.cap} bytes (node.max_dataset_bytes "
                                        "plus its MIME headers): transfer stopped")
                yield chunk

        response.iter_content = iter_content  # type: ignore[method-assign]


def retrieve_series(c: DICOMwebClient, src: DicomwebSourceConfig, study_uid: str,
                    series_uid: str, max_dataset_bytes: int) -> Iterator[bytes]:
    """WADO-RS ``/studies/{study}/series/{series}``: each instance's Part 10 bytes as the server sent them,
    none larger than ``max_dataset_bytes`` (plus its MIME headers) held in memory.

    Uses the client's URL building, HTTP GET and multipart decoding (dicomweb-client 0.61; its public
    ``iter_series`` decodes every part with pydicom, which would re-encode what gets stored)."""
    what = f"WADO-RS series {series_uid} from {src.name} ({src.url})"
    url = c._get_series_url(_Transaction.RETRIEVE, study_uid, series_uid)
    try:
        response = c._http_get(url, headers={"Accept": ACCEPT_AS_STORED}, stream=True)
        if "boundary=" not in response.headers.get("content-type", "").lower():  # the decoder would read it all
            response.close()
            raise DicomwebError(f"{what}: not a multipart/related answer with a boundary "
                                f"({response.headers.get('content-type', 'no content type')})")
        cap = _PartCap(response, max_dataset_bytes + PART_OVERHEAD_BYTES, what)
        for part in c._decode_multipart_message(response, stream=True):
            cap.pending = 0
            yield part
    except (requests.RequestException, ValueError) as e:
        raise DicomwebError(f"{what}: {e}") from e


class DicomwebQuery:
    """:class:`node.sweep.plan.Query` by QIDO-RS (failures raise :class:`node.sweep.plan.SweepError`)."""

    def __init__(self, c: DICOMwebClient, src: DicomwebSourceConfig) -> None:
        self.client = c
        self.src = src

    def studies(self, filters: dict[str, str]) -> list[Dataset]:
        try:
            return search_studies(self.client, self.src, filters, STUDY_RETURN_KEYS)
        except DicomwebError as e:
            raise SweepError(str(e)) from e

    def series(self, study_uid: str) -> list[Dataset]:
        try:
            return search_series(self.client, self.src, study_uid, SERIES_RETURN_KEYS)
        except DicomwebError as e:
            raise SweepError(str(e)) from e
