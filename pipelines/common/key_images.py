"""Key images: the result's outlines and values burned into a Secondary Capture series.

For a PACS that shows neither SEG nor SR (``formats = [..., "sc"]`` on a destination).  Works on
what any pipeline writes, so no pipeline needs to know about it: the first SEG among the outputs
gives the outlines and the key slices (its source images with the most segmented pixels: the
level slice of body composition, the ROI's largest slice of a tumour), the summary gives the
values (:func:`pipelines.common.key_values.key_values`); a result that is not evaluable and
has no SEG gets one key image of the series' middle slice saying so and why.  Each key slice becomes one SC instance
(:func:`dicom_templates.sc.build_key_image`), the CT in a soft-tissue window as stored (rows and
columns as the CT's, so its Patient Orientation holds), colour-coded outlines with a legend, the
values, the model and version and "NOT FOR DIAGNOSIS".  An evaluable result without a SEG gets no key image.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from dicom_templates.common import Algorithm
from dicom_templates.identity import Identity
from dicom_templates.pdf import build_pdf_report
from dicom_templates.sc import build_key_image
from pipelines.base import StageError
from pipelines.common.key_values import KeyValues, key_values

log = logging.getLogger(__name__)

__all__ = ["KeyImages", "KeyImagesInput", "key_slices", "pdf_of", "render_key_image"]

NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSIS"
WINDOW = (40.0, 400.0)  # soft-tissue window: centre, width (HU)
PALETTE = ("#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
           "#bcf60c", "#fabebe")  # distinct on a grey CT
SIZE_PX = (1280, 720)  # picture width, height
MAX_KEY_SLICES = 2  # a SEG over at most this many slices gets a key image of each; a longer one, of its largest


@dataclass(frozen=True)
class KeyImagesInput:
    result_files: tuple[Path, ...]  # the pipeline's outputs (SEG, SR, ...)
    image_files: tuple[Path, ...]  # the source series' files
    summary: Mapping[str, Any]  # with "pipeline" and "pipeline_version"
    work_dir: Path


def _window(ds: Dataset) -> NDArray[np.uint8]:
    hu = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    c, w = WINDOW
    g = np.clip((hu - (c - w / 2)) / w, 0.0, 1.0)
    return (g * 255.0 + 0.5).astype(np.uint8)


def render_key_image(ct: Dataset, masks: Sequence[tuple[str, NDArray[np.bool_]]], kv: KeyValues,
                     title: str) -> NDArray[np.uint8]:
    """The picture of one key slice: rows x columns x 3 uint8 (``SIZE_PX``)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    w, h = SIZE_PX
    fig = Figure(figsize=(w / 100, h / 100), dpi=100, facecolor="black")
    ax = fig.add_axes((0.0, 0.0, h / w, 1.0))  # the CT: a square on the left, as stored
    ax.set_axis_off()
    sy, sx = (float(v) for v in ct.get("PixelSpacing", (1.0, 1.0)))
    ax.imshow(_window(ct), cmap="gray", vmin=0, vmax=255, aspect=sy / sx, interpolation="bilinear")
    handles = []
    for i, (label, mask) in enumerate(masks):  # the first (main) outlines widest, the later ones on top
        color = PALETTE[i % len(PALETTE)]
        if mask.any():
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=[color], linewidths=max(1.2, 3.2 - 0.4 * i))
        handles.append(Patch(facecolor="none", edgecolor=color, linewidth=2.5, label=label[:40]))
    ax.text(0.5, 0.985, NOT_FOR_DIAGNOSIS, transform=ax.transAxes, ha="center", va="top", color="#ff3030",
            fontsize=20, fontweight="bold")
    panel = fig.add_axes((h / w + 0.01, 0.0, 0.99 - h / w, 1.0))
    panel.set_axis_off()
    panel.set_xlim(0, 1)
    panel.set_ylim(0, 1)
    y = 0.96
    panel.text(0.02, y, title[:40], color="white", fontsize=17, fontweight="bold", va="top")
    y -= 0.065
    for line in textwrap.wrap(kv.verdict, 48)[:6]:  # a reason is read whole
        panel.text(0.02, y, line, color="#7CFC00" if kv.evaluable else "#ffa500", fontsize=14, va="top")
        y -= 0.045
    y -= 0.015
    for label, text in kv.values[:9]:
        for i, line in enumerate(textwrap.wrap(f"{label}: {text}", 60)[:2]):
            panel.text(0.02 + 0.03 * (i > 0), y, line, color="white", fontsize=12, va="top")
            y -= 0.042
    if handles:
        legend = panel.legend(handles=handles[:12], loc="upper left", bbox_to_anchor=(0.0, y - 0.005),
                              frameon=False, labelcolor="white", fontsize=11, title="Outlines",
                              title_fontsize=12, alignment="left", handlelength=1.6, labelspacing=0.3)
        legend.get_title().set_color("white")
    panel.text(0.02, 0.085, kv.model[:70], color="#cfcfcf", fontsize=11, va="bottom")
    panel.text(0.02, 0.03, f"{NOT_FOR_DIAGNOSIS}: research result", color="#ff3030", fontsize=14,
               fontweight="bold", va="bottom")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[:, :, :3]).astype(np.uint8)


