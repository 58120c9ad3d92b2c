"""DICOM SEG builder: Segmentation IOD (PS3.3 A.51), BINARY, through highdicom only."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from dicom_templates import codes
from dicom_templates.common import Algorithm, check_identity, contributing_equipment, with_type2
from dicom_templates.identity import Identity

log = logging.getLogger(__name__)

__all__ = ["Algorithm", "build_seg", "segment_description", "source_frame_count"]


def segment_description(
    key: str, number: int, algorithm: Algorithm, label: str | None = None
) -> hd.seg.SegmentDescription:
    """Segment Description (PS3.3 C.8.20.4) of table row ``key`` as segment ``number``.

    Label, category, type, laterality modifier, anatomic region, display colour and
    algorithm type come from ``codes.toml``; ``label`` overrides the table's label.
    """
    row = codes.segment(key)
    desc = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label or row.label,
        segmented_property_category=row.category,
        segmented_property_type=row.type,
        algorithm_type=row.algorithm_type,
        algorithm_identification=algorithm.seg_identification() if row.algorithm_type != "MANUAL" else None,
        anatomic_regions=[row.region] if row.region is not None else None,
        display_color=row.display_color(),
    )
    if row.modifier is not None:
        # highdicom 0.28 SegmentDescription has no parameter for the Segmented Property Type
        # Modifier Code Sequence (0062,0011), which PS3.3 C.8.20.4 nests in the type item;
        # attach the table's coded laterality there as a highdicom CodedConcept.
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [row.modifier]
    return desc


def source_frame_count(source_images: Sequence[Dataset]) -> int:
    """Planes the SEG frames map to: one per single-frame image, or the frames of one multi-frame."""
    if len(source_images) == 1 and int(source_images[0].get("NumberOfFrames", 1) or 1) > 1:
        return int(source_images[0].NumberOfFrames)
    return len(source_images)


def build_seg(
    source_images: Sequence[Dataset],
    masks: Mapping[str, NDArray[np.bool_]],
    algorithm: Algorithm,
    identity: Identity,
    series_description: str,
    *,
    labels: Mapping[str, str] | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    content_label: str = "PROGNODE",
    omit_empty_frames: bool = True,
) -> hd.seg.Segmentation:
    """Build a BINARY DICOM Segmentation (PS3.3 A.51) of ``source_images``.

    Parameters
    ----------
    source_images:
        The CT images the masks were computed on, all of one series: either single-frame
        images in the order of the masks' first axis, or exactly one multi-frame image
        (Enhanced CT) whose frames are in that order.  Only metadata is needed.  The SEG
        takes their study, patient and Frame of Reference.
    masks:
        ``code-table key -> bool array (planes, rows, columns)``, one plane per source
        image (or per frame).  Segment numbers follow the mapping's order (1, 2, ...).
    algorithm, identity:
        Written as Segment Algorithm Identification and as Contributing Equipment
        (manufacturer, software version, device serial; placeholders refused).
    labels:
        Optional per-key SegmentLabel overrides of the table's label.
    omit_empty_frames:
        Leave out planes where a segment is empty.  Each remaining frame keeps its own
        Plane Position and Derivation Image references (highdicom), so overlays stay put.
        When every mask is empty the SEG keeps all frames (a SEG needs at least one).

    Raises
    ------
    KeyError: a mask key is not in the code table.
    ValueError: no masks, shapes that do not match the sources, or empty identity.
    """
    check_identity(identity)
    if not source_images:
        raise ValueError("build_seg: at least one source image is required")
    if not masks:
        raise ValueError("build_seg: at least one mask is required")
    planes = source_frame_count(source_images)
    rows, cols = int(source_images[0].Rows), int(source_images[0].Columns)
    keys = list(masks)
    arrays = []
    for key in keys:
        codes.segment(key)  # KeyError naming an unknown key
        m = np.asarray(masks[key])
        if m.shape != (planes, rows, cols):
            raise ValueError(f"build_seg: mask {key!r} has shape {m.shape}, expected {(planes, rows, cols)}")
        arrays.append(m.astype(bool, copy=False))
    # Mutually exclusive masks travel as one label-map array (segment number per pixel),
    # which highdicom checks far faster than a stacked (planes, rows, cols, segments) array;
    # the SEG written is BINARY either way.  Masks are sparse (a few muscles in a whole CT),
    # so each is written into the label map through the flat indices of its voxels: a mask
    # overlaps an earlier one when any of its voxels is already labelled.
    pixel_array: NDArray[np.uint8]
    exclusive = len(keys) < 255
    label = np.zeros((planes, rows, cols), dtype=np.uint8)
    flat = label.reshape(-1)
    any_voxel = False
    for i, m in enumerate(arrays):
        if not exclusive:
            break
        idx = np.flatnonzero(m)
        if flat[idx].any():
            exclusive = False
            break
        flat[idx] = i + 1
        any_voxel = any_voxel or idx.size > 0
    if exclusive:
        pixel_array = label
    else:
        del label, flat
        pixel_array = np.stack(arrays, axis=-1).astype(np.uint8)
        any_voxel = bool(pixel_array.any())
    descriptions = [
        segment_description(key, i + 1, algorithm, (labels or {}).get(key)) for i, key in enumerate(keys)
    ]
    if not any_voxel:
        log.info("build_seg: every mask is empty; keeping all %d frames", planes)
    seg = hd.seg.Segmentation(
        source_images=[with_type2(d) for d in source_images],
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=identity.seg_series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=instance_number,
        manufacturer=identity.manufacturer,
        manufacturer_model_name=algorithm.name,
        software_versions=identity.software_version,
        device_serial_number=identity.device_serial_number,
        institution_name=identity.institution_name or None,
        content_label=content_label,
        content_description=f"{algorithm.name} {algorithm.version}"[:64],
        series_description=series_description,
        omit_empty_frames=omit_empty_frames and any_voxel,
        contributing_equipment=[contributing_equipment(identity, algorithm)],
    )
    return seg
