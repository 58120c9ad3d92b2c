"""Tumour ROI from what the PACS sends: a DICOM SEG or an RTSTRUCT becomes a mask on the CT grid."""

from pipelines.roi.mask import RoiMask, RoiToMask, find_roi_objects

__all__ = ["RoiMask", "RoiToMask", "find_roi_objects"]
