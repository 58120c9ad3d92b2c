"""Anatomical CT phantoms with known truth, built around real spines (not around the algorithm).

Why: the schematic phantom (:mod:`pipelines.body_composition.phantom`) paints a 190 mm "sacrum"
bar, vertebrae without processes and organs floating in fat, so a pipeline's 0 % error on it tests
bookkeeping, not anatomy.  This phantom is meant to be as hard as a real scan for the things a
body-composition pipeline gets wrong: level naming, muscle that touches organs, laterality.

What it is made of (all in LPS millimetres: x to the patient's left, y posterior, z superior):

- **Spine** from the manual VerSe vertebra label maps (:mod:`.anatomy_spine`): real bodies,
  pedicles, laminae, transverse and spinous processes, lordosis and kyphosis; discs of the real
  height between the bodies (85 HU); the canal with cord (35 HU) above the conus and CSF (10 HU);
  a synthesised sacrum (S1-S5 with ala and sacral canal) below L5; cortex 750 HU (a one-pixel
  shell) around cancellous bone of 160-200 HU (denser in the thoracic spine).
- **Aged spine** (all off by default): ``trabecular_hu`` (osteoporotic cancellous bone, e.g. 80 HU,
  with 1 mm cortical endplates of about 500 HU), ``narrowed_discs`` (to ``disc_height_mm``; the
  vertebrae above move down), ``endplate_sclerosis`` (2 mm, about 800 HU, at the narrowed discs),
  ``vacuum_discs`` (gas, about -700 HU, in the nucleus), ``osteophyte_discs`` (a bone lip bridging
  the disc's anterior and lateral rim) and ``wedge_fracture`` (anterior height ``wedge_front``); see
  :class:`.anatomy_spine.Aging`.  The level truth is measured on the changed bones.
- **Ribs** as curved tubes from the costal facet (head) and the transverse-process tip (tubercle)
  of each thoracic vertebra, around the trunk just inside the wall, sloping down as they run
  forward; costal cartilage (120 HU) on the front end of ribs 1-10; T11 and T12 are floating ribs.
  ``rib_pairs`` 11 drops T12's ribs, 13 adds a lumbar rib on L1.  Vertebrae above the spine's
  top (e.g. T8 for a T9-L5 spine) still get their rib, extrapolated, so the front of higher ribs
  appears in the top slices as on a real scan.
- **Pelvis**: iliac wings as curved plates from the sacroiliac joint out to the crest, the crest
  at the L4-L5 disc (``crest_offset_mm`` moves it), iliacus on their inner face, gluteal muscles on
  their outer face, psoas joining iliacus below L5 (iliopsoas).
- **Trunk**: skin (2 mm), subcutaneous fat whose thickness follows the habitus (thin, average,
  obese), abdominal wall (rectus, and obliques with transversus as one band each side, a thin fat
  plane between the layers), psoas major (from T12/L1, attached to the vertebral bodies, growing to
  L4), quadratus lumborum (lateral to the transverse processes, from the 12th rib to the crest),
  the paraspinal compartment behind the transverse processes (erector spinae with multifidus, the
  "autochthon" definition), diaphragmatic crura, intermuscular fat (IMAT) blobs inside muscles,
  liver (touching the right wall and the diaphragm), spleen, kidneys (touching psoas and
  quadratus lumborum), stomach and colon with gas, small-bowel loops with gas-fluid levels (some
  against the anterior wall), aorta and IVC with the iliac vessels below the bifurcation, lung bases
  in the posterior costophrenic recesses, visceral fat filling the rest of the cavity, and both
  arms at the sides touching the trunk (humerus, or radius and ulna below the elbow, arm muscle,
  arm fat).  Contrast-enhanced (portal-venous) or non-contrast organ values; positive oral contrast in the
  stomach and bowel (``oral_contrast``).
- **Psoas contacts** (``psoas_contacts``, all off by default: the default phantoms are unchanged).  What
  touches psoas major at L3 on real CT, in the muscle window when not enhanced, placed where standard
  cross-sectional anatomy puts it (Gray's Anatomy, 42nd ed., posterior abdominal wall and retroperitoneum;
  Moeller & Reif, Pocket Atlas of Sectional Anatomy, CT at L3), touching the psoas with no fat plane (as in
  thin patients), each with its own truth label (never psoas; :data:`CONTACT_LABELS`):

  - ``"ivc"``: the infrarenal IVC (23 x 15 mm, flattened) in the groove between the right psoas and the
    vertebral body, from L1 (blended in) down to the bifurcation; ``"aorta"``: an ectatic aorta (19 mm,
    as over 60) against the left psoas' anteromedial edge.  Non-contrast about 40 HU; portal venous IVC
    130 HU, aorta 190 HU; ``contrast_phase="arterial"`` opacifies the aorta (280 HU) and leaves the IVC,
    iliac and gonadal veins unopacified (45 HU).  The common iliacs lie below L4, not at L3.
  - ``"duodenum"``: the third part crossing at L3 from right to left, lying on the right psoas, the IVC
    and the aorta, to the left psoas where the fourth part ascends (Gray's), a tube of 24 mm (label
    ``duodenum``, 25 HU non-contrast, 45 HU enhanced: wall and fluid averaged); ``"bowel"``: a collapsed
    jejunal loop (22 mm, ``small_bowel``) on the left psoas' anterolateral surface.
  - ``"kidney"``: both lower poles at L3 (the right one lower), their medial border on the psoas' lateral
    edge and their back on the quadratus lumborum (32 HU non-contrast, enhancing with contrast).
  - ``"quadratus"``: quadratus lumborum's medial edge against the psoas' posterolateral surface, in
    front of the transverse process as before.
  - ``"crus"``: the right crus of the diaphragm, which arises from the L1-L3 bodies (the left from L1-L2),
    a flat 12 x 7 mm slip on the anterolateral corner of L3 against the right psoas (label ``diaphragm``).
  - ``"node"``: retroperitoneal lymph nodes of 10-15 mm (40 HU, 65 enhanced): left para-aortic (between
    the aorta and the left psoas) and right paracaval (on the right psoas), label ``lymph_node``.
  - ``"ureter"``: the ureter (5 mm, no excreted contrast, 18-22 HU) on each psoas' anterior surface and
    the gonadal vein (4 mm, as the IVC) anteromedial to it (labels ``ureter``, ``gonadal_vessel``).

  ``bench/psoas_contacts.py`` measures the segmenter's psoas against each of them.
- **Neck** (``region="neck"``, cervical spines gl003 or gl017): prevertebral, scalene and
  posterior paravertebral muscles, sternocleidomastoids running from the mastoid to the sternum,
  airway (pharynx, larynx with cartilage, trachea), oesophagus, thyroid lobes, carotids and
  jugular veins, mandible at C2-C3, skull base hint above C1, shoulders with clavicles and lung
  apices below C7, ribs on T1-T5.

Truth is the painted label map (:data:`LABELS`), the vertebra number per bone voxel (VerSe
numbering, 26 = sacrum), the vertebra that owns each rib voxel, and the level of the middle of
each vertebral body.  HU comes from the labels (with per-pixel texture), is averaged over the slice
thickness (thick slices blur discs into bone as on a real scanner), blurred in-plane by the
scanner's point-spread (``blur_mm``) and gets Gaussian noise whose SD follows the habitus.

Gravity is ignored: a prone copy keeps the supine anatomy (gas stays anterior) so every
geometry variant holds the same anatomy at the same LPS points; only the table moves.

Use::

    ph = make_anatomy(AnatomySpec(habitus="obese", contrast=False))
    truth = write_series(ph, out_dir, Geometry(position="FFS", mirror_rows=True))
    truth.level_slices["L3"]      # written slice index of the middle of L3
    truth.mask("psoas_left")      # (slices, rows, columns) as written

:mod:`.anatomy_spine` documents the bone model.  The writers are :func:`write_series` (one
DICOM CT Image Storage series, any of HFS, HFP, FFS, FFP, optionally with mirrored rows) and
:func:`write_anatomy` (build and write in one call).  ``Anatomy.labels_at(points)`` samples the
truth at any LPS points (e.g. the voxel centres of a volume read back in another orientation).

Sizes: the default 256 x 256 x ~57 (T10-S1 at 5 mm, 500 mm field of view) builds in about 4 s on
one core, after 3-4 s to load and model the spine once per process (cached); 512 x 512 at 1 mm
(about 283 slices) takes about a minute and 2.3 GB.  The spine sources and the habitus table are
data, not fitted to any algorithm: nothing here was adjusted after running the pipeline on it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from pipelines.body_composition.anatomy_spine import (
    NAMES,
    NUMBERS,
    SACRUM,
    Aging,
    SpineModel,
    load_spine,
    order_key,
)
from pipelines.body_composition.phantom import set_ct_pixels, to_stored
from pipelines.body_composition.types import SliceAnatomy

log = logging.getLogger(__name__)
_T = TypeVar("_T", bound=np.generic)

LABELS: Mapping[str, int] = {
    "skin": 1, "sat": 2, "vat": 3, "imat": 4,
    "rectus_left": 5, "rectus_right": 6, "wall_left": 7, "wall_right": 8,
    "psoas_left": 9, "psoas_right": 10, "iliacus_left": 11, "iliacus_right": 12,
    "quadratus_left": 13, "quadratus_right": 14, "erector_left": 15, "erector_right": 16,
    "gluteal_left": 17, "gluteal_right": 18, "diaphragm": 19,
    "scm_left": 20, "scm_right": 21, "paravertebral_left": 22, "paravertebral_right": 23,
    "neck_muscle_other": 24, "shoulder_muscle": 25, "erector_fat_left": 26, "erector_fat_right": 27,
    "psoas_fat_left": 28, "psoas_fat_right": 29,
    "liver": 30, "spleen": 31, "kidney_left": 32, "kidney_right": 33, "stomach": 34, "colon": 35,
    "small_bowel": 36, "bowel_gas": 37, "aorta": 38, "ivc": 39, "iliac_artery": 40, "iliac_vein": 41,
    "lung": 42, "ligament": 43, "airway": 44, "thyroid": 45, "oesophagus": 46, "carotid": 47,
    "jugular": 48, "larynx_cartilage": 49, "oral_soft_tissue": 50, "deep_neck_fat": 51,
    "duodenum": 52, "lymph_node": 53, "ureter": 54, "gonadal_vessel": 55,
    "vertebra": 60, "disc": 61, "canal_csf": 62, "cord": 63, "rib": 64, "costal_cartilage": 65,
    "sacrum": 66, "ilium": 67, "humerus": 68, "forearm_bone": 69, "mandible": 70, "skull": 71,
    "clavicle": 72, "scapula": 73,
    "arm_muscle_left": 80, "arm_muscle_right": 81, "arm_fat_left": 82, "arm_fat_right": 83, "arm_skin": 84,
    "table": 90,
}
NAME_OF: Mapping[int, str] = {v: k for k, v in LABELS.items()}
TRUNK_MUSCLES = ("rectus_left", "rectus_right", "wall_left", "wall_right", "psoas_left", "psoas_right",
                 "iliacus_left", "iliacus_right", "quadratus_left", "quadratus_right", "erector_left",
                 "erector_right", "gluteal_left", "gluteal_right", "diaphragm", "scm_left", "scm_right",
                 "paravertebral_left", "paravertebral_right", "neck_muscle_other", "shoulder_muscle")
# Body-composition categories (the pipeline's segment keys) as unions of truth labels.  Skeletal
# muscle is every trunk and neck muscle (Mourtzakis 2008 at L3: all muscles in the slice), never
# the arms; IMAT is fat inside muscle fascia; VAT is all fat inside the abdominal wall.
COMPOSITION: Mapping[str, tuple[str, ...]] = {
    "skeletal_muscle": TRUNK_MUSCLES,
    "psoas_left": ("psoas_left", "psoas_fat_left"), "psoas_right": ("psoas_right", "psoas_fat_right"),
    # the erector is its compartment (TotalSegmentator's autochthon, the paraspinal total cross-sectional
    # area): the IMAT inside it belongs to it, and is IMAT as well
    "erector_left": ("erector_left", "erector_fat_left"), "erector_right": ("erector_right", "erector_fat_right"),
    "sat": ("sat",), "vat": ("vat",), "imat": ("imat", "erector_fat_left", "erector_fat_right", "psoas_fat_left", "psoas_fat_right"),
    "c3_muscle": ("scm_left", "scm_right", "paravertebral_left", "paravertebral_right"),  # Swartz 2016
    "sternocleidomastoid_left": ("scm_left",), "sternocleidomastoid_right": ("scm_right",),
    "paravertebral_left": ("paravertebral_left",), "paravertebral_right": ("paravertebral_right",),
}
BONES = ("vertebra", "rib", "sacrum", "ilium", "humerus", "forearm_bone", "mandible", "skull", "clavicle",
         "scapula")


# Structures that can be made to touch psoas major at L3 (``AnatomySpec.psoas_contacts``); each keeps its own
# truth label (never psoas).  See the module docstring, "Psoas contacts".
PSOAS_CONTACTS = ("ivc", "aorta", "duodenum", "bowel", "kidney", "quadratus", "crus", "node", "ureter")
# the truth labels each contact paints (what must never be counted as psoas)
CONTACT_LABELS: Mapping[str, tuple[str, ...]] = {
    "ivc": ("ivc",), "aorta": ("aorta",), "duodenum": ("duodenum",), "bowel": ("small_bowel",),
    "kidney": ("kidney_left", "kidney_right"), "quadratus": ("quadratus_left", "quadratus_right"),
    "crus": ("diaphragm",), "node": ("lymph_node",), "ureter": ("ureter", "gonadal_vessel"),
}


@dataclass(frozen=True)
class Habitus:
    half_width: float  # trunk semi-axes at L3 (skin), mm
    half_depth: float
    sat_front: float  # subcutaneous fat thickness, mm
    sat_side: float
    sat_back: float
    wall: float  # lateral abdominal wall thickness
    muscle_scale: float
    muscle_hu: float  # myosteatosis lowers muscle attenuation
    imat_blobs: int  # IMAT blobs per muscle per 10 cm of length
    arm_fat: float
    noise_sd: float
    weight_kg: float
    height_m: float


HABITUS: Mapping[str, Habitus] = {
    "thin": Habitus(138.0, 92.0, 7.0, 6.0, 8.0, 12.0, 0.85, 50.0, 1, 4.0, 10.0, 52.0, 1.72),
    "average": Habitus(165.0, 115.0, 22.0, 20.0, 20.0, 14.0, 1.0, 44.0, 3, 10.0, 14.0, 80.0, 1.76),
    "obese": Habitus(205.0, 155.0, 48.0, 44.0, 38.0, 15.0, 1.05, 34.0, 8, 22.0, 22.0, 118.0, 1.74),
}


@dataclass(frozen=True)
class AnatomySpec:
    region: str = "abdomen"  # "abdomen" or "neck"
    spine: str = ""  # VerSe source; "" = verse004 (abdomen) or gl003 (neck)
    top: str = ""  # first level covered ("" = T10 for the abdomen, C1 for the neck)
    bottom: str = ""  # last level covered ("" = S1 for the abdomen, T1 for the neck)
    habitus: str = "average"
    contrast: bool = True
    rib_pairs: int = 12  # 11, 12 or 13
    sacralised_l5: bool = False  # lumbosacral transitional vertebra
    crest_offset_mm: float = 0.0  # iliac crest relative to the L4-L5 disc
    rows: int = 256
    fov_mm: float = 0.0  # 0 = 500 mm for the abdomen (arms included), 360 mm for the neck (shoulders)
    slice_mm: float = 5.0  # slice thickness (the slab each slice averages)
    spacing_mm: float = 0.0  # between slice centres; 0 = slice_mm (contiguous), less = an overlapping reconstruction
    arms: bool = True
    table: bool = True
    noise_sd: float | None = None  # None: the habitus's
    blur_mm: float = 0.7
    seed: int = 0
    sex: str = "M"
    age: str = "062Y"
    # an old spine (all off by default; see docs/level-finding.md, "Aged spines"):
    trabecular_hu: float = 0.0  # osteoporosis: cancellous bone of the vertebrae at this HU (0 = young, 160-200)
    narrowed_discs: tuple[str, ...] = ()  # degenerated discs ("L4/L5") brought to disc_height_mm at the centre
    disc_height_mm: float = 3.0
    endplate_sclerosis: bool = False  # the narrowed discs' endplates sclerotic (a dense 2 mm band)
    vacuum_discs: tuple[str, ...] = ()  # discs with gas in the nucleus (vacuum phenomenon)
    osteophyte_discs: tuple[str, ...] = ()  # discs bridged by osteophytes around their anterior and lateral rim
    wedge_fracture: str = ""  # a vertebra ("L1") with a compression (wedge) fracture ...
    wedge_front: float = 0.6  # ... its anterior height as a fraction of the original
    # structures that touch psoas major at L3 in real patients (all off by default; see "Psoas contacts" above):
    # any of PSOAS_CONTACTS
    psoas_contacts: tuple[str, ...] = ()
    contrast_phase: str = "portal"  # with contrast: "portal" (venous) or "arterial" (the infrarenal IVC unopacified)
    # positive oral contrast (dilute barium or iodinated, as many oncologic staging CTs are done): the stomach,
    # duodenum, small bowel and colon filled at ``_ORAL`` HU, as bright as cancellous bone and beside the spine and the
    # iliac wings (a value inside the range such bowel shows on clinical CT, not calibrated on a dataset)
    oral_contrast: bool = False
    # the patient lying turned about the head-feet axis by this many degrees (positive: the back turned toward the
    # patient's left, as ``roll.measure_roll`` counts it), applied to the built phantom: HU resampled bilinearly, the
    # truth labels by nearest neighbour (stair-steps the unturned truth has not)
    roll_deg: float = 0.0

    @property
    def aging(self) -> Aging | None:
        """The degenerative changes for the bone model, or None for a young spine (the default)."""
        if not (self.trabecular_hu or self.narrowed_discs or self.vacuum_discs or self.osteophyte_discs
                or self.wedge_fracture):
            return None
        return Aging(narrowed=tuple((d, self.disc_height_mm) for d in self.narrowed_discs),
                     wedge=(self.wedge_fracture, self.wedge_front) if self.wedge_fracture else None,
                     osteophytes=self.osteophyte_discs, vacuum=self.vacuum_discs,
                     sclerosis=self.narrowed_discs if self.endplate_sclerosis else ())

    @property
    def spacing(self) -> float:
        """Slice centre to slice centre (mm): ``spacing_mm``, or the thickness for contiguous slices."""
        return self.spacing_mm or self.slice_mm

    @property
    def field_mm(self) -> float:
        return self.fov_mm or (360.0 if self.region == "neck" else 500.0)

    @property
    def pixel_mm(self) -> float:
        return self.field_mm / self.rows


@dataclass(frozen=True)
class Anatomy:
    """A phantom on its canonical grid: ``[k, r, c]`` with k superior, r posterior, c left."""

    spec: AnatomySpec
    labels: NDArray[np.uint8]
    hu: NDArray[np.float32]
    vertebrae: NDArray[np.uint8]  # VerSe number of vertebra/sacrum voxels
    ribs: NDArray[np.uint8]  # VerSe number of the vertebra a rib voxel belongs to
    x: NDArray[np.float64]  # column centres (mm, LPS x)
    y: NDArray[np.float64]  # row centres (LPS y)
    z: NDArray[np.float64]  # slice centres (LPS z), increasing
    level_z: Mapping[str, float]  # vertebra name -> z of the middle of its body
    anchors: Mapping[str, object]
    bodies: Mapping[str, tuple[float, float, float, float, float]] = field(default_factory=dict)
    # vertebra name -> (x, y, z) of its body centre (LPS mm), half width and half depth (mm)

    def at_level(self, name: str) -> tuple[int, SliceAnatomy]:
        """The slice nearest the middle of vertebra ``name``'s body, and the truth's vertebral body there as the
        slice anatomy (as a reader-confirmed level gives it; rows toward the back, columns toward the left)."""
        bx, by, bz, hw, hd = self.bodies[name]
        px = self.spec.pixel_mm
        k = int(np.argmin(np.abs(self.z - bz)))
        return k, SliceAnatomy(((by - self.y[0]) / px, (bx - self.x[0]) / px), hw, hd)

    def labels_at(self, points: NDArray[np.float64]) -> NDArray[np.uint8]:
        """Truth labels at LPS points (..., 3), nearest voxel; 0 outside the phantom's grid."""
        px = self.spec.pixel_mm
        c = np.rint((points[..., 0] - self.x[0]) / px).astype(np.int64)
        r = np.rint((points[..., 1] - self.y[0]) / px).astype(np.int64)
        dz = self.z[1] - self.z[0] if len(self.z) > 1 else 1.0
        k = np.rint((points[..., 2] - self.z[0]) / dz).astype(np.int64)
        n = self.labels.shape
        ok = (c >= 0) & (c < n[2]) & (r >= 0) & (r < n[1]) & (k >= 0) & (k < n[0])
        out = np.zeros(points.shape[:-1], dtype=np.uint8)
        out[ok] = self.labels[k[ok], r[ok], c[ok]]
        return out