def key_slices(per_slice: Mapping[str, NDArray[np.bool_]], max_slices: int = MAX_KEY_SLICES) -> list[str]:
    """The key slices among a SEG's source images (SOP Instance UID -> its segments' pixels): every
    one of a SEG over at most ``max_slices`` slices (the level slice(s)), else the one with the most
    segmented pixels (an ROI's largest slice); ties keep the SEG's order."""
    ranked = sorted(per_slice, key=lambda u: -int(per_slice[u].sum()))
    return ranked if len(ranked) <= max_slices else ranked[:1]


def pdf_of(pictures: Iterable[NDArray[np.uint8]]) -> bytes:
    """A PDF with one landscape page per picture (the key images, text as drawn on them)."""
    import io

    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    buf = io.BytesIO()
    with PdfPages(buf, metadata={"Title": "prognode key images", "Creator": "prognode",
                                 "CreationDate": None}) as pdf:
        for rgb in pictures:
            h, w = rgb.shape[:2]
            fig = Figure(figsize=(w / 100, h / 100), dpi=100)
            ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
            ax.set_axis_off()
            ax.imshow(rgb, interpolation="none")
            pdf.savefig(fig)
    return buf.getvalue()


class KeyImages:
    """Stage: SEG + summary + source images -> Secondary Capture key images and/or an Encapsulated
    PDF report of them (files under work_dir)."""

    name = "key-images"

    def __init__(self, identity: Identity, max_slices: int = MAX_KEY_SLICES, sc: bool = True,
                 pdf: bool = False) -> None:
        self.identity = identity
        self.max_slices = max_slices
        self.sc = sc  # write the key images as Secondary Capture instances
        self.pdf = pdf  # write them as an Encapsulated PDF report (one page each)

    def _write(self, pictures: Sequence[tuple[Dataset, NDArray[np.uint8]]], algorithm: Algorithm, title: str,
               work_dir: Path) -> tuple[Path, ...]:
        out = []
        if self.sc:
            series = hd.UID()
            for i, (ct, rgb) in enumerate(pictures, start=1):
                sc = build_key_image(ct, rgb, algorithm, self.identity, series, i, title)
                p = work_dir / f"sc-{i}.dcm"
                sc.save_as(p, enforce_file_format=True)
                out.append(p)
        if self.pdf and pictures:
            doc = build_pdf_report(pictures[0][0], pdf_of(p for _, p in pictures), algorithm, self.identity,
                                   title.replace("key images", "report"))
            p = work_dir / "report-pdf.dcm"
            doc.save_as(p, enforce_file_format=True)
            out.append(p)
        return tuple(out)

    def run(self, data: KeyImagesInput) -> tuple[Path, ...]:
        seg_path = next((p for p in data.result_files
                         if pydicom.dcmread(p, stop_before_pixels=True).get("Modality") == "SEG"), None)
        if seg_path is None:
            kv = key_values(data.summary)
            if not kv.evaluable and data.image_files:  # the PACS shows the verdict and its reason too
                return self._not_evaluable(data, kv)
            log.info("key images: no SEG among the results, no key image")
            return ()
        seg = hd.seg.segread(seg_path)
        series_uid = str(seg.SeriesInstanceUID)
        try:
            return self._run(seg, data)
        except (ValueError, KeyError, AttributeError, IndexError) as e:
            raise StageError(self.name, series_uid, f"{type(e).__name__}: {e}") from e

    def _not_evaluable(self, data: KeyImagesInput, kv: KeyValues) -> tuple[Path, ...]:
        """One key image of the series' middle slice (along the slice normal, in patient
        coordinates) that says "not evaluable" and why; no outline, no value."""
        heads = [(p, pydicom.dcmread(p, stop_before_pixels=True)) for p in data.image_files]
        heads = [(p, h) for p, h in heads if "ImagePositionPatient" in h and "ImageOrientationPatient" in h]
        if not heads:
            return ()
        iop = np.asarray(heads[0][1].ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        heads.sort(key=lambda ph: float(np.dot(normal, np.asarray(ph[1].ImagePositionPatient, dtype=float))))
        path, _ = heads[len(heads) // 2]
        ct = pydicom.dcmread(path)
        name = str(data.summary.get("pipeline") or "result")
        algorithm = Algorithm(name=name, version=str(data.summary.get("pipeline_version") or
                                                     data.summary.get("version") or "unknown"))
        rgb = render_key_image(ct, [], kv, name)
        log.info("key images: not evaluable (%s), one picture", kv.reason)
        return self._write([(ct, rgb)], algorithm, f"{name} not evaluable", data.work_dir)

    def _run(self, seg: hd.seg.Segmentation, data: KeyImagesInput) -> tuple[Path, ...]:
        sources = {str(ds.SOPInstanceUID): p for p in data.image_files
                   for ds in [pydicom.dcmread(p, stop_before_pixels=True)]}
        referenced = [str(uid) for _, _, uid in seg.get_source_image_uids() if str(uid) in sources]
        if not referenced:
            log.info("key images: the SEG references none of the source images, no key image")
            return ()
        labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
        numbers = sorted(labels)
        per_slice: dict[str, NDArray[np.bool_]] = {}
        for uid in referenced:
            px = seg.get_pixels_by_source_instance([uid], segment_numbers=numbers, combine_segments=False,
                                                   assert_missing_frames_are_empty=True)
            per_slice[uid] = np.asarray(px[0]).astype(bool)  # rows x columns x segments
        keys = key_slices(per_slice, self.max_slices)
        summary = data.summary
        kv = key_values(summary)
        algo = seg.SegmentSequence[0].get("SegmentationAlgorithmIdentificationSequence")
        algorithm = Algorithm(
            name=str(algo[0].AlgorithmName) if algo else str(summary.get("pipeline") or "prognode"),
            version=str(algo[0].AlgorithmVersion) if algo else str(summary.get("pipeline_version") or "0"))
        title = str(seg.get("SeriesDescription", "") or summary.get("pipeline", "")).removesuffix(" SEG")
        pictures = []
        for uid in keys:
            ct = pydicom.dcmread(sources[uid])
            masks = [(labels[n], per_slice[uid][:, :, j]) for j, n in enumerate(numbers)]
            pictures.append((ct, render_key_image(ct, masks, kv, title)))
        out = self._write(pictures, algorithm, f"{title} key images", data.work_dir)
        log.info("key images: %d picture(s): %s", len(pictures), ", ".join(p.name for p in out))
        return out
