"""Level-marker SRs built the way OHIF 3.13 saves a measurement (dcmjs / @cornerstonejs/adapters).

What OHIF 3.13.2 writes, seen in an SR it saved in headless Chromium (:func:`ohif_saved_marker`, a
Length drawn on one image and labelled "L3", then the ``storeMeasurements`` command its Save button
runs):

- an **Enhanced SR** (1.2.840.10008.5.1.4.1.1.88.22; Comprehensive 3D SR only for 3D annotations),
  TID 1500 "Imaging Measurement Report", Person Observer Name ``unknown^unknown`` when no user is
  named, procedure reported SCT 363679005 "Imaging procedure", an Image Library of the images;
- one TID 1501 Measurement Group per annotation: Tracking Identifier
  ``Cornerstone3DTools@^0.1.0:Length``, a fresh Tracking Unique Identifier, the NUM (Length, SCT
  410668003, mm) INFERRED FROM a SCOORD POLYLINE SELECTED FROM the one image it was drawn on, and
  **the label as a TEXT "Comment" (DCM 121106)**.

OHIF's earlier adapters (``getFilteredCornerstoneToolState``) wrote the label as a free-text code
``CORNERSTONEJS``/``CORNERSTONEFREETEXT`` in the group's Finding Site (SCT 363698007), or in its
Finding (DCM 121071) for an ArrowAnnotate; ``label_as`` builds those too.

:func:`marker_sr` builds these structures with highdicom (no dcmjs here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

CORNERSTONE_3D_TAG = "Cornerstone3DTools@^0.1.0"
LENGTH = CodedConcept("410668003", "SCT", "Length")
IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")


def free_text(label: str) -> CodedConcept:
    return CodedConcept("CORNERSTONEFREETEXT", "CORNERSTONEJS", label)


COMMENT = CodedConcept("121106", "DCM", "Comment")


def marker_sr(image: Dataset, label: str | None = "L3", *, reader: str = "unknown^unknown", tool: str = "Length",
              label_as: str = "comment", finding_site: CodedConcept | None = None, finding: CodedConcept | None = None,
              extra_images: tuple[Dataset, ...] = (), algorithm: bool = False,
              manufacturer: str = "Unspecified") -> hd.sr.EnhancedSR | hd.sr.Comprehensive3DSR:
    """An SR with one measurement drawn on ``image`` (a Length, or the ``tool`` named), labelled ``label``:
    as a TEXT Comment (``label_as="comment"``, OHIF 3.13) in an Enhanced SR, or as a CORNERSTONEFREETEXT
    code (``"code"``: Finding Site, or Finding for an ArrowAnnotate) in a Comprehensive 3D SR."""
    coded_label = label is not None and label_as == "code"
    rows, cols = int(image.Rows), int(image.Columns)
    coords = []
    for img in (image, *extra_images):
        coords.append(hd.sr.CoordinatesForMeasurement(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=np.array([[cols * 0.3, rows * 0.5], [cols * 0.7, rows * 0.5]], dtype=np.float32),
            source_image=hd.sr.SourceImageForRegion.from_source_image(img)))
    sites = [hd.sr.FindingSite(anatomic_location=free_text(label))] \
        if label and coded_label and tool != "ArrowAnnotate" else []
    if finding_site is not None:
        sites.append(hd.sr.FindingSite(anatomic_location=finding_site))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{CORNERSTONE_3D_TAG}:{tool}"),
        finding_type=free_text(label) if label and coded_label and tool == "ArrowAnnotate" else finding,
        finding_sites=sites or None,
        algorithm_id=hd.sr.AlgorithmIdentification(name="some CAD", version="1") if algorithm else None,
        measurements=[hd.sr.Measurement(name=LENGTH, value=float(cols) * 0.4, unit=codes.UCUM.Millimeter,
                                        referenced_coordinates=coords)])
    if label is not None and not coded_label:
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=COMMENT, value=label, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    person = hd.sr.ObserverContext(observer_type=codes.DCM.Person,
                                   observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                                       name=reader))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=person),
        procedure_reported=IMAGING_PROCEDURE, imaging_measurements=[group])
    kind = hd.sr.Comprehensive3DSR if coded_label else hd.sr.EnhancedSR
    sr = kind(
        evidence=[image, *extra_images], content=report[0], series_instance_uid=hd.UID(), series_number=1001,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=manufacturer,
        series_description="Research Derived Series", is_complete=True)
    as_dcmjs_codes(sr)
    return sr


def as_dcmjs_codes(ds: Dataset) -> None:
    """dcmjs writes the 19-character CORNERSTONEFREETEXT as a Code Value (SH, 16 at most), where
    highdicom writes a conformant Long Code Value: move it back, as OHIF's SR has it."""
    from pydicom import config

    for elem in list(ds):
        if elem.VR == "SQ":
            for item in elem.value:
                as_dcmjs_codes(item)
    if "LongCodeValue" in ds and "CodeValue" not in ds:
        old = config.settings.writing_validation_mode
        config.settings.writing_validation_mode = config.IGNORE
        try:
            ds.CodeValue = str(ds.LongCodeValue)
        finally:
            config.settings.writing_validation_mode = old
        del ds.LongCodeValue


