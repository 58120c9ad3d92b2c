"""Body composition at L3 (abdominal CT) or C3 (neck CT): the ``body-composition`` pipeline.

Stages (``stages.py``; each usable alone): series to volume (``pipelines.common.volume``),
QC gate, level finder, tissue segmentation with named muscles, measurements (SMI and
published sarcopenia cut-offs from ``cutoffs.toml``), then SEG and TID 1500 SR through
``dicom_templates`` (``outputs.py``).  Backends: weight-free (default, CPU: ``levels.py``
finds the level from the canal, discs and anatomical anchors; ``tissues.py`` segments by anatomical
compartment; ``plausibility.py`` gates the numbers) and ``monai_backend.py`` (BasicUNet 3D level finder + 2D slice segmenter, k-fold majority
vote, safetensors weights from ``prognode train-seg``, see ``train.py``).  ``anatomy_phantom.py``
writes CT series with known truth from real VerSe spines (``phantom.py``: the older schematic one).  ``run_folder(input_dir, out_dir, options)`` runs it all
on a folder.  Nothing here imports torch or monai at import time.
"""

from pipelines.body_composition.pipeline import create, run_folder

__all__ = ["create", "run_folder"]