@dataclass(frozen=True)
class Geometry:
    position: str = "HFS"  # PatientPosition: HFS, HFP, FFS, FFP
    mirror_rows: bool = False  # row direction negated (pixel data flipped to keep anatomy at the same LPS)

    def directions(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(row direction, column direction) of ImageOrientationPatient."""
        if self.position not in ("HFS", "HFP", "FFS", "FFP"):
            raise ValueError(f"anatomical phantom: patient position {self.position!r} not supported")
        prone = self.position.endswith("P")
        feet = self.position.startswith("FF")
        # gantry x seen from the patient: head-first supine = +x, turned round (feet first) or over (prone) = -x
        rx = -1.0 if prone != feet else 1.0
        cy = -1.0 if prone else 1.0
        if self.mirror_rows:
            rx = -rx
        return np.array([rx, 0.0, 0.0]), np.array([0.0, cy, 0.0])


@dataclass
class SeriesTruth:
    """Truth aligned to the written series: index ``i`` is the i-th file (InstanceNumber i + 1)."""

    labels: NDArray[np.uint8]
    hu: NDArray[np.float32]  # as stored (integers)
    vertebrae: NDArray[np.uint8]
    ribs: NDArray[np.uint8]
    level_slices: dict[str, int]  # vertebra -> written index of the middle of its body
    level_z: Mapping[str, float]
    anchors: Mapping[str, object]
    positions: NDArray[np.float64]  # ImagePositionPatient per written slice
    row_direction: NDArray[np.float64]
    column_direction: NDArray[np.float64]
    pixel_mm: float
    slice_mm: float  # slice centre to slice centre (the spec's spacing; its thickness is ``spec.slice_mm``)
    geometry: Geometry
    files: list[Path] = field(default_factory=list)
    series_uid: str = ""
    study_uid: str = ""
    sop_uids: list[str] = field(default_factory=list)

    @property
    def pixel_area_mm2(self) -> float:
        return self.pixel_mm * self.pixel_mm

    def mask(self, *names: str) -> NDArray[np.bool_]:
        """Union of truth labels or composition categories (:data:`COMPOSITION`) as written."""
        ids: list[int] = []
        for n in names:
            ids += [LABELS[m] for m in COMPOSITION[n]] if n in COMPOSITION else [LABELS[n]]
        return np.isin(self.labels, ids)

    def area_cm2(self, name: str, i: int) -> float:
        return float(np.count_nonzero(self.mask(name)[i])) * self.pixel_area_mm2 / 100.0

    def mean_hu(self, name: str, i: int) -> float:
        m = self.mask(name)[i]
        return float(self.hu[i][m].mean()) if m.any() else float("nan")

    def index_to_lps(self, i: float, r: float, c: float) -> NDArray[np.float64]:
        i0 = int(round(i))
        return np.asarray(self.positions[i0] + c * self.pixel_mm * self.row_direction
                          + r * self.pixel_mm * self.column_direction)

    def centroid_lps(self, name: str) -> NDArray[np.float64]:
        ii, rr, cc = np.nonzero(self.mask(name))
        pts = (self.positions[ii] + (cc * self.pixel_mm)[:, None] * self.row_direction
               + (rr * self.pixel_mm)[:, None] * self.column_direction)
        return np.asarray(pts.mean(axis=0))


# ------------------------------------------------------------------------------------------------
# HU of each label: (non-contrast, contrast) mean and texture SD
_HU: Mapping[str, tuple[float, float, float]] = {
    "skin": (25, 25, 8), "sat": (-105, -105, 6), "vat": (-95, -95, 8), "imat": (-85, -85, 10),
    "liver": (58, 112, 5), "spleen": (48, 118, 5), "kidney": (32, 175, 6), "stomach": (12, 14, 6),
    "colon": (20, 22, 25), "small_bowel": (18, 60, 6), "bowel_gas": (-990, -990, 4), "aorta": (42, 190, 5),
    "ivc": (40, 130, 5), "lung": (-860, -860, 25), "ligament": (70, 72, 6), "airway": (-995, -995, 3),
    "thyroid": (95, 160, 6), "oesophagus": (38, 60, 5), "vessel_neck": (42, 220, 5),
    "larynx_cartilage": (180, 180, 60), "oral_soft_tissue": (40, 60, 6), "disc": (85, 90, 6),
    "canal_csf": (10, 10, 4), "cord": (35, 36, 4), "cortex": (750, 750, 80), "costal_cartilage": (120, 125, 20),
    "compact": (1150, 1150, 80), "table": (260, 260, 10), "deep_neck_fat": (-90, -90, 8),
    # psoas contacts (AnatomySpec.psoas_contacts): the third part of the duodenum (collapsed or fluid-filled,
    # wall and fluid averaged), a retroperitoneal lymph node, the ureter without excreted contrast
    "duodenum": (25, 45, 10), "lymph_node": (40, 65, 6), "ureter": (18, 22, 5),
}
# positive oral contrast (AnatomySpec.oral_contrast): mean and texture SD (contrast mixed with fluid and stool)
_ORAL: Mapping[str, tuple[float, float]] = {"stomach": (250.0, 20.0), "duodenum": (300.0, 20.0),
                                            "small_bowel": (300.0, 20.0), "colon": (300.0, 30.0)}
# arterial phase (contrast_phase="arterial"): the aorta opacified, the infrarenal IVC and its tributaries not yet
_ARTERIAL: Mapping[str, tuple[float, float]] = {"aorta": (280.0, 10.0), "iliac_artery": (280.0, 10.0),
                                                "ivc": (45.0, 5.0), "iliac_vein": (45.0, 5.0),
                                                "gonadal_vessel": (45.0, 5.0)}


def _superellipse(x: NDArray[np.float64], y: NDArray[np.float64], cx: float, cy: float, a: float, b: float,
                  p_front: float = 2.1, p_back: float = 2.6, b_back: float | None = None) -> NDArray[np.bool_]:
    """Trunk-like outline: a superellipse, boxier behind (``p_back``) than in front."""
    out = np.zeros(x.shape, dtype=bool)
    bb = b if b_back is None else b_back
    if a <= 0 or b <= 0 or bb <= 0:
        return out
    xs, ys = x[0], y[:, 0]
    ix = np.searchsorted(xs, [cx - a, cx + a])
    for lo, hi, p, bh in ((cy - b, cy, p_front, b), (cy, cy + bb, p_back, bb)):
        iy = np.searchsorted(ys, [lo, hi])
        sub = (slice(int(iy[0]), int(iy[1])), slice(int(ix[0]), int(ix[1])))
        dx = np.abs(x[sub] - cx) / a
        dy = np.abs(y[sub] - cy) / bh
        out[sub] = dx**p + dy**p <= 1.0
    return out


def _ell(x: NDArray[np.float64], y: NDArray[np.float64], cx: float, cy: float, a: float, b: float,
         angle_deg: float = 0.0) -> NDArray[np.bool_]:
    """Filled ellipse on the meshgrid ``x``, ``y`` (evaluated only inside its bounding box)."""
    out = np.zeros(x.shape, dtype=bool)
    if a <= 0 or b <= 0:
        return out
    r = max(a, b)
    xs, ys = x[0], y[:, 0]
    ix = np.searchsorted(xs, [cx - r, cx + r])
    iy = np.searchsorted(ys, [cy - r, cy + r])
    if ix[0] >= ix[1] or iy[0] >= iy[1]:
        return out
    sub = (slice(int(iy[0]), int(iy[1])), slice(int(ix[0]), int(ix[1])))
    t = np.deg2rad(angle_deg)
    dx, dy = x[sub] - cx, y[sub] - cy
    u = dx * np.cos(t) + dy * np.sin(t)
    v = -dx * np.sin(t) + dy * np.cos(t)
    out[sub] = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    return out


def _ell_boundary(a: float, b: float, angle_deg: float, n: int = 180) -> NDArray[np.float64]:
    """Points on the outline of :func:`_ell`'s ellipse (centred at 0), (n, 2) as x, y."""
    s = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    t = np.deg2rad(angle_deg)
    u, v = a * np.cos(s), b * np.sin(s)
    return np.stack([u * np.cos(t) - v * np.sin(t), u * np.sin(t) + v * np.cos(t)], axis=1)


def _in_ell(pts: NDArray[np.float64], cx: float, cy: float, a: float, b: float, angle_deg: float) -> NDArray[np.bool_]:
    t = np.deg2rad(angle_deg)
    dx, dy = pts[:, 0] - cx, pts[:, 1] - cy
    u = dx * np.cos(t) + dy * np.sin(t)
    v = -dx * np.sin(t) + dy * np.cos(t)
    return np.asarray((u / a) ** 2 + (v / b) ** 2 <= 1.0)


def _touching(ps: tuple[float, float, float, float, float], side: float, phi_deg: float, a: float, b: float,
              angle_deg: float = 0.0, overlap_mm: float = 1.5) -> tuple[float, float]:
    """Centre of an ellipse (semi-axes ``a``, ``b``, ``angle_deg`` as :func:`_ell`) lying against the psoas ellipse
    ``ps`` (centre x, y, semi-axes, angle) in the direction ``phi_deg`` from the psoas centre (0 = anterior, 90 =
    lateral on ``side``, negative = medial), overlapping it by ``overlap_mm`` (the psoas is painted over the overlap,
    or the contact only where the psoas is not: they touch with no fat plane)."""
    cx, cy, rx, ry, pang = ps
    ph = np.deg2rad(phi_deg)
    d = np.array([side * np.sin(ph), -np.cos(ph)])
    pb = _ell_boundary(rx, ry, pang) + np.array([cx, cy])
    cb = _ell_boundary(a, b, angle_deg)
    lo, hi = 0.0, rx + ry + a + b + 5.0
    for _ in range(40):  # the smallest distance at which the two outlines no longer overlap
        mid = 0.5 * (lo + hi)
        ex, ey = cx + mid * d[0], cy + mid * d[1]
        if _in_ell(cb + np.array([ex, ey]), cx, cy, rx, ry, pang).any() or _in_ell(pb, ex, ey, a, b, angle_deg).any():
            lo = mid
        else:
            hi = mid
    t = hi - overlap_mm
    return float(cx + t * d[0]), float(cy + t * d[1])


def _near_polyline(x: NDArray[np.float64], y: NDArray[np.float64], pts: NDArray[np.float64],
                   r: float) -> NDArray[np.bool_]:
    """Points within ``r`` of the polyline ``pts`` (n, 2): a tube lying in the plane, round ends."""
    out = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:], strict=True):
        dx, dy = x1 - x0, y1 - y0
        u = np.clip(((x - x0) * dx + (y - y0) * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
        out |= (x - x0 - u * dx) ** 2 + (y - y0 - u * dy) ** 2 <= r * r
    return out


def _smooth_interp(zq: float, zs: NDArray[np.float64], vs: NDArray[np.float64]) -> float:
    return float(np.interp(zq, zs, vs))


@dataclass(frozen=True)
class _Column:
    """Spine quantities as smooth functions of z (interpolated between vertebrae)."""

    z: NDArray[np.float64]
    bx: NDArray[np.float64]
    by: NDArray[np.float64]
    hw: NDArray[np.float64]
    hd: NDArray[np.float64]
    tp_x: NDArray[np.float64]  # half span of the transverse processes
    tp_y: NDArray[np.float64]
    sp_y: NDArray[np.float64]

    def at(self, z: float) -> dict[str, float]:
        return {k: _smooth_interp(z, self.z, getattr(self, k)) for k in ("bx", "by", "hw", "hd", "tp_x", "tp_y",
                                                                          "sp_y")}


def _column(spine: SpineModel, shift: NDArray[np.float64]) -> _Column:
    vs = [v for v in spine.ordered()]
    rows = []
    for v in vs:
        c = np.asarray(v.body_centre) + shift
        if v.vid == SACRUM and spine.sacrum is not None:
            s = spine.sacrum
            top = np.asarray(s.top) + shift
            slope = np.deg2rad(s.slope_deg)
            axis = np.array([0.0, np.sin(slope), -np.cos(slope)])
            for u in (14.0, 40.0, 65.0, 90.0):
                p = top + u * axis + np.array([0.0, 0.0035 * u**2 * -np.cos(slope), 0.0])
                t = u / s.length
                rows.append((p[2], p[0], p[1], s.half_width * (1 - 0.55 * t), s.half_depth * (1 - 0.55 * t),
                             s.ala_half_width * (1 - 0.5 * t), p[1] + s.half_depth, p[1] + s.half_depth + 22.0))
            continue
        tpx = 0.5 * (v.tp_left[0] - v.tp_right[0])
        tpy = 0.5 * (v.tp_left[1] + v.tp_right[1]) + shift[1]
        rows.append((c[2], c[0], c[1], v.half_width, v.half_depth, tpx, tpy, v.spinous_y + shift[1]))
    a = np.array(sorted(rows, key=lambda r: r[0]), dtype=np.float64)
    return _Column(z=a[:, 0], bx=a[:, 1], by=a[:, 2], hw=a[:, 3], hd=a[:, 4], tp_x=a[:, 5], tp_y=a[:, 6],
                   sp_y=a[:, 7])


def _tube(points: NDArray[np.float64], radius: NDArray[np.float64], x: NDArray[np.float64],
          y: NDArray[np.float64], z: NDArray[np.float64]) -> tuple[tuple[slice, slice, slice], NDArray[np.float64],
                                                                    NDArray[np.int64]]:
    """Rasterise a tube (polyline ``points`` (n, 3) of x, y, z with per-point radius) on a grid.

    Returns the tube's bounding box on the grid (slices into [z, y, x]) and, inside it, the
    distance to the centre line over the local radius (inside where <= 1) and the index of the
    nearest centre-line point (-1 far away), via a KD-tree on the centre line.
    """
    from scipy.spatial import cKDTree

    rmax = float(radius.max())
    lo, hi = points.min(0) - rmax, points.max(0) + rmax

    def rng(a: NDArray[np.float64], lo_: float, hi_: float) -> slice:
        i = np.nonzero((a >= lo_) & (a <= hi_))[0]
        return slice(int(i[0]), int(i[-1]) + 1) if len(i) else slice(0, 0)

    box = (rng(z, lo[2], hi[2]), rng(y, lo[1], hi[1]), rng(x, lo[0], hi[0]))
    zz, yy, xx = np.meshgrid(z[box[0]], y[box[1]], x[box[2]], indexing="ij")
    if zz.size == 0:
        return box, np.full(zz.shape, np.inf), np.full(zz.shape, -1, dtype=np.int64)
    q = np.stack([xx.ravel(), yy.ravel(), zz.ravel()], axis=1)
    d, i = cKDTree(points).query(q, distance_upper_bound=rmax)
    ok = np.isfinite(d)
    ii = np.minimum(i, len(radius) - 1)
    rel = np.where(ok, d / radius[ii], np.inf).reshape(zz.shape)
    return box, rel, np.where(ok, i, -1).reshape(zz.shape)


def _rib_path(col: _Column, vz: float, side: float, which: int, trunk: dict[str, float]) -> tuple[
        NDArray[np.float64], NDArray[np.float64], int]:
    """Centre line of the rib of thoracic vertebra ``which`` (1-13) on ``side`` (+1 left)."""
    c = col.at(vz)
    head = np.array([c["bx"] + side * (c["hw"] + 2.0), c["by"] + 0.55 * c["hd"], vz + 4.0])
    tub = np.array([c["bx"] + side * max(c["tp_x"] - 3.0, c["hw"] + 8.0), c["tp_y"] - 2.0, vz + 2.0])
    # around the trunk inside the muscular wall (between the fascia and the cavity outline, the
    # same superellipses the trunk is painted with): angle from the wall centre, posterior = +90 deg
    fy = trunk["yc"] + 0.5 * (trunk["sat_f"] - trunk["sat_b"])
    fa, fb = trunk["a"] - trunk["sat_s"], trunk["b"] - 0.5 * (trunk["sat_f"] + trunk["sat_b"])
    wall = trunk.get("wall", 10.0)
    a_in, b_in, yc = fa - 0.5 * wall, fb - 6.0, fy + 4.0
    b_back = trunk.get("cav_b_back", b_in) + 6.0
    th0 = np.degrees(np.arctan2(tub[1] - yc, side * (tub[0] - c["bx"])))
    end = {13: 55.0, 12: 35.0, 11: -10.0, 10: -50.0, 9: -62.0, 8: -70.0, 7: -78.0}.get(which, -82.0)
    drop = {13: 12.0, 12: 20.0, 11: 40.0, 10: 70.0, 9: 75.0, 8: 75.0, 7: 70.0, 1: 25.0}.get(which, 60.0)
    n = 160
    t = np.linspace(0.0, 1.0, n)
    th = np.radians(th0 + (end - th0) * t)
    # follow an ellipse through the tubercle that widens to the wall
    rr = 1.0 - 0.12 * (1 - t) ** 3
    p = np.where(np.sin(th) > 0, 2.4, 2.0)
    px = c["bx"] + side * a_in * rr * np.sign(np.cos(th)) * np.abs(np.cos(th)) ** (2.0 / p)
    py = yc + np.where(np.sin(th) > 0, b_back, b_in) * rr * np.sign(np.sin(th)) * np.abs(np.sin(th)) ** (2.0 / p)
    pz = tub[2] - drop * (3 * t**2 - 2 * t**3)
    path = np.concatenate([np.linspace(head, tub, 12), np.stack([px, py, pz], axis=1)])
    # start the arc exactly at the tubercle
    path[12:, 0] += (tub[0] - path[12, 0]) * np.exp(-8 * t)
    path[12:, 1] += (tub[1] - path[12, 1]) * np.exp(-8 * t)
    radius = np.full(len(path), 5.0)
    radius[:12] = 5.5
    cart = int(len(path) - 0.3 * n) if which <= 10 else len(path)
    return path, radius, cart


class _Builder:
    """Paints one phantom; see :func:`make_anatomy`."""

    def __init__(self, spec: AnatomySpec) -> None:
        self.spec = spec
        self.hab = HABITUS[spec.habitus]
        self.rng = np.random.default_rng(spec.seed)
        neck = spec.region == "neck"
        self.neck = neck
        src = spec.spine or ("gl003" if neck else "verse004")
        self.spine = load_spine(src, not neck, spec.sacralised_l5, spec.aging)
        # world frame: spine midline at x = 0; body centre of L3 (or C4) at y = 0; z kept from the source
        ref = self.spine.vertebrae.get(NUMBERS["C4" if neck else "L3"]) or self.spine.ordered()[len(
            self.spine.vertebrae) // 2]
        self.shift = np.array([-np.median([v.body_centre[0] for v in self.spine.ordered()]), -ref.body_centre[1],
                               0.0])
        self.col = _column(self.spine, self.shift)
        self.level_z = {v.name: float(v.body_centre[2]) for v in self.spine.ordered() if v.vid != SACRUM}
        if self.spine.sacrum is not None:
            s = self.spine.sacrum
            self.level_z["S1"] = float(s.top[2] - 14.0 * np.cos(np.deg2rad(s.slope_deg)))
        top = spec.top or ("C1" if neck else "T10")
        bottom = spec.bottom or ("T1" if neck else "S1")
        for lv in (top, bottom):
            if lv not in self.level_z:
                raise ValueError(f"anatomical phantom: level {lv} is not in spine {src} "
                                 f"({', '.join(sorted(self.level_z, key=lambda n: order_key(NUMBERS[n])))})")
        vt, vb = self.spine.vertebrae[NUMBERS[top]], self.spine.vertebrae[NUMBERS[bottom]]
        z_hi = vt.body_z[1] + 8.0
        z_lo = (self.level_z["S1"] - 25.0) if bottom == "S1" else vb.body_z[0] - 8.0
        # the slice planes sit on the bone model's 1 mm grid (which is sampled by nearest neighbour), so the
        # rendered bones lie where the truth (measured on that grid) says, not up to half a millimetre off
        oz = float(self.spine.origin[2] + self.shift[2])
        z_lo = oz + float(np.round(z_lo - oz))
        n = max(2, int(round((z_hi - z_lo) / spec.spacing)) + 1)
        self.z: NDArray[np.float64] = np.asarray(z_lo + spec.spacing * np.arange(n), dtype=np.float64)
        px = spec.pixel_mm
        c = np.asarray((np.arange(spec.rows) - (spec.rows - 1) / 2.0) * px, dtype=np.float64)
        self.x: NDArray[np.float64] = c.copy()
        self.y: NDArray[np.float64] = c + (10.0 if not neck else 5.0)
        self.X, self.Y = np.meshgrid(self.x, self.y)
        # sub-planes across the slice thickness (odd count, the middle one carries the labels); with overlapping
        # slices (spacing under the thickness) neighbouring slices' sub-planes interleave: ``zf`` is not sorted.
        # At most 1 mm apart, the finest structure along z (the VerSe masks' 1 mm voxels, the 1 mm cortical
        # endplates): a real slice integrates its whole slab, and sub-planes 1.67 mm apart (5 mm slices) hit a 1 mm
        # endplate or missed it, so an osteoporotic body's endplates came and went from slice to slice
        nsub = max(1, int(np.ceil(spec.slice_mm / 1.0)))
        nsub += 1 - nsub % 2
        self.nsub = nsub
        offs = (np.arange(nsub) - (nsub - 1) / 2.0) * (spec.slice_mm / nsub)
        self.zf: NDArray[np.float64] = np.asarray((self.z[:, None] + offs[None, :]).ravel(), dtype=np.float64)
        self.anchors: dict[str, object] = {}
        self.endplate: NDArray[np.uint8] | None = None
        self.gas: NDArray[np.bool_] | None = None

    # -- per-z trunk geometry -------------------------------------------------------------------
    def trunk(self, z: float) -> dict[str, float]:
        h, c = self.hab, self.col.at(z)
        zl = self.level_z
        if self.neck:
            return self._neck_trunk(z, c)
        z_l2, z_s1 = zl.get("L2", z), zl.get("S1", z - 200)
        z12 = zl.get("T12", zl.get("L1", z) + 28.0)
        z_t11 = zl.get("T11", z12 + 28.0)
        f = 1.0
        if z > z_l2:  # rib cage widens the upper abdomen
            f = 1.0 + 0.07 * min(1.0, (z - z_l2) / max(1.0, z_t11 - z_l2))
        elif z < z_l2:  # hips
            f = 1.0 + 0.10 * min(1.0, (z_l2 - z) / max(1.0, z_l2 - z_s1))
        a = h.half_width * f
        b = h.half_depth * (1.0 - 0.04 * (f - 1.0) / 0.1)
        y_back = c["sp_y"] + 9.0 + h.sat_back
        yc = y_back - b
        wall_f = 1.0
        # inside the rib cage the cavity (and the lung bases) stop in front of the ribs, which run
        # back from the transverse processes: its posterior half is shallower above L1
        fy = yc + 0.5 * (h.sat_front - h.sat_back)
        fb = b - 0.5 * (h.sat_front + h.sat_back)
        cav_b = fb - 11.0
        z_l1 = zl.get("L1", z12 - 28.0)
        ramp = float(np.clip((z - (z_l1 - 10.0)) / 30.0, 0.0, 1.0))
        cav_bb = cav_b + ramp * (min(cav_b, c["tp_y"] + 4.0 - (fy + 4.0)) - cav_b)
        return {"a": a, "b": b, "yc": yc, "xc": 0.0, "sat_f": h.sat_front, "sat_s": h.sat_side, "sat_b": h.sat_back,
                "wall": h.wall * wall_f, "cav_b_back": cav_bb,
                "a_in": a - h.sat_side - h.wall * wall_f, "b_in": b - 0.5 * (h.sat_front + h.sat_back) - 10.0,
                "yc_in": yc + 0.5 * (h.sat_front - h.sat_back) + 2.0, **c}

    def _neck_trunk(self, z: float, c: dict[str, float]) -> dict[str, float]:
        h = self.hab
        zl = self.level_z
        s = {"thin": 0.9, "average": 1.0, "obese": 1.18}[self.spec.habitus]
        z_c2, z_c7 = zl.get("C2", z), zl.get("C7", z - 100)
        sat = {"thin": 3.0, "average": 6.0, "obese": 13.0}[self.spec.habitus]
        if z > z_c2:  # head: face and occiput
            a, front = 72.0 * s, c["by"] - 95.0 * s
        elif z > z_c7:
            a, front = 60.0 * s, c["by"] - 72.0 * s
        else:  # shoulders
            t = min(1.0, (z_c7 - z) / 35.0)
            a, front = (60.0 + 110.0 * t) * s, c["by"] - (72.0 - 6.0 * t) * s
        back = c["sp_y"] + 10.0 + 1.6 * sat  # skin behind the spinous processes (nuchal fat)
        b, yc = 0.5 * (back - front), 0.5 * (back + front)
        return {"a": a, "b": b, "yc": yc, "xc": 0.0, "sat_f": sat, "sat_s": sat,
                "sat_b": sat * 1.6, "a_in": a - sat - 3.0, "b_in": b - sat - 3.0, "yc_in": yc,
                **c, "neck_scale": s, "habitus_sd": h.noise_sd}

    # -- painting ---------------------------------------------------------------------------------
    def build(self) -> Anatomy:
        spec = self.spec
        nz = len(self.zf)
        shape = (nz, spec.rows, spec.rows)
        lab: NDArray[np.uint8] = np.zeros(shape, dtype=np.uint8)
        self.tubes = self._tubes()
        for k, z in enumerate(self.zf):
            lab[k] = self._plane(k, float(z))
        vert, bone_lab, disc, canal, cord = self._spine_on_grid()
        # bones and the canal over soft tissue (muscles attach to them without a gap)
        ribs = np.asarray(self.tubes["rib_owner"], dtype=np.uint8)
        cart = np.asarray(self.tubes["rib_cart"], dtype=bool)
        for name, m in (("disc", disc), ("canal_csf", canal), ("cord", cord)):
            lab[m] = LABELS[name]
        lab[bone_lab > 0] = bone_lab[bone_lab > 0]
        rib = ribs > 0
        lab[rib] = np.where(cart[rib], LABELS["costal_cartilage"], LABELS["rib"])
        self._pelvis(lab)
        self._arms_and_table(lab)
        hu = self._hu(lab, vert)
        # thick slices: HU averaged over the sub-planes, labels from the middle one
        n, ns = len(self.z), self.nsub
        hu = hu.reshape(n, ns, spec.rows, spec.rows).mean(axis=1)
        mid = (ns - 1) // 2
        lab = lab.reshape(n, ns, spec.rows, spec.rows)[:, mid].copy()
        vert_mid = vert.reshape(n, ns, spec.rows, spec.rows)[:, mid].copy()
        ribs_mid = ribs.reshape(n, ns, spec.rows, spec.rows)[:, mid].copy()
        hu = self._scanner(hu, lab)
        self.anchors.update(self._anchor_facts(vert_mid, ribs_mid))
        bodies = {}
        for v in self.spine.ordered():
            name = "S1" if v.vid == SACRUM else v.name
            if name in self.level_z:
                c = np.asarray(v.body_centre) + self.shift
                bodies[name] = (float(c[0]), float(c[1]), float(self.level_z[name]), float(v.half_width),
                                float(v.half_depth))
        return Anatomy(spec=spec, labels=lab, hu=hu.astype(np.float32), vertebrae=vert_mid, ribs=ribs_mid,
                       x=self.x, y=self.y, z=self.z, level_z=dict(self.level_z), anchors=dict(self.anchors),
                       bodies=bodies)

    def _spine_on_grid(self) -> tuple[NDArray[np.uint8], NDArray[np.uint8], NDArray[np.bool_], NDArray[np.bool_],
                                      NDArray[np.bool_]]:
        s = self.spine
        o = np.asarray(s.origin) + self.shift
        iz = np.rint(self.zf - o[2]).astype(np.int64)
        iy = np.rint(self.y - o[1]).astype(np.int64)
        ix = np.rint(self.x - o[0]).astype(np.int64)
        nz, ny, nx = s.shape
        okz, oky, okx = (iz >= 0) & (iz < nz), (iy >= 0) & (iy < ny), (ix >= 0) & (ix < nx)
        shape = (len(self.zf), len(self.y), len(self.x))

        def take(a: NDArray[np.generic]) -> NDArray[np.generic]:
            out = np.zeros(shape, dtype=a.dtype)
            sub = a[np.ix_(iz[okz], iy[oky], ix[okx])]
            out[np.ix_(np.nonzero(okz)[0], np.nonzero(oky)[0], np.nonzero(okx)[0])] = sub
            return out

        vert = take(s.vid).astype(np.uint8)
        bone = np.zeros(shape, dtype=np.uint8)
        bone[vert > 0] = LABELS["vertebra"]
        bone[vert == SACRUM] = LABELS["sacrum"]
        # aged spines: cortical (and sclerotic) endplates and disc gas, painted as HU over the labels
        self.endplate = take(s.endplate).astype(np.uint8) if s.endplate is not None else None
        self.gas = take(s.gas).astype(bool) if s.gas is not None else None
        return (vert, bone, take(s.disc).astype(bool) & (vert == 0), take(s.canal).astype(bool) & (vert == 0),
                take(s.cord).astype(bool) & (vert == 0))

    def _tubes(self) -> dict[str, NDArray[np.generic]]:
        """Ribs, transverse colon and small-bowel loops rasterised on the fine grid."""
        shape = (len(self.zf), len(self.y), len(self.x))
        owner: NDArray[np.uint8] = np.zeros(shape, dtype=np.uint8)
        cart: NDArray[np.bool_] = np.zeros(shape, dtype=bool)
        bowel: NDArray[np.uint8] = np.zeros(shape, dtype=np.uint8)
        # ribs: thoracic vertebrae of the spine, extrapolated upward where the spine stops
        pairs = self.spec.rib_pairs
        owners = [NUMBERS[f"T{i}"] for i in range(1, 13)][: min(pairs, 12)]
        if pairs >= 13:
            owners.append(NUMBERS["L1"])
        known = {v.vid: v.body_centre[2] for v in self.spine.ordered()}
        present = sorted(v for v in known if 8 <= v <= 20)
        if present:
            zs = np.array([known[v] for v in present])
            step = float(np.median(np.diff(zs))) if len(zs) > 1 else -25.0
            zmax = float(self.zf.max())
            for v in owners:
                if v in known:
                    vz = known[v]
                else:
                    vz = known[present[0]] - step * (present[0] - v) if v < present[0] else None  # type: ignore[assignment]
                    if vz is None:
                        continue
                if vz - 120.0 > zmax:
                    continue
                which = v - 7 if v <= 19 else 13
                trunk = self.trunk(min(vz, zmax))
                for side in (1.0, -1.0):
                    path, rad, ci = _rib_path(self.col, vz, side, which, trunk)
                    box, rel, idx = _tube(path, rad, self.x, self.y, self.zf)
                    inside = rel <= 1.0
                    ob = owner[box]
                    ob[inside & (ob == 0)] = v
                    cart[box] |= inside & (idx >= ci)
        if not self.neck:
            bowel = self._bowel(shape)
        return {"rib_owner": owner, "rib_cart": cart, "bowel": bowel}

    def _bowel(self, shape: tuple[int, ...]) -> NDArray[np.uint8]:
        """Small-bowel loops (wall, fluid, a gas cap anterior) and the transverse colon."""
        out: NDArray[np.uint8] = np.zeros(shape, dtype=np.uint8)
        zl = self.level_z
        z_top = zl.get("L2", zl.get("L1", 0.0))
        z_bot = zl.get("S1", z_top - 120.0) - 15.0
        rng = self.rng
        loops = {"thin": 11, "average": 9, "obese": 8}[self.spec.habitus]
        for j in range(loops):
            zc = rng.uniform(z_bot + 15, z_top - 5)
            tr = self.trunk(zc)
            x0 = rng.uniform(-0.55, 0.55) * tr["a_in"]
            # about half of the loops lie against the anterior wall
            front = tr["yc_in"] - tr["b_in"]
            y0 = front + (16.0 if j % 2 == 0 else rng.uniform(30.0, 0.55 * tr["b_in"]))
            t = np.linspace(0, 2 * np.pi, 120)
            ax, ay, az = rng.uniform(25, 45), rng.uniform(6, 14), rng.uniform(15, 30)
            ph = rng.uniform(0, 2 * np.pi, 3)
            pts = np.stack([x0 + ax * np.sin(t + ph[0]), y0 + ay * np.sin(2 * t + ph[1]),
                            zc + az * np.sin(t + ph[2]) * np.cos(t)], axis=1)
            r = rng.uniform(9.0, 13.0)
            box, rel, idx = _tube(pts, np.full(len(pts), r), self.x, self.y, self.zf)
            inside = rel <= 1.0
            gas_frac = rng.choice([0.0, 0.0, 0.3, 0.5])
            lumen = rel <= (r - 2.0) / r
            yy = self.y[box[1]][None, :, None]
            cy = np.where(idx >= 0, pts[np.maximum(idx, 0), 1], 0.0)
            gas = lumen & (yy < cy - r * (1 - 2 * gas_frac)) if gas_frac > 0 else np.zeros_like(lumen)
            ob = out[box]
            new = inside & (ob == 0)
            ob[new] = LABELS["small_bowel"]
            ob[new & gas] = LABELS["bowel_gas"]
        # transverse colon across the front at L1-L2, against the anterior wall
        zc = zl.get("L2", z_top) + 12.0
        tr = self.trunk(zc)
        t = np.linspace(-1, 1, 80)
        pts = np.stack([t * tr["a_in"] * 0.75, (tr["yc_in"] - tr["b_in"]) + 22.0 + 10 * t**2,
                        zc + 8 * np.sin(3 * t)], axis=1)
        box, rel, idx = _tube(pts, np.full(len(pts), 20.0), self.x, self.y, self.zf)
        gasm = (rel <= 0.85) & (self.y[box[1]][None, :, None] < np.where(idx >= 0, pts[np.maximum(idx, 0), 1], 0)
                                 + 4.0)
        ob = out[box]
        ob[rel <= 1.0] = LABELS["colon"]
        ob[gasm] = LABELS["bowel_gas"]
        return out

    def _plane(self, k: int, z: float) -> NDArray[np.uint8]:
        return self._neck_plane(k, z) if self.neck else self._abdomen_plane(k, z)

    def _abdomen_plane(self, k: int, z: float) -> NDArray[np.uint8]:
        L, h = LABELS, self.hab
        X, Y = self.X, self.Y
        t = self.trunk(z)
        lab = np.zeros(X.shape, dtype=np.uint8)
        body = _superellipse(X, Y, 0.0, t["yc"], t["a"], t["b"])
        lab[body] = L["skin"]
        inner_skin = _superellipse(X, Y, 0.0, t["yc"], t["a"] - 2.0, t["b"] - 2.0)
        lab[inner_skin] = L["sat"]
        sb, sf, ss = t["sat_b"], t["sat_f"], t["sat_s"]
        fy = t["yc"] + 0.5 * (sf - sb)
        fa, fb = t["a"] - ss, t["b"] - 0.5 * (sf + sb)
        fascia = _superellipse(X, Y, 0.0, fy, fa, fb)
        left = X > 0
        lab[fascia & left] = L["wall_left"]
        lab[fascia & ~left] = L["wall_right"]
        # the cavity stops in front of the transverse processes next to the spine; farther out it
        # reaches back to the posterolateral wall (posterior pararenal fat)
        cav = _superellipse(X, Y, 0.0, fy + 4.0, fa - h.wall, fb - 11.0, 2.0, 2.4, t["cav_b_back"]) & ~(
            (Y > t["tp_y"] - 2.0) & _ell(X, Y, t["bx"], t["tp_y"] + 10.0, t["tp_x"] + 50.0, 60.0))
        # rectus in front: the band in front of the cavity within 75 mm of the midline
        rect = fascia & ~cav & (Y < fy - 0.45 * fb) & (np.abs(X) < 75.0 * h.muscle_scale)
        lab[rect & left] = L["rectus_left"]
        lab[rect & ~left] = L["rectus_right"]
        lab[cav] = L["vat"]
        # a thin fat plane between the lateral wall layers (external oblique / internal oblique)
        if self.spec.habitus != "thin":
            mid_wall = _superellipse(X, Y, 0.0, fy + 2.0, fa - 0.4 * h.wall, fb - 5.0, 2.0, 2.4)
            ring = mid_wall & ~_superellipse(X, Y, 0.0, fy + 2.0, fa - 0.4 * h.wall - 1.6, fb - 6.6, 2.0, 2.4)
            lab[ring & np.isin(lab, (L["wall_left"], L["wall_right"])) & (np.abs(X) > 80)] = L["imat"]
        self._organs(lab, k, z, t, cav)
        self._back_muscles(lab, z, t, fascia)
        self._vessels(lab, z, t)
        if self.spec.psoas_contacts:
            self._contacts(lab, z, t)
        return lab

    def _organs(self, lab: NDArray[np.uint8], k: int, z: float, t: dict[str, float], cav: NDArray[np.bool_]
                ) -> None:
        """The organs on sub-plane ``k`` (at ``z``) of ``zf``."""
        L, zl, X, Y = LABELS, self.level_z, self.X, self.Y
        z12 = zl.get("T12", zl.get("L1", z) + 28.0)
        z_l1 = zl.get("L1", z12 - 28.0)
        z_l2 = zl.get("L2", z_l1 - 30.0)
        z_l3 = zl.get("L3", z_l2 - 32.0)
        a, b, yc = t["a_in"], t["b_in"], t["yc_in"]
        bowel = self.tubes["bowel"][k] if "bowel" in self.tubes else None
        # liver: right upper quadrant, against the right and anterior wall, tapering to a tip at L2-L3
        s = np.clip((z - (z_l3 - 5.0)) / (z12 + 40.0 - z_l3), 0.0, 1.0)
        if s > 0:
            liver = cav & _ell(X, Y, -a * (0.95 - 0.45 * s), yc - 0.1 * b, a * (0.25 + 0.75 * s), b * (0.45 + 0.8 * s))
            liver &= X < 25.0 + 60.0 * s
            lab[liver] = L["liver"]
        # spleen: left posterolateral, against the wall, T10-L1
        s = np.clip((z - (z_l1 - 10.0)) / 70.0, 0.0, 1.0)
        if s > 0:
            sp = cav & _ell(X, Y, a * 0.78, yc + 0.35 * b, 30.0 + 22 * s, 40.0 + 30 * s, -35.0)
            lab[sp] = L["spleen"]
        # stomach: left upper quadrant, anterior, gas in front
        s = np.clip((z - (z_l1 - 20.0)) / 60.0, 0.0, 1.0)
        if s > 0:
            st = cav & _ell(X, Y, a * 0.35, yc - 0.45 * b, 35.0 + 25 * s, 28.0 + 14 * s, 20.0) & (lab == L["vat"])
            lab[st] = L["stomach"]
            lab[st & (Y < yc - 0.45 * b - 8.0)] = L["bowel_gas"]
        # lung bases in the posterior costophrenic recesses, with the diaphragm around them
        s = np.clip((z - z12) / 60.0, 0.0, 1.0)
        if s > 0:
            lung = cav & (_ell(X, Y, a * 0.62, yc + b * 0.75, a * (0.25 + 0.2 * s), b * (0.22 + 0.3 * s))
                          | _ell(X, Y, -a * 0.62, yc + b * 0.75, a * (0.25 + 0.2 * s), b * (0.22 + 0.3 * s)))
            ring = ndimage.binary_dilation(lung, iterations=max(1, int(round(4.0 / self.spec.pixel_mm)))) & cav & ~lung
            lab[ring] = L["diaphragm"]
            lab[lung] = L["lung"]
        # kidneys: T12-L3, left higher, lateral to psoas, in front of quadratus lumborum (muscles
        # are painted after them, so they touch without a fat plane)
        c = t
        low = "kidney" in self.spec.psoas_contacts
        pso = self._psoas_at(z, c) if low else {}
        for side, name, zc in ((1.0, "kidney_left", 0.5 * (z12 + z_l2)), (-1.0, "kidney_right",
                                                                           0.5 * (z12 + z_l2) - 15.0)):
            if low:  # lower poles at L3 (the right one lower), the left about a centimetre higher
                zc = z_l3 + (45.0 if side > 0 else 36.0)
            dz = (z - zc) / 55.0
            if abs(dz) < 1.0:
                f = np.sqrt(1 - dz * dz)
                cx = c["bx"] + side * (c["hw"] + 52.0 + 6.0 * dz)
                cy = c["tp_y"] - 22.0 + 6.0 * dz
                if low and pso:
                    # the lower pole's medial border on the psoas' lateral edge, no fat plane (the psoas and
                    # quadratus are painted over the overlap); blended in over 40 mm below the psoas' origin
                    tx, ty = _touching(pso[side], side, 75.0, 30.0 * f, 24.0 * f, side * 35.0, 2.5)
                    w = float(np.clip((z12 + 5.0 - z) / 40.0, 0.0, 1.0))
                    cx, cy = cx + w * (tx - cx), cy + w * (ty - cy)
                kid = cav & _ell(X, Y, cx, cy, 30.0 * f, 24.0 * f, side * 35.0)
                lab[kid] = L[name]
        # colon: ascending (right) and descending (left) against the lateral wall
        for side, ztop in ((-1.0, z_l2 - 10.0), (1.0, z_l1 + 30.0)):
            if z < ztop:
                cx = side * (a - 18.0)
                colon = cav & _ell(X, Y, cx, yc + 0.1 * b, 19.0, 22.0) & (lab == L["vat"])
                lab[colon] = L["colon"]
                lab[colon & (Y < yc + 0.1 * b - 6.0)] = L["bowel_gas"]
        if bowel is not None:
            m = (bowel > 0) & cav & (lab == L["vat"])
            lab[m] = bowel[m]

    def _back_muscles(self, lab: NDArray[np.uint8], z: float, t: dict[str, float], fascia: NDArray[np.bool_]) -> None:
        L, zl, X, Y, h = LABELS, self.level_z, self.X, self.Y, self.hab
        c = t
        ms = h.muscle_scale
        z12 = zl.get("T12", zl.get("L1", z) + 28.0)
        z_l1 = zl.get("L1", z12 - 28.0)
        z_l4 = zl.get("L4", z_l1 - 95.0)
        crest = self.crest_z()
        lumbar_t = np.clip((z12 - z) / max(1.0, z12 - z_l4), 0.0, 1.0)
        # paraspinal compartment (erector spinae + multifidus) behind the transverse processes
        xw = (48.0 + 24.0 * lumbar_t) * ms
        if z < crest - 30:
            xw = 42.0 * ms
        y_front = c["tp_y"] - 3.0
        back = fascia & (Y >= y_front)
        for side, name in ((1.0, "erector_left"), (-1.0, "erector_right")):
            cx = c["bx"] + side * (xw / 2 + 4.0)
            er = back & _ell(X, Y, cx, 0.5 * (y_front + c["sp_y"] + 14.0) + 4.0, xw / 2 + 6.0,
                             0.5 * (c["sp_y"] + 14.0 - y_front) + 14.0) & (side * (X - c["bx"]) > 1.5)
            lab[er] = L[name]
        # supraspinous and interspinous ligament in the midline between the two compartments
        lig = back & (np.abs(X - c["bx"]) <= 1.5) & (Y <= c["sp_y"] + 12.0)
        lab[lig] = L["ligament"]
        # quadratus lumborum: 12th rib to the iliac crest, lateral to the transverse processes
        if crest - 5.0 < z < z12 + 5.0:
            g = np.sin(np.pi * np.clip((z12 + 5.0 - z) / (z12 - crest + 10.0), 0, 1)) ** 0.7
            pso_q = self._psoas_at(z, c) if "quadratus" in self.spec.psoas_contacts else {}
            for side, name in ((1.0, "quadratus_left"), (-1.0, "quadratus_right")):
                qx, qy = c["bx"] + side * (c["tp_x"] + 8.0), c["tp_y"] - 4.0
                if pso_q and g > 0.05:
                    # no fat plane: its medial edge against the psoas' posterolateral surface (the psoas is
                    # painted over the overlap), in front of the transverse process as before
                    qx, qy = _touching(pso_q[side], side, 125.0, 22.0 * g * ms, 11.0 * g * ms, side * 20.0, 2.5)
                q = fascia & _ell(X, Y, qx, qy, 22.0 * g * ms, 11.0 * g * ms, side * 20.0)
                lab[q & ~np.isin(lab, (L["erector_left"], L["erector_right"]))] = L[name]
        # psoas major: from T12/L1, on the side of the vertebral bodies, growing to L4, then forward
        # and outward over the pelvic brim where it joins iliacus
        pso = self._psoas_at(z, c)
        if pso:
            for side, name in ((1.0, "psoas_left"), (-1.0, "psoas_right")):
                ps = fascia & _ell(X, Y, *pso[side])
                lab[ps & np.isin(lab, (L["vat"], L["kidney_left"], L["kidney_right"], L["colon"], L["small_bowel"],
                                       L["bowel_gas"], L["quadratus_left"], L["quadratus_right"]))] = L[name]
        # diaphragmatic crura beside the aorta, T12-L2
        if zl.get("L2", z - 1) - 5.0 < z < z12 + 25.0:
            for side in (1.0, -1.0):
                cr = _ell(X, Y, c["bx"] + side * 0.55 * c["hw"], c["by"] - c["hd"] - 4.0, 6.0, 5.0) & (lab == L["vat"])
                lab[cr] = L["diaphragm"]
        self._imat(lab, z)

    def _psoas_at(self, z: float, c: Mapping[str, float]) -> dict[float, tuple[float, float, float, float, float]]:
        """Psoas major's ellipse per side (+1 left, -1 right) at ``z``: centre x, y, semi-axes, angle; {} above it."""
        zl, ms = self.level_z, self.hab.muscle_scale
        z12 = zl.get("T12", zl.get("L1", z) + 28.0)
        z_l1 = zl.get("L1", z12 - 28.0)
        z_l4 = zl.get("L4", z_l1 - 95.0)
        z_l5 = zl.get("L5", z_l4 - 32.0)
        if not z < z12 + 5.0:
            return {}
        u = np.clip((z12 + 5.0 - z) / max(1.0, z12 - z_l4), 0.0, 1.3)
        rx, ry = (4.0 + 13.0 * min(u, 1.0)) * ms, (5.0 + 15.0 * min(u, 1.0)) * ms
        below = max(0.0, z_l5 - z)
        out = {}
        for side in (1.0, -1.0):
            cx = c["bx"] + side * (c["hw"] + 0.7 * rx + 0.5 * below)
            cy = c["by"] + 0.15 * c["hd"] - 0.35 * below - 8.0 * max(0.0, u - 0.8)
            out[side] = (cx, cy, rx, ry, side * 15.0)
        return out

    def _imat(self, lab: NDArray[np.uint8], z: float) -> None:
        """Small fat blobs inside the muscles, seeded per 10 mm of z so they run over a few slices."""
        L = LABELS
        n = self.hab.imat_blobs
        if n <= 0:
            return
        cell = int(np.floor(z / 10.0))
        rng = np.random.default_rng((self.spec.seed, cell + 100000))
        muscles = [L[m] for m in ("erector_left", "erector_right", "psoas_left", "psoas_right", "wall_left",
                                  "wall_right", "quadratus_left", "quadratus_right")]
        for mid in muscles:
            ys, xs = np.nonzero(lab == mid)
            if len(ys) < 40:
                continue
            for _ in range(rng.poisson(n * 0.6)):
                i = rng.integers(len(ys))
                r = rng.uniform(1.5, 3.5) * (1.5 if self.spec.habitus == "obese" else 1.0)
                blob = _ell(self.X, self.Y, self.x[xs[i]], self.y[ys[i]], r, r * rng.uniform(0.6, 1.4))
                into = {L["erector_left"]: L["erector_fat_left"], L["erector_right"]: L["erector_fat_right"],
                        L["psoas_left"]: L["psoas_fat_left"], L["psoas_right"]: L["psoas_fat_right"]}
                lab[blob & (lab == mid)] = into.get(mid, L["imat"])

    def _vessels(self, lab: NDArray[np.uint8], z: float, t: dict[str, float]) -> None:
        L, zl, X, Y, c = LABELS, self.level_z, self.X, self.Y, t
        z_bif = zl.get("L4", z - 1)
        front = c["by"] - c["hd"]
        soft = np.isin(lab, (L["vat"], L["small_bowel"], L["colon"], L["bowel_gas"], L["liver"], L["diaphragm"]))
        if z >= z_bif:
            (ax, ay, ar), (vx, vy, va, vb) = self._great_vessels(z, c)
            ao = _ell(X, Y, ax, ay, ar, ar)
            ivc = _ell(X, Y, vx, vy, va, vb)
            lab[ao & soft] = L["aorta"]
            lab[ivc & soft] = L["ivc"]
        else:
            d = z_bif - z
            for side in (1.0, -1.0):
                a = _ell(X, Y, c["bx"] + side * (10.0 + 0.45 * d), front - 14.0 - 0.2 * d, 6.5, 6.5)
                v = _ell(X, Y, c["bx"] + side * (4.0 + 0.45 * d) - 12.0 * (side < 0), front - 4.0 - 0.15 * d, 8.0, 6.5)
                lab[v & soft] = L["iliac_vein"]
                lab[a & soft] = L["iliac_artery"]

    def _contacts(self, lab: NDArray[np.uint8], z: float, t: dict[str, float]) -> None:
        """The psoas contacts painted last, each only over visceral fat (so against the psoas, bone, vessels and each
        other with no gap): the right crus, ureters and gonadal veins, lymph nodes, a jejunal loop, the third part of
        the duodenum.  The IVC, aorta, kidneys and quadratus lumborum are moved where they are painted."""
        L, zl, X, Y = LABELS, self.level_z, self.X, self.Y
        con = self.spec.psoas_contacts
        pso = self._psoas_at(z, t)
        if not pso:
            return
        z_l2 = zl.get("L2", z + 30.0)
        z_l3 = zl.get("L3", z_l2 - 32.0)

        def paint(m: NDArray[np.bool_], name: str) -> None:
            lab[m & (lab == L["vat"])] = L[name]

        if "crus" in con and z_l3 - 12.0 <= z <= z_l2 - 5.0:
            # the right crus reaches L3 (the left one L2): a flat slip (12 x 7 mm) along the anterolateral corner of
            # the vertebral body, against the right psoas' anteromedial edge
            pcx, pcy = pso[-1.0][:2]
            phi = float(np.degrees(np.arctan2(-(t["bx"] - 0.7 * t["hw"] - pcx), -(t["by"] - t["hd"] - pcy))))
            cx, cy = _touching(pso[-1.0], -1.0, phi, 6.0, 3.5, -45.0, 1.0)
            paint(_ell(X, Y, cx, cy, 6.0, 3.5, -45.0), "diaphragm")
        if "ureter" in con and z <= z_l2 + 15.0:
            # on the psoas' anterior surface: the ureter near its middle, the gonadal vein anteromedial to it
            for side in (1.0, -1.0):
                ux, uy = _touching(pso[side], side, 10.0, 2.5, 2.5, 0.0, 0.5)
                paint(_ell(X, Y, ux, uy, 2.5, 2.5), "ureter")
                gx, gy = _touching(pso[side], side, -15.0, 2.0, 2.0, 0.0, 0.5)
                paint(_ell(X, Y, gx, gy, 2.0, 2.0), "gonadal_vessel")
        if "node" in con and abs(z - (z_l3 + 3.0)) < 10.0:
            # lymph nodes of 10-15 mm: left para-aortic (between the aorta and the left psoas), right paracaval
            g = float(np.sqrt(1.0 - ((z - z_l3 - 3.0) / 10.0) ** 2))
            for side, phi, a, b in ((1.0, -30.0, 7.0, 5.5), (-1.0, 20.0, 6.0, 5.0)):
                nx, ny = _touching(pso[side], side, phi, a * g, b * g, side * -30.0, 1.0)
                paint(_ell(X, Y, nx, ny, a * g, b * g, side * -30.0), "lymph_node")
        if "bowel" in con and abs(z - z_l3) < 25.0:
            # a collapsed jejunal loop (2 cm) on the left psoas' anterolateral surface
            r = 11.0 * float(np.sqrt(1.0 - ((z - z_l3) / 25.0) ** 2))
            bx_, by_ = _touching(pso[1.0], 1.0, 40.0, r, r, 0.0, 1.5)
            paint(_ell(X, Y, bx_, by_, r, r), "small_bowel")
        if "duodenum" in con and abs(z - z_l3) < 12.0:
            # the third part crosses at L3 from right to left on the right psoas, the IVC and the aorta (with the
            # right ureter and gonadal vessels between it and the psoas), to the left psoas where the fourth part
            # ascends (Gray's): a tube of 24 mm across the slice, round the aorta's left side onto the left psoas
            r = float(np.sqrt(12.0**2 - (z - z_l3) ** 2))
            (ax, ay, ar), (vx, vy, va, vb) = self._great_vessels(z, t)
            pts = np.array([_touching(pso[-1.0], -1.0, 40.0, r, r, 0.0, 1.5),
                            _touching(pso[-1.0], -1.0, 0.0, r, r, 0.0, 1.5),
                            (vx, vy - vb - r + 1.0), (ax, ay - ar - r + 1.0),
                            _touching(pso[1.0], 1.0, -10.0, r, r, 0.0, 1.5)])
            paint(_near_polyline(X, Y, pts, r), "duodenum")

    def _great_vessels(self, z: float, c: Mapping[str, float]) -> tuple[tuple[float, float, float],
                                                                       tuple[float, float, float, float]]:
        """Aorta (centre x, y, radius) and IVC (centre x, y, semi-axes) above the bifurcation at ``z``."""
        front = c["by"] - c["hd"]
        aorta = (c["bx"] + 14.0, front - 12.0, 11.0)
        ivc = (c["bx"] - 22.0, front - 12.0, 13.0, 9.5)
        con = self.spec.psoas_contacts
        if not ("ivc" in con or "aorta" in con):
            return aorta, ivc
        pso = self._psoas_at(z, c)
        zl = self.level_z
        z_l1, z_l3 = zl.get("L1", z + 60.0), zl.get("L3", z)
        # from the renal veins (L1) down the infrarenal IVC lies in the groove between the right psoas and the
        # vertebral body, and an ectatic aorta (over 60) against the left psoas: full contact from L3 down
        w = float(np.clip((z_l1 - z) / max(1.0, z_l1 - z_l3), 0.0, 1.0))
        if pso and "ivc" in con:
            tx, ty = _touching(pso[-1.0], -1.0, -25.0, 11.5, 7.5)
            ivc = (ivc[0] + w * (tx - ivc[0]), ivc[1] + w * (ty - ivc[1]), 13.0 - 1.5 * w, 9.5 - 2.0 * w)
        if pso and "aorta" in con:
            tx, ty = _touching(pso[1.0], 1.0, -35.0, 9.5, 9.5)
            aorta = (aorta[0] + w * (tx - aorta[0]), aorta[1] + w * (ty - aorta[1]), 11.0 - 1.5 * w)
        return aorta, ivc

    def crest_z(self) -> float:
        zl = self.level_z
        if "L4" in zl and "L5" in zl:
            return 0.5 * (self.spine.vertebrae[NUMBERS["L4"]].body_z[0]
                          + self.spine.vertebrae[NUMBERS["L5"]].body_z[1]) + self.spec.crest_offset_mm
        return -1e9

    def _pelvis(self, lab: NDArray[np.uint8]) -> None:
        """Iliac wings, iliacus inside, gluteal muscles outside, from the sacroiliac joint to the crest."""
        s = self.spine.sacrum
        if self.neck or s is None:
            return
        L = LABELS
        crest = self.crest_z()
        top = np.asarray(s.top) + self.shift
        X, Y = self.X, self.Y
        for k, z in enumerate(self.zf):
            if z > crest:
                continue
            tr = self.trunk(float(z))
            dz = crest - z
            for side in (1.0, -1.0):
                # from the posterior iliac spine (behind the sacroiliac joint) out and forward to the
                # anterior superior spine, slightly convex outward (the iliac fossa faces in and forward)
                si = np.array([side * (s.ala_half_width - 6.0), top[1] + 28.0])
                ant = np.array([side * (tr["a_in"] - 22.0 - 0.3 * dz), tr["yc_in"] - 0.15 * tr["b_in"] + 0.4 * dz])
                mid = 0.5 * (si + ant)
                tang = ant - si
                out_n = np.array([tang[1], -tang[0]]) / (np.linalg.norm(tang) + 1e-9)
                if out_n[0] * side < 0:
                    out_n = -out_n
                ctrl = mid + 22.0 * out_n
                u = np.linspace(0, 1, 60)
                pts = ((1 - u) ** 2)[:, None] * si + (2 * u * (1 - u))[:, None] * ctrl + (u**2)[:, None] * ant
                # the crest is highest laterally: the ends of the arc start lower
                ztop = crest - 28.0 * ((u - 0.55) / 0.55) ** 2
                keep = z <= ztop
                if not keep.any():
                    continue
                th = 3.5 + 9.0 * (1 - u) ** 3
                from scipy.spatial import cKDTree

                tree = cKDTree(pts[keep])
                lo, hi = pts[keep].min(0) - 36.0, pts[keep].max(0) + 36.0
                ix = np.searchsorted(self.x, [lo[0], hi[0]])
                iy = np.searchsorted(self.y, [lo[1], hi[1]])
                box = (slice(int(iy[0]), int(iy[1])), slice(int(ix[0]), int(ix[1])))
                Xb, Yb = X[box], Y[box]
                q = np.stack([Xb.ravel(), Yb.ravel()], axis=1)
                d, i = tree.query(q, distance_upper_bound=30.0)
                ok = np.isfinite(d)
                thk = np.where(ok, th[keep][np.minimum(i, keep.sum() - 1)], 0.0)
                wing = (ok & (d <= thk)).reshape(Xb.shape)
                # iliacus on the inner (anteromedial) face, gluteal muscles on the outer face
                nrm = np.zeros((len(pts), 2))
                tang = np.gradient(pts, axis=0)
                nrm[:, 0], nrm[:, 1] = -tang[:, 1], tang[:, 0]
                nrm /= np.linalg.norm(nrm, axis=1, keepdims=True) + 1e-9
                inward = nrm * (side * np.sign(nrm[:, 0:1] * -1 + 1e-9))
                cen = pts[keep][np.minimum(i, keep.sum() - 1)]
                dirv = (q - cen)
                dotin = (dirv * inward[keep][np.minimum(i, keep.sum() - 1)]).sum(axis=1)
                band = ok & (d > thk) & (d <= thk + (16.0 if dz > 8 else 6.0))
                inner = (band & (dotin > 0)).reshape(Xb.shape)
                outer = (band & (dotin <= 0)).reshape(Xb.shape)
                plane = lab[k][box]
                soft = ~np.isin(plane, [L[b] for b in BONES] + [L["disc"], L["canal_csf"], L["cord"],
                                                                L["costal_cartilage"], L["skin"], L["sat"]])
                inside_body = plane > 0
                plane[inner & soft & inside_body] = L["iliacus_left" if side > 0 else "iliacus_right"]
                plane[outer & soft & inside_body] = L["gluteal_left" if side > 0 else "gluteal_right"]
                plane[wing & inside_body & (plane != L["sacrum"])] = L["ilium"]

    def _arms_and_table(self, lab: NDArray[np.uint8]) -> None:
        L, spec, h = LABELS, self.spec, self.hab
        X, Y = self.X, self.Y
        zl = self.level_z
        z_elbow = zl.get("L2", zl.get("L1", 0.0))
        for k, z in enumerate(self.zf):
            z = float(z)
            tr = self.trunk(z)
            body = lab[k] > 0
            if spec.arms and not self.neck:
                below = z < z_elbow
                ra = (36.0 + h.arm_fat if not below else 30.0 + h.arm_fat * 0.8) * 0.9  # lateral semi-axis
                rb = ra * 1.25
                for side, mus, fat in ((1.0, "arm_muscle_left", "arm_fat_left"), (-1.0, "arm_muscle_right",
                                                                                     "arm_fat_right")):
                    cx = side * (tr["a"] + ra - 3.0)
                    cy = tr["yc"] + 0.15 * tr["b"]
                    arm = _ell(X, Y, cx, cy, ra, rb) & ~body
                    lab[k][arm] = L["arm_skin"]
                    lab[k][_ell(X, Y, cx, cy, ra - 2.0, rb - 2.0) & arm] = L[fat]
                    lab[k][_ell(X, Y, cx, cy + 3.0, ra - 2.0 - h.arm_fat, rb - 2.0 - h.arm_fat) & arm] = L[mus]
                    if not below:
                        lab[k][_ell(X, Y, cx - side * 3.0, cy + 2.0, 11.0, 11.0) & arm] = L["humerus"]
                    else:
                        lab[k][_ell(X, Y, cx - side * 6.0, cy - 8.0, 6.5, 6.0) & arm] = L["forearm_bone"]
                        lab[k][_ell(X, Y, cx + side * 4.0, cy + 10.0, 6.0, 6.5) & arm] = L["forearm_bone"]
            if spec.table:
                y_back = tr["yc"] + tr["b"]
                tab = (Y >= y_back + 6.0) & (Y <= y_back + 14.0) & (np.abs(X) < 230.0)
                lab[k][tab & (lab[k] == 0)] = L["table"]

    # -- neck -----------------------------------------------------------------------------------
    def _neck_plane(self, k: int, z: float) -> NDArray[np.uint8]:
        L, zl, X, Y = LABELS, self.level_z, self.X, self.Y
        t = self.trunk(z)
        lab = np.zeros(X.shape, dtype=np.uint8)
        body = _ell(X, Y, 0.0, t["yc"], t["a"], t["b"])
        lab[body] = L["skin"]
        lab[_ell(X, Y, 0.0, t["yc"], t["a"] - 2.0, t["b"] - 2.0)] = L["sat"]
        fascia = _ell(X, Y, 0.0, t["yc"] + 0.3 * t["sat_b"], t["a"] - t["sat_s"], t["b"] - 0.5 * (t["sat_f"] +
                                                                                                   t["sat_b"]))
        c = t
        z_c1, z_c2 = zl.get("C1", z), zl.get("C2", z)
        z_c7, z_t1 = zl.get("C7", z - 100), zl.get("T1", z - 120)
        # deep neck fat (parapharyngeal, carotid space, posterior triangle) between the muscles;
        # tongue and floor of the mouth above C2-C3
        lab[fascia] = L["oral_soft_tissue"] if z > z_c2 - 12 else L["deep_neck_fat"]
        s = t["neck_scale"]
        zc3 = zl.get("C3", z_c2 - 20)
        if zc3 - 10 < z <= z_c2 - 12:  # submandibular glands
            for side in (1.0, -1.0):
                lab[_ell(X, Y, c["bx"] + side * 30.0 * s, c["by"] - 42.0, 13.0, 9.0, side * 25.0) & fascia] = (
                    L["oral_soft_tissue"])
        # posterior paravertebral muscles (deep and superficial, trapezius included)
        y_front = c["tp_y"] - 4.0
        for side, name in ((1.0, "paravertebral_left"), (-1.0, "paravertebral_right")):
            pv = fascia & (Y >= y_front) & _ell(X, Y, c["bx"] + side * 24.0 * s, c["sp_y"] - 8.0, 42.0 * s, 48.0 * s)
            pv &= side * (X - c["bx"]) > 1.5
            lab[pv] = L[name]
            # prevertebral (longus colli/capitis) and scalenes
            pre = _ell(X, Y, c["bx"] + side * 0.55 * c["hw"], c["by"] - c["hd"] - 3.0, 7.0, 4.5) & fascia
            sca = _ell(X, Y, c["bx"] + side * (c["tp_x"] + 9.0), c["tp_y"] - 6.0, 10.0, 7.0, side * 30.0) & fascia
            if z < z_c2:
                lab[sca] = L[name]
            lab[pre] = L[name]
        lab[fascia & (np.abs(X - c["bx"]) <= 1.5) & (Y > c["sp_y"])] = L["ligament"]
        if z < z_c2 + 10:
            # airway: pharynx, larynx, trachea; oesophagus behind the trachea below C6
            zc6 = zl.get("C6", z_c7 + 18)
            ya = c["by"] - c["hd"] - 10.0 - (6.0 if z < zl.get("C4", z) else 0.0)
            ra = (16.0, 8.0) if z > zl.get("C4", z - 1) else ((13.0, 11.0) if z > zc6 else (9.0, 9.0))
            cyair = ya - ra[1] - (10.0 if z < zc6 else 0.0)
            air = _ell(X, Y, c["bx"], cyair, *ra)
            if z < zl.get("C4", z + 1) and z > z_t1 - 30:
                cart = _ell(X, Y, c["bx"], cyair, ra[0] + 3.0, ra[1] + 3.0) & ~air
                lab[cart & fascia] = L["larynx_cartilage"]
            lab[air & fascia] = L["airway"]
            if z < zl.get("C4", z + 1):  # strap muscles in front of the larynx, trachea and thyroid
                for side in (1.0, -1.0):
                    strap = _ell(X, Y, c["bx"] + side * 14.0, cyair - ra[1] - 6.0, 12.0, 3.5, side * -25.0) & fascia
                    lab[strap & (lab == L["deep_neck_fat"])] = L["neck_muscle_other"]
            if z < zc6:
                oe = _ell(X, Y, c["bx"] - 3.0, c["by"] - c["hd"] - 8.0, 8.0, 5.0) & fascia
                lab[oe] = L["oesophagus"]
                # thyroid lobes either side of the trachea, C6-T1
                if z > z_t1 - 10:
                    for side in (1.0, -1.0):
                        lab[_ell(X, Y, c["bx"] + side * 18.0, cyair + 2.0, 8.0, 13.0, side * -20.0) & fascia
                            & ~air] = L["thyroid"]
            # carotid and jugular beside the airway, under the sternocleidomastoid
            for side in (1.0, -1.0):
                lab[_ell(X, Y, c["bx"] + side * 24.0 * s, c["by"] - c["hd"] - 6.0, 4.5, 4.5) & fascia] = L["carotid"]
                lab[_ell(X, Y, c["bx"] + side * 33.0 * s, c["by"] - c["hd"] - 3.0, 6.5, 5.5) & fascia] = L["jugular"]
        # sternocleidomastoid: mastoid (behind, lateral) at C1 to the sternum/clavicle (front, medial) at T1
        u = np.clip((z_c1 - z) / max(1.0, z_c1 - z_t1), 0.0, 1.0)
        if z < z_c1 + 10:
            for side, name in ((1.0, "scm_left"), (-1.0, "scm_right")):
                cx = c["bx"] + side * (t["a_in"] - 8.0) * (1 - 0.3 * u)
                cy = c["by"] + 5.0 - 60.0 * u
                scm = _ell(X, Y, cx, cy, 8.0 * s, 18.0 * s, side * (-20.0 - 40.0 * u)) & body
                lab[scm & ~np.isin(lab, (L["skin"],))] = L[name]
        # mandible at C2-C3 (a U in front of the airway) and the skull base above C1
        if zc3 - 8 < z < z_c2 + 6:
            r = 38.0 * s
            ring = _ell(X, Y, c["bx"], c["by"] - 28.0, r, r) & ~_ell(X, Y, c["bx"], c["by"] - 28.0, r - 7.0, r - 7.0)
            lab[ring & (Y < c["by"] - 38.0) & fascia] = L["mandible"]
        if z > zl.get("C1", z) + 6:
            occ = _ell(X, Y, c["bx"], c["by"] + 30.0, 55.0, 45.0) & ~_ell(X, Y, c["bx"], c["by"] + 30.0, 47.0, 37.0)
            lab[occ & (Y > c["by"] + 30.0) & body] = L["skull"]
            for side in (1.0, -1.0):
                lab[_ell(X, Y, c["bx"] + side * 48.0, c["by"] + 8.0, 8.0, 11.0) & body] = L["skull"]
        if z < z_c7:
            # shoulders: clavicles in front, scapulae behind, lung apices inside the first ribs
            w = min(1.0, (z_c7 - z) / 30.0)
            for side in (1.0, -1.0):
                lab[_ell(X, Y, c["bx"] + side * 80.0 * w, c["by"] - 55.0, 55.0 * w, 7.0, side * 10.0) & body] = (
                    L["clavicle"])
                lab[_ell(X, Y, c["bx"] + side * 95.0, c["by"] + 55.0, 40.0 * w, 5.0, side * -25.0) & body] = (
                    L["scapula"])
                if z < z_t1:
                    lab[_ell(X, Y, c["bx"] + side * 42.0, c["by"] - 5.0, 22.0 * w, 25.0 * w) & fascia] = L["lung"]
            lab[body & (np.abs(X) > 70.0) & (lab == L["neck_muscle_other"])] = L["shoulder_muscle"]
        return lab

    # -- intensities ------------------------------------------------------------------------------
    def _hu(self, lab: NDArray[np.uint8], vert: NDArray[np.uint8]) -> NDArray[np.float32]:
        L, spec, h = LABELS, self.spec, self.hab
        ci = 1 if spec.contrast else 0
        rng = np.random.default_rng(spec.seed + 17)
        lut_mean = np.zeros(256, dtype=np.float32) - 1000.0
        lut_sd = np.zeros(256, dtype=np.float32)

        def setv(names: tuple[str, ...], key: str | None = None, mean: float | None = None, sd: float = 6.0) -> None:
            for n in names:
                if mean is None:
                    v = _HU[key or n]
                    lut_mean[L[n]], lut_sd[L[n]] = v[ci], v[2]
                else:
                    lut_mean[L[n]], lut_sd[L[n]] = mean, sd

        for n in ("skin", "sat", "vat", "imat", "liver", "spleen", "stomach", "colon", "small_bowel", "bowel_gas",
                  "aorta", "ivc", "lung", "ligament", "airway", "thyroid", "oesophagus", "larynx_cartilage",
                  "oral_soft_tissue", "disc", "canal_csf", "cord", "costal_cartilage", "table", "deep_neck_fat"):
            setv((n,))
        setv(("duodenum",))
        setv(("lymph_node",))
        setv(("ureter",))
        setv(("gonadal_vessel",), "ivc")
        setv(("kidney_left", "kidney_right"), "kidney")
        setv(("iliac_artery",), "aorta")
        setv(("iliac_vein",), "ivc")
        setv(("carotid", "jugular"), "vessel_neck")
        setv(("erector_fat_left", "erector_fat_right", "psoas_fat_left", "psoas_fat_right"), "imat")
        setv(TRUNK_MUSCLES, mean=h.muscle_hu, sd=7.0)
        setv(("psoas_left", "psoas_right"), mean=h.muscle_hu + 4.0, sd=6.0)
        setv(("arm_muscle_left", "arm_muscle_right"), mean=h.muscle_hu + 2.0, sd=7.0)
        setv(("arm_fat_left", "arm_fat_right"), "sat")
        setv(("arm_skin",), "skin")
        if spec.contrast and spec.contrast_phase == "arterial":
            for n, (m, sd) in _ARTERIAL.items():
                lut_mean[L[n]], lut_sd[L[n]] = m, sd
        if spec.oral_contrast:
            for n, (m, sd) in _ORAL.items():
                lut_mean[L[n]], lut_sd[L[n]] = m, sd
        for n in BONES:
            setv((n,), mean=220.0, sd=40.0)  # cancellous; cortex below
        setv(("humerus", "forearm_bone", "mandible", "skull", "clavicle"), mean=1150.0, sd=80.0)
        hu = lut_mean[lab] + rng.standard_normal(lab.shape, dtype=np.float32) * lut_sd[lab]
        # cancellous density by level (thoracic denser)
        bone_ids = [L[b] for b in ("vertebra", "sacrum")]
        vb = np.isin(lab, bone_ids)
        lvl = np.where(vert > 0, vert, 22).astype(np.float32)
        hu[vb] = (250.0 - 3.5 * np.minimum(lvl[vb], 26.0)) + rng.standard_normal(int(vb.sum())).astype(np.float32) * 35
        hu[lab == L["rib"]] = 260.0
        hu[lab == L["ilium"]] = 200.0
        if spec.trabecular_hu:
            # osteoporosis: the cancellous bone thins (the cortex and the endplates stay brighter)
            hu[vb] = spec.trabecular_hu + rng.standard_normal(int(vb.sum())).astype(np.float32) * 25.0
            f = spec.trabecular_hu / 175.0
            hu[lab == L["rib"]] = 260.0 * f
            hu[lab == L["ilium"]] = 200.0 * f
        ep = self.endplate
        if ep is not None:
            # cortical endplates (1 mm, about 500 HU); sclerotic endplates of degenerated discs (2 mm, about 800 HU)
            e1, e2 = (ep == 1) & vb, (ep == 2) & vb
            hu[e1] = 500.0 + rng.standard_normal(int(e1.sum())).astype(np.float32) * 60.0
            hu[e2] = 800.0 + rng.standard_normal(int(e2.sum())).astype(np.float32) * 80.0
        gas = self.gas
        if gas is not None:
            g_ = gas & (lab == L["disc"])
            hu[g_] = -700.0 + rng.standard_normal(int(g_.sum())).astype(np.float32) * 60.0
        # cortex: a one-pixel shell in-plane around every bone (and the kidney cortex with contrast)
        st = ndimage.generate_binary_structure(3, 1)
        st[0] = st[2] = False
        bones = np.isin(lab, [L[b] for b in BONES])
        shell = bones & ~ndimage.binary_erosion(bones, structure=st)
        thin = shell & ~np.isin(lab, [L[b] for b in ("humerus", "forearm_bone", "mandible", "skull", "clavicle")])
        hu[thin] = 750.0
        hu[shell] += rng.standard_normal(int(shell.sum())).astype(np.float32) * 80.0
        marrow = np.isin(lab, [L["humerus"], L["forearm_bone"]]) & ndimage.binary_erosion(
            np.isin(lab, [L["humerus"], L["forearm_bone"]]), structure=st, iterations=max(1, int(round(
                3.0 / spec.pixel_mm))))
        hu[marrow] = 20.0
        if spec.contrast:
            kid = np.isin(lab, [L["kidney_left"], L["kidney_right"]])
            med = kid & ndimage.binary_erosion(kid, structure=st, iterations=max(1, int(round(6.0 / spec.pixel_mm))))
            hu[med] = 110.0
        return hu.astype(np.float32)

    def _scanner(self, hu: NDArray[np.float32], lab: NDArray[np.uint8]) -> NDArray[np.float32]:
        spec = self.spec
        sig = spec.blur_mm / spec.pixel_mm
        if sig > 0.05:
            hu = ndimage.gaussian_filter(hu, sigma=(0, sig, sig)).astype(np.float32)
        sd = self.hab.noise_sd if spec.noise_sd is None else spec.noise_sd
        if sd > 0:
            rng = np.random.default_rng(spec.seed + 1)
            # CT noise is correlated in-plane (the reconstruction kernel): low-pass white noise,
            # then scale it back to the habitus's SD
            noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape, dtype=np.float32), sigma=(0, 0.6, 0.6))
            hu = hu + noise * np.float32(sd / max(float(noise.std()), 1e-6))
        hu[lab == 0] = np.where(hu[lab == 0] > -990, -1000.0, hu[lab == 0])
        return hu

    def _anchor_facts(self, vert: NDArray[np.uint8], ribs: NDArray[np.uint8]) -> dict[str, object]:
        owners = sorted({int(v) for v in np.unique(ribs) if v > 0}, key=order_key)
        lowest = NAMES.get(owners[-1]) if owners else None
        anatomy = {11: "T11", 12: "T12", 13: "L1"}[self.spec.rib_pairs]
        facts: dict[str, object] = {
            "rib_pairs": self.spec.rib_pairs,
            "rib_owners": [NAMES[v] for v in owners],  # vertebrae whose ribs appear in the images
            "lowest_rib_bearing": anatomy,  # of the patient (T12 with 12 pairs)
            "lowest_rib_bearing_in_view": lowest,
            "transitional": "sacralised L5" if self.spec.sacralised_l5 else None,
            "levels_in_view": [NAMES[v] for v in sorted({int(v) for v in np.unique(vert) if v > 0}, key=order_key)],
        }
        if not self.neck:
            facts["iliac_crest_z"] = self.crest_z()
        return facts


def make_anatomy(spec: AnatomySpec) -> Anatomy:
    """Build the phantom (no files).  A few seconds for 256 x 256 x 60 on one core."""
    if spec.habitus not in HABITUS:
        raise ValueError(f"anatomical phantom: habitus {spec.habitus!r}; use one of {sorted(HABITUS)}")
    if spec.rib_pairs not in (11, 12, 13):
        raise ValueError("anatomical phantom: rib_pairs must be 11, 12 or 13")
    if not 0.5 <= spec.slice_mm <= 10.0:
        raise ValueError("anatomical phantom: slice_mm must be 0.5-10 mm")
    if spec.spacing_mm and not 0.3 <= spec.spacing_mm <= spec.slice_mm:
        raise ValueError("anatomical phantom: spacing_mm must be 0.3 mm to slice_mm (contiguous or overlapping)")
    unknown = set(spec.psoas_contacts) - set(PSOAS_CONTACTS)
    if unknown:
        raise ValueError(f"anatomical phantom: psoas contacts {sorted(unknown)}; use any of {PSOAS_CONTACTS}")
    if spec.contrast_phase not in ("portal", "arterial"):
        raise ValueError(f"anatomical phantom: contrast_phase {spec.contrast_phase!r}; use 'portal' or 'arterial'")
    return _turned(_Builder(spec).build(), spec.roll_deg)


def _turned(ph: Anatomy, deg: float) -> Anatomy:
    """``ph`` turned by ``deg`` about its grid's centre (``AnatomySpec.roll_deg``)."""
    if deg == 0.0:
        return ph

    def rot(a: NDArray[_T], order: int, cval: float) -> NDArray[_T]:
        out = ndimage.rotate(a, deg, axes=(1, 2), reshape=False, order=order, mode="constant", cval=cval)
        return np.asarray(out, dtype=a.dtype)

    t = np.deg2rad(deg)
    cx, cy = float(ph.x.mean()), float(ph.y.mean())
    bodies = {}
    for name, (bx, by, bz, hw, hd) in ph.bodies.items():
        dx, dy = bx - cx, by - cy
        bodies[name] = (cx + np.cos(t) * dx + np.sin(t) * dy, cy - np.sin(t) * dx + np.cos(t) * dy, bz, hw, hd)
    return replace(ph, hu=rot(ph.hu, 1, -1000.0), labels=rot(ph.labels, 0, 0), vertebrae=rot(ph.vertebrae, 0, 0),
                   ribs=rot(ph.ribs, 0, 0), bodies=bodies)


# ------------------------------------------------------------------------------------------------
def _written(a: NDArray[_T], geometry: Geometry) -> NDArray[_T]:
    """Canonical [k sup, r post, c left] -> written [instance, row, column] for ``geometry``."""
    rd, cd = geometry.directions()
    out = a
    if rd[0] < 0:
        out = out[:, :, ::-1]
    if cd[1] < 0:
        out = out[:, ::-1, :]
    if geometry.position.startswith("HF"):  # head first: the first image is the most superior
        out = out[::-1]
    return np.ascontiguousarray(out)


def write_series(ph: Anatomy, out_dir: Path, geometry: Geometry | None = None, study_uid: str | None = None,
                 patient_id: str = "PHANTOM-ANAT-001", patient_name: str = "Phantom^Anatomy",
                 series_number: int = 3) -> SeriesTruth:
    """Write ``ph`` as one DICOM CT Image Storage series and return the truth in written order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    geometry = geometry or Geometry()
    spec = ph.spec
    hab = HABITUS[spec.habitus]
    rd, cd = geometry.directions()
    px = spec.pixel_mm
    labels = _written(ph.labels, geometry)
    verts = _written(ph.vertebrae, geometry)
    ribs = _written(ph.ribs, geometry)
    stored = to_stored(ph.hu)
    stored_w = _written(stored, geometry)
    n = len(ph.z)
    zs = ph.z[::-1] if geometry.position.startswith("HF") else ph.z
    # first pixel of each written image: the canonical corner that ends up at row 0, column 0
    x0 = ph.x[-1] if rd[0] < 0 else ph.x[0]
    y0 = ph.y[-1] if cd[1] < 0 else ph.y[0]
    positions = np.array([[x0, y0, z] for z in zs], dtype=np.float64)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    files: list[Path] = []
    sops: list[str] = []
    part = "NECK" if spec.region == "neck" else "ABDOMEN"
    for i in range(n):
        sop = generate_uid()
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.Modality = "CT"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19640101"
        ds.PatientSex = spec.sex
        ds.PatientAge = spec.age
        ds.PatientSize = f"{hab.height_m:.2f}"
        ds.PatientWeight = f"{hab.weight_kg:.1f}"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20260301"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
        ds.AccessionNumber = "PHA0001"
        ds.StudyID = "1"
        ds.ReferringPhysicianName = ""
        ds.Manufacturer = "prognode anatomical phantom"
        ds.SeriesNumber = series_number
        ds.InstanceNumber = i + 1
        ds.AcquisitionNumber = 1
        ds.SeriesDescription = (f"{part.title()} phantom {spec.habitus} {'C+' if spec.contrast else 'C-'} "
                                f"{geometry.position}{' mirrored' if geometry.mirror_rows else ''}")
        ds.StudyDescription = "Anatomical body composition phantom"
        ds.BodyPartExamined = part
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = "120"
        ds.ConvolutionKernel = "B30f"
        ds.PatientPosition = geometry.position
        ds.ImagePositionPatient = [f"{v:.4f}" for v in positions[i]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*rd, *cd)]
        ds.SliceThickness = f"{spec.slice_mm:.3f}"
        ds.SpacingBetweenSlices = f"{spec.spacing:.3f}"
        ds.SliceLocation = f"{positions[i][2]:.3f}"
        ds.GantryDetectorTilt = "0"
        if spec.contrast:
            ds.ContrastBolusAgent = "Iodinated contrast (portal venous)"
        ds.PixelSpacing = [f"{px:.6f}", f"{px:.6f}"]
        set_ct_pixels(ds, stored_w[i])
        path = out_dir / f"CT{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        sops.append(str(sop))
    # middle of each vertebral body: the written slice nearest its z
    level_slices = {name: int(np.argmin(np.abs(zs - z))) for name, z in ph.level_z.items()
                    if zs.min() - spec.spacing / 2 <= z <= zs.max() + spec.spacing / 2}
    return SeriesTruth(labels=labels, hu=stored_w.astype(np.float32) - 1024.0, vertebrae=verts, ribs=ribs,
                       level_slices=level_slices, level_z=ph.level_z, anchors=ph.anchors, positions=positions,
                       row_direction=rd, column_direction=cd, pixel_mm=px, slice_mm=spec.spacing,
                       geometry=geometry, files=files, series_uid=series_uid, study_uid=study_uid, sop_uids=sops)


def write_anatomy(spec: AnatomySpec, out_dir: Path, geometry: Geometry | None = None,
                  **kwargs: object) -> SeriesTruth:
    """Build the phantom for ``spec`` and write it (see :func:`write_series` for ``kwargs``)."""
    return write_series(make_anatomy(spec), out_dir, geometry, **kwargs)  # type: ignore[arg-type]
