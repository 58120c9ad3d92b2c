"""Versioned code tables and thin highdicom builders for the DICOM objects prognode writes.

- :mod:`dicom_templates.codes`: ``codes.toml`` as typed highdicom objects.
- :mod:`dicom_templates.seg`: :func:`~dicom_templates.seg.build_seg` (Segmentation IOD, PS3.3 A.51).
- :mod:`dicom_templates.sr`: :func:`~dicom_templates.sr.build_measurement_report`
  (TID 1500 Measurement Report in a Comprehensive 3D SR, PS3.16 / PS3.3 A.35.13).
- :mod:`dicom_templates.sc`: :func:`~dicom_templates.sc.build_key_image` (Secondary Capture Image
  IOD, PS3.3 A.8.1): key images with the result burned in.
- :mod:`dicom_templates.pdf`: :func:`~dicom_templates.pdf.build_pdf_report` (Encapsulated PDF IOD,
  PS3.3 A.45.1).
- :mod:`dicom_templates.geometry`: :func:`~dicom_templates.geometry.mask_polygon`, mask
  outlines (holes cut out) for planar groups.
- :mod:`dicom_templates.common`: :class:`~dicom_templates.common.Algorithm`.

See ``docs/dicom-templates.md`` for the API and what OHIF 3.13 displays.
"""