# An SR that OHIF 3.13 itself saves ---------------------------------------------------------------

def ohif_saved_marker(ct_files: list[Path], sop_instance_uid: str, label: str, work: Path,
                      timeout: float = 240.0, hydrate: Path | None = None) -> Path:
    """Load ``ct_files`` into a private Orthanc, open them in OHIF 3.13 (ohif-check's cached build and
    static server) in headless Chromium, draw a Length on image ``sop_instance_uid``, label it ``label``
    and save the measurements as OHIF does (STOW to Orthanc); returns the SR file as Orthanc holds it.
    ``hydrate``: an SR (e.g. prognode's) loaded into the measurement panel first, so OHIF saves its
    measurements again beside the new one.

    Needs ``../shared/tools/ohif-check`` set up (its ``setup.sh``); raises RuntimeError when the
    browser step fails."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    import urllib.request

    from tests.peers import SHARED, orthanc

    tool = SHARED / "tools" / "ohif-check"
    cache = Path(os.environ.get("OHIF_CHECK_HOME") or Path.home() / ".cache" / "ohif-check")
    dist = cache / "ohif-app-3.13.2" / "dist"
    node_modules = cache / "node" / "node_modules"
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    sys.path.insert(0, str(tool / "lib"))
    from serve import ViewerServer  # ohif-check's static server + DICOMweb proxy

    work.mkdir(parents=True, exist_ok=True)
    with orthanc(work / "orthanc") as pacs:
        pacs.upload([*ct_files, *([hydrate] if hydrate else [])])
        hydrate_series = str(pydicom.dcmread(hydrate, stop_before_pixels=True).SeriesInstanceUID) if hydrate else ""
        study = str(pydicom.dcmread(ct_files[0], stop_before_pixels=True).StudyInstanceUID)
        viewer = ViewerServer(str(dist), str(tool / "lib" / "app-config.js"), pacs.url).start()
        try:
            job = work / "job.json"
            out = work / "result.json"
            job.write_text(json.dumps({"base_url": viewer.url, "study_uid": study, "sop_instance_uid": sop_instance_uid,
                                       "label": label, "chromium": chromium, "out": str(out),
                                       "hydrate_series_uid": hydrate_series}))
            env = dict(os.environ, NODE_PATH=str(node_modules))
            run = subprocess.run(["node", str(Path(__file__).with_name("ohif_save_marker.js")), str(job)], env=env,
                                 capture_output=True, text=True, timeout=timeout)
            (work / "browser.log").write_text(run.stdout + run.stderr)
            result: dict[str, Any] = (json.loads(out.read_text()) if out.exists()
                                      else {"ok": False, "error": run.stderr[-500:]})
            if not result.get("ok"):
                raise RuntimeError(f"OHIF did not save the measurement: {result.get('error')}")
            sop = result["report"]["SOPInstanceUID"]
            found = pacs.post("/tools/lookup", sop)
            if not found:
                raise RuntimeError(f"the SR {sop} OHIF stored is not in Orthanc")
            path = work / "ohif-sr.dcm"
            with urllib.request.urlopen(f"{pacs.url}/instances/{found[0]['ID']}/file", timeout=30) as r:
                path.write_bytes(r.read())
            return path
        finally:
            viewer.stop()
