"""The DIMSE sender (``kind = "dimse"``): C-STORE SCU on one association per batch, C-ECHO as the probe,
over DICOM TLS where the destination's ``tls`` is enabled (:func:`node.tls.associate`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.presentation import build_context

from node import tls
from node.config import DestinationConfig
from node.dicom_facts import VERIFICATION
from node.transports.base import Outcome, Sender

MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts per association


def store_status_ok(status: int) -> bool:
    return status == 0x0000 or (status & 0xF000) == 0xB000  # success or warning


class DimseSender(Sender):
    kind = "dimse"

    def __init__(self, dest: DestinationConfig, calling_ae: str, base_dir: Path) -> None:
        self.dest = dest
        self.calling_ae = calling_ae
        self.base_dir = base_dir
        self._assoc: Association | None = None

    def describe(self) -> str:
        d = self.dest
        return f"{d.ae_title}@{d.host}:{d.port}{' over TLS' if d.tls.enabled else ''}"

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.dest.timeout_seconds
        ae.connection_timeout = self.dest.timeout_seconds
        return ae

    def open(self, datasets: Sequence[pydicom.Dataset]) -> str:
        ae = self._ae()
        contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
        ae.requested_contexts = [build_context(sop_class, [ts]) for sop_class, ts in sorted(contexts)[:MAX_CONTEXTS]]
        opened = tls.associate(ae, self.dest, self.base_dir)  # over TLS where dest.tls is enabled
        if not opened.ok or opened.assoc is None:
            return opened.error
        self._assoc = opened.assoc
        return ""

    def send(self, ds: pydicom.Dataset) -> Outcome:
        if self._assoc is None or not self._assoc.is_established:
            return Outcome(False, error="C-STORE: no association (aborted by the peer?)")
        try:
            rsp = self._assoc.send_c_store(ds)
            status = int(getattr(rsp, "Status", -1)) if rsp is not None and "Status" in rsp else -1
        except Exception as e:
            return Outcome(False, error=f"C-STORE error: {type(e).__name__}: {e}")
        if status >= 0 and store_status_ok(status):
            return Outcome(True, status=f"0x{status:04X}")
        comment = str(rsp.get("ErrorComment", "")) if rsp is not None else ""
        return Outcome(False, status=f"0x{status & 0xFFFF:04X}",
                       error=f"C-STORE status 0x{status & 0xFFFF:04X} {comment}".strip())

    def close(self) -> None:
        assoc, self._assoc = self._assoc, None
        if assoc is not None and assoc.is_established:
            assoc.release()

    def echo(self) -> tuple[bool, str]:
        ae = self._ae()
        ae.add_requested_context(VERIFICATION)
        opened = tls.associate(ae, self.dest, self.base_dir)  # over TLS where dest.tls is enabled
        if not opened.ok or opened.assoc is None:
            return False, f"no association: {opened.error}"
        assoc = opened.assoc
        try:
            rsp = assoc.send_c_echo()
            status = int(rsp.Status) if rsp is not None and "Status" in rsp else -1
        finally:
            if assoc.is_established:
                assoc.release()
        return status == 0x0000, f"C-ECHO status {status:#06x}"
