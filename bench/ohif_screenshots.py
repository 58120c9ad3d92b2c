"""Screenshots for docs/ohif: anatomical phantom -> automatic L3 SEG+SR, then a reader-confirmed re-run.

    .venv/bin/python bench/ohif_screenshots.py --out RUN
    bash ../shared/tools/ohif-check/run.sh --out SHOTS RUN/ct \
        RUN/auto/seg.dcm RUN/auto/sr.dcm RUN/reader/seg.dcm RUN/reader/sr.dcm

It also writes the automatic result's Secondary Capture key image (RUN/auto/sc-1.dcm) and, where
OHIF can be served (tests/ohif_view.py), opens that series in OHIF over a private Orthanc and saves
RUN/SC-key-image.png (ohif-check itself checks SEG and SR only).
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from pipelines.body_composition.anatomy_phantom import AnatomySpec, Geometry, write_anatomy
from pipelines.body_composition.pipeline import run_folder

ap = argparse.ArgumentParser(description="phantom L3 SEG+SR, then a reader-confirmed re-run, for ohif-check")
ap.add_argument("--out", type=Path, default=None, help="output folder (default: a new temporary folder)")
root = ap.parse_args().out or Path(tempfile.mkdtemp(prefix="prognode-shots-"))
print("writing to", root)
for sub in ("ct", "auto", "reader"):  # this script's own folders only
    shutil.rmtree(root / sub, ignore_errors=True)
truth = write_anatomy(AnatomySpec(rows=256, slice_mm=5.0), root / "ct", Geometry("FFS", mirror_rows=True),
                      patient_id="PN-SHOT-1", patient_name="Phantom^Shots")
run_folder(root / "ct", root / "auto", {})
s = json.loads((root / "auto" / "summary.json").read_text())
print("auto", s["level"], s.get("level_confidence"), {k: v["value"] for k, v in s["areas_cm2"].items()})
k = truth.level_slices["L3"] + 1   # the reader picks the next image
ov = {"level": "L3", "sop_instance_uid": truth.sop_uids[k], "reader": "Reader^Rita", "source": "cli",
      "time": "2026-12-05T23:00:00Z"}
run_folder(root / "ct", root / "reader", {"level_override": ov})
s2 = json.loads((root / "reader" / "summary.json").read_text())
print("reader", s2["level"], s2.get("level_source"), {k: v["value"] for k, v in s2["areas_cm2"].items()})

# the Secondary Capture key image of the automatic result, opened in OHIF
import pydicom  # noqa: E402

from dicom_templates.identity import Identity  # noqa: E402
from pipelines.common.key_images import KeyImages, KeyImagesInput  # noqa: E402
from tests import ohif_view  # noqa: E402
from tests.peers import orthanc  # noqa: E402

ct_files = tuple(sorted((root / "ct").iterdir()))
s = {**s, "pipeline": "body-composition", "pipeline_version": "bench"}
(sc,) = KeyImages(Identity("prognode", "bench", "bench-1")).run(
    KeyImagesInput((root / "auto" / "seg.dcm",), ct_files, s, root / "auto"))
print("SC key image", sc)
why = ohif_view.available()
if why:
    print("no OHIF screenshot of the SC:", why)
else:
    shutil.rmtree(root / "orthanc", ignore_errors=True)
    with orthanc(root / "orthanc") as pacs:
        pacs.upload([*ct_files, sc])
        viewer = ohif_view.start_viewer(pacs.url)
        try:
            ds = pydicom.dcmread(sc, stop_before_pixels=True)
            shot = ohif_view.series_screenshot(viewer.url, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                               root / "SC-key-image.png", timeout=120)
            print("OHIF screenshot of the SC key image:", shot)
        finally:
            viewer.stop()
