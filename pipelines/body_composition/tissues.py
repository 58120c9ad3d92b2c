"""Weight-free tissue segmentation bounded by anatomy, on one canonical axial slice.

Input arrays are canonical (``Volume.canonical_axial``): rows increase toward the patient's
back, columns toward the patient's LEFT, so "left" is always the larger column index.  The
compartments and named muscles are found along the slice's axes; where the patient's spine is
rolled against them the stage passes ``roll_deg`` and they are found on the slice turned back by
it (:mod:`pipelines.body_composition.roll`, :func:`turned_named`).
HU windows follow Mitsiopoulos 1998 (muscle -29..150, fat -190..-30).

Trunk.  The body is the non-air component holding the vertebra.  Arms are cut off: an arm
lying apart is another component that holds limb bone and is thick (the table is not); an arm
touching the trunk is found from its bone (a piece of at least ``limb_bone_min_mm2``, at least
``limb_min_dist_mm`` from the vertebra and beside it rather than in front or behind): eroding
the body step by step, the deep part around that bone comes apart from the trunk's deep part
once the erosion passes half the skin contact, while a rib or a scapula sinks into the trunk;
every body pixel then goes to the nearer deep part.  Arms are never muscle, SAT or VAT.  An
arm that cannot be cut off (pressed deep into the outline) is caught by the trunk-outline gates
(``plausibility.toml``).

L3 (lumbar) compartments.  The envelope is the filled non-fat tissue inside the skin; SAT is
the trunk's fat outside it.  Skeletal muscle is only:

* the paraspinal compartment: tissue behind the posterior bony floor (laminae, transverse
  processes, rib necks) and medial to the rib angle, both sides (erector spinae with
  multifidus, as TotalSegmentator's "autochthon"); the bony floor is the patient's bone (the
  table is outside the body).  The erector masks are its largest muscle mass per side (opened
  by ``erector_open_mm`` so thin sheets part from it, then grown back into the muscle window),
  bounded by:

  - the back: the subcutaneous fat, i.e. the fat joined to the air behind the back through
    channels at least 2 x ``sat_channel_mm`` wide.  The fat clefts between multifidus and
    longissimus reach the subcutaneous fat only by a thin channel along the spinous process;
    they are intramuscular, not the back surface.  Under the ribs (a bone piece whose most
    posterior point lies at least ``rib_angle_min_lat_mm`` from the midline; a medial piece is
    a vertebral process parted by partial volume) the outer ``erector_sheet_mm`` is latissimus
    dorsi, serratus posterior inferior and trapezius; below them only the thoracolumbar fascia
    (``erector_fascia_mm``, about its thickness) covers the erector;
  - the front: the bony floor, and ``erector_front_mm`` behind the vertebral body's wall;
  - the side: the lateral raphe (about ``raphe_beyond_tip_mm`` beyond the transverse process
    tip, at most ``erector_lateral_max_mm``) and the rib angle.  This bound is a straight line,
    not the fat plane lateral to the iliocostalis: where a muscle lies lateral to that plane inside
    the bound, it is counted as erector.
  - between transverse processes (a slice through a disc, or between the processes of two
    vertebrae, has none: only the pedicle or lamina reaches sideways) the compartment is the
    same as at the processes above and below: the intertransverse ligaments and muscles join
    adjacent processes into one plane in front of the erector, and the thoracolumbar fascia's
    lateral raphe runs along their tips.  Such a slice takes the process tip and the floor of
    the nearest slices with a process within half the vertebral pitch along the spine
    (processes repeat once per pitch, so every slice lies that near to the process above or
    the one below; ``tp_context_mm`` where the pitch is unknown), interpolated between the one
    above and the one below.  Each process's tip is its longest reach over the slices that show
    it (a slice through its upper or lower edge cuts it short).  The carried floor holds only
    lateral to the slice's own bone (its lamina and pedicle still bound it medially), and only
    for the erector mask, not for the compartment's skeletal muscle (the intertransversarii are
    muscle).  In the lumbar spine it replaces, lateral to that bone, the slice's own floor held
    level from the lamina (the erector reaches forward to the intertransverse plane there:
    lumbar phantom erector Dice over every L5-L1 slice 0.83 -> 0.87); where ribs lie beside the
    compartment the deeper of the two bounds it (rib necks and levatores costarum lie in front;
    the real T11-T12 CT lost 0.01 Dice against TotalSegmentator when the carried plane alone did).
    Landmarks come from :func:`bony_landmarks` per slice and :func:`with_neighbours` (the stage does
    this over the volume); without a process within reach the fixed ``erector_lateral_mm`` stays.
  - between two ribs (``rib_wall``): the erector lies behind the chest wall, the ribs and the intercostal
    muscles between them.  A slice through an intercostal space shows no bone between the process tip and the
    next rib's angle, and a floor drawn straight between them took the intercostals, the diaphragm and the
    quadratus lumborum's upper end lying in front of the erector (the real T11-T12 CT's left erector: 10.3 cm2
    against TotalSegmentator's 7.8, most of it in front).  Each rib-bearing slice carries its most posterior bone
    per column (``SideBone.wall_mm``); lateral to its own vertebra's bone a slice takes, per column, that of the
    nearest slice above and below within reach that hold bone there (interpolated along the spine), and its
    floor runs across the columns between those and its own bone, never in front of its own floor (real CT
    erector Dice 0.804 / 0.840 -> 0.817 / 0.845; the anatomical phantoms unchanged).
  - no rim is eroded: a one-pixel erosion, or one only where the mask faces fat, matched
    TotalSegmentator's edge on the left of the real CT bench and lost more on the right; a gap
    around bone (partial volume of the laminae) helped there but cost the phantom, whose truth
    reaches the bone, 0.02-0.03 Dice: the edge is where the muscle window ends.

  The erector mask is the compartment, not only its muscle-window pixels (``_outline``): the
  outline is smoothed by one pixel and fat clefts and concavities narrower than 2 x
  ``erector_close_mm`` are taken in, as TotalSegmentator's autochthon holds them (6-10 % of it on
  the real CT bench) and as the paraspinal "total cross-sectional area" of body-composition
  studies does; its mean HU is then the compartment's (fatty infiltration lowers it).  That fat is
  IMAT, never skeletal muscle.
* psoas beside the vertebral body (nearest muscle component to its seed), reduced to its round
  belly, and measured as its outline (TotalSegmentator's iliopsoas, "total psoas area"): fat specks
  and notches narrower than 2 x ``psoas_outline_mm`` are in it (and in IMAT, never in skeletal
  muscle); the quadratus lumborum, the crus or a non-enhanced kidney touching it are cut off where
  the contact is narrower than the belly (``_belly``).  What touches it with no fat plane (the
  anatomical phantom's ``psoas_contacts``, ``bench/psoas_contacts.py``) is cut where a plane-free
  slice still tells it apart: tissue fainter than the muscle against the vertebral body's side
  (unenhanced kidney, duodenum, bowel: ``belly_drop_hu``), a round blob joined by a neck and centred
  in front of the vertebral body or of the psoas' own centre (duodenum, a bowel loop, the vena cava,
  a node: ``belly_neck_frac``), and, behind the body's centre, anything beyond the transverse process
  tip (the quadratus lumborum arises from it: ``psoas_beyond_tip_mm``; bone that reaches less than
  ``psoas_tip_beyond_body_mm`` beyond the body's side is an articular process or a process's root, and the
  neighbours' processes bound the psoas instead).  Medial to the tip the quadratus
  lumborum lies posterolateral to the psoas in front of the process with no fat plane: the sheet of it the belly's
  discs cut off (reaching farther than their radius, behind and lateral to the belly's centre) is kept out of the
  grown and closed outline (``psoas_sheet_stop``), and where it touches that sheet the psoas' edge continues the
  oval fitted to the rest of its outline (``psoas_contact_mm``; phantom psoas area +9..+15 % -> -2..+2 %).  Same HU
  and a contact as wide as the psoas (the duodenum lying across it enhanced, a fatty psoas against an unenhanced
  kidney) is not told apart: the bench shows how much is then taken.  A fatty psoas is kept whole: it is
  parted from other components by a one-pixel opening only (``psoas_bridge_mm``: the 2 mm of the other muscles
  erased the 2-3 mm strands of a marbled obese psoas at 1 mm pixels, -51 %), and slivers a fat speck parts from
  the belly within ``psoas_fragment_mm`` of it are its own;
* the abdominal wall, quadratus lumborum included: muscle-HU tissue in a band of bounded
  thickness (``wall_max_mm``) inside the outer fascia, the paraspinal compartment counted as
  outside (so the quadratus lumborum lying in front of it is in the band).  Bulky soft tissue
  that reaches deeper than the band (liver, spleen, kidney, bowel, stomach: thicker than
  2 x ``organ_bulk_mm`` and reaching into the cavity) and enhancing tissue (smoothed HU above
  ``organ_hu``) are cut from the band except for its outermost ``wall_keep_mm``, which is
  always muscle (intercostals and obliques lie between the fat and any organ).

IMAT is fat enclosed by those muscles plus fat inside the paraspinal compartment; VAT is the
remaining fat inside the envelope and outside the paraspinal compartment (the cavity and
the extraperitoneal fat).  Vessels, organs and bowel are none of these: they are neither fat
nor in a muscle compartment.

Noise.  Regions are parted by openings, components and closings, which pixel noise breaks (low-dose
CT, thin slices): speckle in the subcutaneous fat closes the envelope across it, and a muscle parts
from itself.  Where a slice's pixel noise (``noise_hu``) is above ``noise_smooth_above_hu`` the regions
(trunk, envelope, psoas, erector, compartments, organs, the wall band) are found on a Gaussian-smoothed
copy (``for_segmentation``) and the slice's notes say so; each pixel's tissue (the muscle and fat
windows) and every measurement read the original HU, at L3 and at C3.

C3 (Swartz 2016).  Skeletal muscle is the paravertebral muscles (all muscle around the
cervical spine behind the prevertebral plane, both sides) plus both sternocleidomastoids
(the superficial anterolateral muscle bellies); no SAT, VAT, cavity or psoas is reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from pipelines.body_composition.morphology import (
    closing,
    components_touching,
    dilate,
    disk,
    erode,
    fill_holes,
    label_min,
    label_sizes,
    opening,
)
from pipelines.body_composition.roll import turn_back, turn_forward
from pipelines.body_composition.types import (
    C3_NAMED,
    L3_NAMED,
    LevelResult,
    NeighbourBone,
    SideBone,
    SliceAnatomy,
    SliceSegmentation,
    keys_for_level,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TissueParams:
    bone_hu: float = 200.0
    fat_hu: tuple[float, float] = (-190.0, -30.0)
    muscle_hu: tuple[float, float] = (-29.0, 150.0)
    skin_mm: float = 4.0
    close_mm: float = 4.0
    # arms
    limb_bone_min_mm2: float = 80.0  # a limb bone section (humerus, radius, ulna) is at least this large
    limb_min_area_cm2: float = 12.0
    limb_min_dist_mm: float = 70.0  # limb bone lies at least this far from the vertebral body centre
    limb_min_depth_mm: float = 15.0  # a limb is at least this thick (distance to its skin)
    limb_neck_ratio: float = 0.75  # ... and joined to the trunk by a neck at most this fraction of its depth
    # abdominal wall and organs
    wall_max_mm: float = 30.0  # wall muscles (obliques, transversus, rectus, QL) lie within this of the fascia
    wall_keep_mm: float = 6.0  # the outermost layer of the band is always wall muscle
    organ_bulk_mm: float = 10.0  # organs are thicker than twice this
    organ_hu: float = 85.0  # enhancing organs: smoothed HU above this is not muscle
    organ_smooth_mm: float = 2.0
    imat_max_hole_mm2: float = 1000.0
    paraspinal_lateral_mm: float = 85.0
    paraspinal_front_mm: float = 5.0  # the compartment starts this far behind the vertebral body's centre + half height
    # named lumbar muscles
    psoas_lateral_mm: float = 70.0
    psoas_front_frac: float = 0.75  # the psoas centre lies behind (vertebral centre - this x half height)
    belly_open_frac: float = 0.7  # the psoas belly: opening by this share of its inscribed radius (flat sheets cut)
    belly_close_mm: float = 3.0  # ... after closing fat specks and noise pits of about this size
    belly_neck_frac: float = 0.7  # round blobs joined by a neck narrower than this share of the smaller one's
    # inscribed diameter are two; one centred in front of the vertebral body is not psoas
    belly_drop_hu: float = 12.0  # soft tissue this far (or 2.5 x the spread of the reference's local means) below
    # the median local mean HU of the reference muscle is not psoas (0: off); local means over this (Gaussian sigma),
    belly_hu_smooth_mm: float = 3.0  # muscle-window pixels not next to fat only ...
    belly_low_min_mm2: float = 50.0  # ... in a region of at least this (an organ, not noise); the reference muscle
    belly_ref_mm: float = 10.0  # lies within this less 2 mm of the point this far beside the vertebral body's side
    psoas_beyond_tip_mm: float = 5.0  # behind the body's centre the psoas ends this far beyond the transverse
    # process tip (0: no bound)
    # ... a tip that reaches less than this beyond the vertebral body's side is an articular process or a process's
    # root in the slab (lumbar tips reach 15-25 mm beyond it): the psoas is bounded by the neighbours' processes
    psoas_tip_beyond_body_mm: float = 12.0
    psoas_sheet_stop: bool = True  # muscle the belly's discs did not reach that stands out behind and lateral to the
    # psoas' centre by more than the disc's radius is the quadratus lumborum lying on it with no fat plane: the grown
    # and closed outline stop at it (False: off)
    psoas_contact_mm: float = 3.0  # where the psoas touches that quadratus sheet, its outline continues the oval of
    # its free outline (a fusiform muscle, oval in section): belly pixels beyond the oval fitted to the outline facing
    # fat or bone and within this of the sheet are the quadratus (the belly's discs fill the corner of the contact by
    # a few millimetres); the fit must be an oval matching the free outline, else nothing is cut (0: off)
    psoas_gutter: bool = True  # fainter tissue the HU drop cut off behind the vertebral body's centre and medial to
    # the psoas, joined to it, is its intramuscular fat, not an organ: given back (``_belly``; False: off)
    psoas_gutter_again: bool = True  # ... and the belly is found again with that tissue never cut, so its discs reach
    # the psoas' part behind it (a fat streak across the back of the belly left a neck they could not pass; False: off)
    psoas_lateral_waist: float = 1.0  # a round body pressed on the psoas' lateral edge (the kidney's lower pole,
    # the colon) is parted at a waist between two notches shorter than this times the smaller part's diameter
    # (``_belly_found``; 0: off)
    psoas_fragment_mm: float = 5.0  # pieces of muscle lying wholly within this of the belly, parted from it by
    # intramuscular fat, are its own (a fatty psoas' edge fascicles; ``_fragments``); 0: off
    box_contact_max: float = 0.3  # a psoas lies inside its search box (at most this share of its outline on the box)
    tp_thickness_mm: float = 6.0  # a lumbar transverse process's depth (front to back) near its root
    disc_margin_mm: float = 3.0  # the vertebral body's outline grown by this holds its disc (not organ-like tissue)
    erector_lateral_mm: float = 70.0  # without a transverse process on the slice (a disc)
    erector_lateral_max_mm: float = 85.0
    tp_context_mm: float = 10.0  # a slice without a transverse process takes those of slices this near, or half
    # the vertebral pitch where that is known and farther (process_reach_mm); 0: off
    raphe_beyond_tip_mm: float = 25.0  # the lateral raphe lies about this far beyond the transverse process tip
    tp_min_lat_mm: float = 27.0  # a transverse process reaches at least this far from the midline
    canal_to_wall_mm: float = 8.0  # the vertebral body's posterior wall lies this far in front of the canal's centre
    erector_front_mm: float = 12.0  # the erector lies this far or more behind the vertebral body centre + half height
    named_core_max_hu: float = 100.0  # stricter window for separating named muscles from enhancing organs
    core_smooth_max_hu: float = 80.0  # ... applied to a lightly smoothed image (sigma core_smooth_mm) as well
    core_smooth_mm: float = 1.0
    envelope_min_lat_mm: float = 8.0  # bone this far from the midline (laminae, transverse processes, ribs)
    envelope_max_depth_mm: float = 70.0  # ... and at most this far behind the vertebral body centre + half height
    floor_hold_mm: float = 10.0  # the floor beyond the vertebra's outermost bone is held at its last 10 mm
    rib_margin_mm: float = 10.0  # erector spinae (iliocostalis) reaches about 1 cm beyond the rib angles
    rib_angle_min_lat_mm: float = 40.0  # a rib angle lies this far or more from the midline
    rib_wall: bool = True  # between two ribs the erector lies behind the ribs of the slices within reach (False: off)
    erector_sheet_mm: float = 4.0  # where ribs lie beside it, the outer layer under the fat is latissimus dorsi,
    # serratus posterior inferior, trapezius and fascia: not erector
    erector_fascia_mm: float = 1.0  # below the ribs only the thoracolumbar fascia (about 1 mm) covers it (latissimus
    # is aponeurotic there): a wider margin cut a whole pixel layer of erector off at 2 mm pixels
    sat_channel_mm: float = 1.5  # fat reached through a channel narrower than twice this is not subcutaneous
    erector_open_mm: float = 4.0  # thinner sheets (latissimus dorsi, serratus posterior) are cut off the erector
    erector_close_mm: float = 4.0  # the compartment: fat clefts and concavities narrower than twice this are inside it
    psoas_outline_mm: float = 3.0  # the psoas is its outline: fat specks and notches narrower than twice this are in
    process_gap_mm: float = 12.0  # L2-L5: a bone piece this near beyond the vertebra's bone is its process's tip
    ilium_min_mm2: float = 250.0  # a bone piece beside the erector this large is the iliac wing (a rib's section at
    # its angle is 50-150 mm2: 134 at most on the real CT): the erector lies medial to the posterior iliac crest,
    # the gluteal muscles lateral to it (phantom L5-L1 erector Dice 0.865/0.870 -> 0.876/0.885, L5 min 0.63 -> 0.66)
    erector_smooth_mm: float = 1.0  # one-pixel spurs and notches of the outline are partial volume, not anatomy
    min_bone_piece_mm2: float = 20.0  # smaller pieces above bone_hu are vessels or noise, not a bony landmark
    bridge_mm: float = 2.0  # connections thinner than about twice this are cut between components
    psoas_bridge_mm: float = 1.0  # ... for the psoas (never under a pixel): its own rules part it from organs, and a
    # wider opening erases the muscle strands between a fatty psoas' specks
    # image noise: a slice whose pixel noise (estimated from neighbouring-pixel differences in soft tissue) is
    # above noise_smooth_above_hu is smoothed for segmentation only (measurements read the original HU)
    noise_smooth_above_hu: float = 20.0
    noise_target_hu: float = 12.0
    noise_max_sigma_mm: float = 2.0
    # C3
    scm_depth_mm: float = 30.0  # the sternocleidomastoid lies within this of the skin
    scm_min_mm2: float = 80.0
    prevertebral_mm: float = 8.0  # longus colli/capitis in front of the vertebral body belong to the paravertebrals
    neck_lateral_mm: float = 90.0
    posterior_piece_min_mm2: float = 150.0  # posterior neck muscle pieces apart from the spine count from this size
    # the sternocleidomastoid's border with the muscles behind it (levator scapulae, scalenes, splenius) is the
    # region's posterior bound, a line, where its tissue runs on across it with no fat plane over this share of its
    # equivalent diameter: that side's two areas are not evaluable, their sum (Swartz's C3 area) still is
    scm_joined_frac: float = 0.4


# --------------------------------------------------------------------------------------------
# trunk


@dataclass(frozen=True)
class Trunk:
    body: NDArray[np.bool_]  # the trunk (or neck), arms removed, holes filled
    limbs: NDArray[np.bool_]  # what was cut off as limbs (joined components and separate ones)
    notes: tuple[str, ...]


def _seed_inside(mask: NDArray[np.bool_], rc: tuple[float, float]) -> tuple[int, int] | None:
    r, c = int(round(rc[0])), int(round(rc[1]))
    if 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] and mask[r, c]:
        return r, c
    return None


def trunk_of(hu: NDArray[np.float32], spacing: tuple[float, float], centre_rc: tuple[float, float],
             p: TissueParams) -> Trunk:
    """The trunk (or neck) on one slice, with limbs that touch it cut off at their skin contact."""
    dy, dx = spacing
    lab, n = ndi.label(hu > -500)
    empty = np.zeros(hu.shape, bool)
    if n == 0:
        return Trunk(empty, empty, ("no body on the slice",))
    seed = _seed_inside(lab > 0, centre_rc)
    if seed is not None:
        tid = int(lab[seed])
    else:
        sizes = label_sizes(lab, n)
        tid = int(np.argmax(sizes)) + 1
    body = fill_holes(np.asarray(lab == tid))
    # other components of limb size holding limb bone are limbs (arms lying apart)
    others = (lab > 0) & (lab != tid)
    bone_all = hu > p.bone_hu
    limbs = np.zeros(hu.shape, bool)
    if others.any():
        bone_px = ndi.sum_labels(bone_all, lab, index=np.arange(1, n + 1))
        size_px = label_sizes(lab, n)
        # ... and thick (the table and its mattress are thin sheets, a limb is round)
        thick = ndi.maximum(ndi.distance_transform_edt(lab > 0, sampling=spacing), lab, index=np.arange(1, n + 1))
        is_limb = np.concatenate([[False], (bone_px * dy * dx >= p.limb_bone_min_mm2)
                                  & (size_px * dy * dx / 100.0 >= p.limb_min_area_cm2)
                                  & (np.asarray(thick) >= p.limb_min_depth_mm)])
        is_limb[tid] = False
        limbs |= is_limb[lab]
    notes: list[str] = []
    # limbs joined to the trunk: a large bone piece away from the vertebra whose deep surroundings part
    # from the trunk's when the body is eroded (a neck much thinner than the limb)
    # depth on the body as it is (holes open): an arm touching the trunk at two points encloses an
    # air gap that hole filling would turn into a thick bridge
    solid = np.asarray(lab == tid)
    depth = ndi.distance_transform_edt(solid, sampling=spacing)
    bone = bone_all & body
    blab, bn = ndi.label(fill_holes(bone))
    if bn:
        bsize = label_sizes(blab, bn) * dy * dx
        big = np.nonzero(bsize >= p.limb_bone_min_mm2)[0] + 1
    else:
        big = np.zeros(0, int)
    seed = _seed_inside(body, centre_rc)
    if big.size and seed is not None:
        # vertebra, aorta and anything this close to the vertebra are trunk, never limb bone
        com = np.asarray(ndi.center_of_mass(np.ones(blab.shape), blab, big), dtype=np.float64).reshape(-1, 2)
        off_r, off_c = (com[:, 0] - seed[0]) * dy, (com[:, 1] - seed[1]) * dx
        far = np.hypot(off_r, off_c) >= p.limb_min_dist_mm
        # arms lie beside the trunk: the sternum (in front) and scapulae (behind) are never limb bone
        beside = np.abs(off_c) > np.abs(off_r)
        big = big[far & beside]
    if big.size and seed is not None:
        yy, xx = np.ogrid[: hu.shape[0], : hu.shape[1]]
        core = body & (((yy - seed[0]) * dy) ** 2 + ((xx - seed[1]) * dx) ** 2 <= 15.0**2)
        # erode the body step by step (depth > t): a limb's deep part comes apart from the trunk's
        # once t passes half its contact; ribs and scapulae never do (they sink into the trunk)
        cores: list[NDArray[np.bool_]] = []
        necks: list[float] = []
        todo = [blab == bb for bb in big]
        for t in np.arange(2.0, 2.0 * p.limb_min_depth_mm + 1e-6, 2.0):
            if not todo:
                break
            lab_t, _ = ndi.label(solid & (depth > t))
            trunk_ids = set(np.unique(lab_t[core]).tolist()) - {0}
            if not trunk_ids:
                break
            left = []
            for bm in todo:
                ids = set(np.unique(lab_t[bm]).tolist()) - {0} - trunk_ids
                if not ids:
                    left.append(bm)
                    continue
                comp = np.isin(lab_t, list(ids))
                deep = float(depth[comp].max())
                if deep >= p.limb_min_depth_mm and t <= p.limb_neck_ratio * deep:
                    cores.append(comp)
                    necks.append(float(t))
            todo = left
        if cores:
            # the basins' shallow rims are shared with the trunk: every body pixel goes to the nearest
            # deep part (the limb's beyond its neck, or the trunk's)
            seeds = np.zeros(hu.shape, np.int16)
            seeds[solid & (depth > max(necks))] = 1
            for i, c in enumerate(cores):
                seeds[c] = i + 2
            _, (ri, ci) = ndi.distance_transform_edt(seeds == 0, sampling=spacing, return_indices=True)
            owner = np.where(body, seeds[ri, ci], 0)
            for i, neck in enumerate(necks):
                b = owner == i + 2
                limbs |= b
                body = body & ~b
                notes.append(f"limb of {float(b.sum()) * dy * dx / 100.0:.0f} cm2 joined to the trunk by a "
                             f"{2 * neck:.0f} mm contact cut off")
        body = components_touching(body, core) if (body & core).any() else body
    for note in notes:
        log.debug("trunk: %s", note)
    return Trunk(np.asarray(body), np.asarray(limbs), tuple(notes))


# --------------------------------------------------------------------------------------------
# lumbar named muscles and the paraspinal compartment


@dataclass(frozen=True)
class _Floor:
    ok: NDArray[np.bool_]  # behind the floor and medial to the rib angle
    ribs: bool  # a rib lies beside the compartment
    tip: float | None  # lateral reach of the vertebra's bone behind the body's wall (mm), None without
    line: NDArray[np.floating[Any]] | None  # the floor (mm behind the centre) per crop column, None without bone
    lat_out: float | None  # lateral reach of the vertebra's own bone (mm)
    lateral_ok: NDArray[np.bool_] | None = None  # medial to the rib angle (None: no rib bound)
    bone_post: NDArray[np.floating[Any]] | None = None  # the most posterior bone per crop column (NaN: none)


def _posterior_floor(bone: NDArray[np.bool_], ymm: NDArray[np.floating[Any]], lat: NDArray[np.floating[Any]],
                     hh: float, px_area_mm2: float, p: TissueParams, ribs_possible: bool | None = None) -> _Floor:
    """Where one side's paraspinal muscles may lie: behind the posterior bony floor, medial to the rib angle.

    Also returns whether a rib (a bone apart from the vertebra whose most posterior point lies at least
    ``rib_angle_min_lat_mm`` from the midline) lies beside it, and how far
    from the midline the vertebra's outermost bone reaches (the transverse process tip; None without).

    Anatomy: the erector spinae (and transversospinales) fill the groove behind the laminae and
    transverse processes, and in the thorax behind the rib necks, medial to the rib angles; the
    liver, kidney and quadratus lumborum lie in front of that bony floor.  Per column, the floor is
    the most posterior bone pixel (laminae, transverse processes, ribs; the spinous process in the
    midline is left out), linearly interpolated across columns without bone and held constant
    beyond the outermost one.  A bone component that is not joined to the vertebra in this slice
    (a rib, or the iliac crest low in the lumbar spine) bounds the compartment laterally at its
    most posterior point (the rib angle) where that lies ``rib_angle_min_lat_mm`` or more from the
    midline; a piece nearer the midline is a vertebral process parted from the vertebra by partial
    volume.  A piece of ``ilium_min_mm2`` or more is the iliac wing, not a rib: the compartment ends at its
    most posterior point, without the rib's margin (the gluteal muscles lie lateral to the crest), and it does
    not count as a rib beside the compartment.  Without lateral bone (a disc slice) nothing is removed.
    Where no rib can lie (``ribs_possible`` False: L2-L5), a smaller piece whose medial end lies within
    ``process_gap_mm`` beyond the vertebra's bone is the transverse process's tip parted from it by partial
    volume (an oblique process on a thick slice) and counts as the vertebra's; one farther out bounds nothing.
    """
    side = (lat > p.envelope_min_lat_mm) & (ymm > -hh) & (ymm < hh + p.envelope_max_depth_mm)
    b = bone & side
    ok = np.ones(bone.shape, bool)
    if not b.any():
        return _Floor(ok, False, None, None, None)
    # enhancing vessels (segmental, intercostal) are small: keep bone pieces of rib size and up
    lab, n = ndi.label(b)
    sizes = label_sizes(lab, n) * px_area_mm2
    b = np.concatenate([[False], sizes >= p.min_bone_piece_mm2])[lab]
    if not b.any():
        return _Floor(ok, False, None, None, None)
    # pieces less than ~2 mm apart (a transverse process split by partial volume) count as one
    join = max(1.0, 1.0 / float(np.sqrt(px_area_mm2)))
    lab, n = ndi.label(dilate(b, join))
    lab = np.where(b, lab, 0)
    medial_lat = label_min(lat, lab, n)
    # pieces joined to the vertebra reach the midline cut (body, lamina: a few mm apart at most)
    vert_ids = np.nonzero(medial_lat <= float(np.min(medial_lat)) + 3.0)[0] + 1
    vmask = np.isin(lab, vert_ids)
    if ribs_possible is False and n > len(vert_ids):
        # no ribs here: pieces in line beyond the vertebra's bone are its processes' tips
        piece_mm2 = label_sizes(lab, n) * px_area_mm2
        reach = float(np.broadcast_to(lat, b.shape)[vmask].max())
        tips = [i + 1 for i in range(n) if i + 1 not in vert_ids and piece_mm2[i] < p.ilium_min_mm2
                and medial_lat[i] <= reach + p.process_gap_mm]
        if tips:
            vert_ids = np.concatenate([vert_ids, np.asarray(tips, dtype=vert_ids.dtype)])
            vmask = np.isin(lab, vert_ids)
    lat_row = lat[0]
    ymm_b = np.broadcast_to(ymm, b.shape)
    post = np.where(b, ymm_b, -np.inf).max(axis=0)
    bone_post = np.where(np.isfinite(post), post, np.nan)
    cols = np.nonzero(b.any(axis=0))[0]
    ys = post[cols]
    vcols = np.nonzero(vmask.any(axis=0))[0]
    tip_lat = None
    lat_out: float | None = None
    if vcols.size:
        lat_out = float(lat_row[vcols].max())
        # the transverse process: the vertebra's bone behind the body's posterior wall (not the body's own rim)
        post = np.nonzero((vmask & (ymm_b > hh)).any(axis=0))[0]
        tip_lat = float(lat_row[post].max()) if post.size else None
        tip = vmask & (np.broadcast_to(lat, b.shape) >= lat_out - p.floor_hold_mm)
        hold = float(ymm_b[tip].max())
        in_tip = lat_row[cols] >= lat_out - p.floor_hold_mm
        ys = np.where(in_tip, np.maximum(ys, hold), ys)
    order = np.argsort(lat_row[cols])
    floor = np.interp(lat_row, lat_row[cols][order], ys[order])
    ok &= ymm > floor[None, :]
    rib = False
    if n > 1:
        bounds = []
        for i in range(1, n + 1):
            if i in vert_ids or not (lab == i).any():
                continue
            rr, cc = np.nonzero(lab == i)
            j = int(np.argmax(ymm[rr, 0]))
            # a rib's angle lies well lateral; a piece nearer the midline is a vertebral process parted
            # from the vertebra by partial volume (an articular process), not a rib
            if lat_row[cc[j]] >= p.rib_angle_min_lat_mm:
                if rr.size * px_area_mm2 >= p.ilium_min_mm2:  # the iliac wing: the erector lies medial to its crest
                    bounds.append(float(lat_row[cc[j]]) - p.rib_margin_mm)
                elif ribs_possible is not False:
                    rib = True
                    bounds.append(float(lat_row[cc[j]]))
        if bounds:
            lateral_ok = np.broadcast_to(lat < min(bounds) + p.rib_margin_mm, bone.shape)
            ok &= lateral_ok
            return _Floor(ok, rib, tip_lat, floor, lat_out, np.asarray(lateral_ok), bone_post)
    return _Floor(ok, rib, tip_lat, floor, lat_out, None, bone_post)


def _blobs(solid: NDArray[np.bool_], dt: NDArray[np.floating[Any]], px: float, kappa: float
           ) -> tuple[NDArray[np.int32], dict[int, int]]:
    """``solid`` parted into round blobs by its distance transform ``dt``: flooding down from the deepest points,
    two parts that meet at a level ``t`` (half the width of the neck between them) stay two where ``t`` is below
    ``kappa`` times each one's inscribed radius (else the shallower joins the deeper); pixels below the meeting
    level go to the nearer part.  Returns the blob label per pixel (0 outside) and each blob's deepest pixel
    (flat index).

    Each level works on the bounding box of what lies above it, and each part of it on that part's own box (the
    deep levels are small): the same labels as over the whole image."""
    owner = np.zeros(solid.shape, np.int32)
    top: dict[int, float] = {}
    deepest: dict[int, int] = {}
    if not solid.any():
        return owner, deepest
    step = 0.5 * px
    dmax = float(dt[solid].max())
    flat = np.where(solid, dt, -1.0)
    width = solid.shape[1]
    eight = np.ones((3, 3))
    next_id = 0  # a blob's label is never reused (a merged blob's label is gone)
    for t in np.arange(dmax, 0.5 * px, -step):
        level = solid & (dt >= t - 1e-9)
        rows = np.flatnonzero(level.any(axis=1))
        if rows.size == 0:
            continue
        cols = np.flatnonzero(level.any(axis=0))
        box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        comps, n = ndi.label(level[box], structure=eight)
        own_box, flat_box = owner[box], flat[box]  # views
        for c, part in enumerate(ndi.find_objects(comps), start=1):
            if part is None:
                continue
            comp = comps[part] == c
            own = own_box[part]
            ids = [int(v) for v in np.unique(own[comp]) if v > 0]
            if not ids:  # a new deepest point
                r = next_id = next_id + 1
                fl = np.where(comp, flat_box[part], -1.0)
                i = int(np.argmax(fl))
                top[r] = float(fl.flat[i])
                rr, cc = divmod(i, comp.shape[1])
                deepest[r] = (int(rows[0]) + part[0].start + rr) * width + int(cols[0]) + part[1].start + cc
                own[comp] = r
                continue
            ids.sort(key=lambda r_: -top[r_])
            keep = [ids[0]] + [r_ for r_ in ids[1:] if t < kappa * top[r_]]
            for r_ in ids[1:]:
                if r_ not in keep:  # a shallow part on a wide neck: the same blob
                    own[own == r_] = ids[0]
                    del top[r_], deepest[r_]
            new = comp & (own == 0)
            if len(keep) == 1:
                own[new] = keep[0]
            elif new.any():
                seeds = np.where(comp & np.isin(own, keep), own, 0)
                _, (ri, ci) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
                own[new] = seeds[ri[new], ci[new]]
    rest = solid & (owner == 0)
    if rest.any() and (owner > 0).any():
        _, (ri, ci) = ndi.distance_transform_edt(owner == 0, return_indices=True)
        owner[rest] = owner[ri[rest], ci[rest]]
    return owner, deepest


def _filled_hull(mask: NDArray[np.bool_], tol: float) -> NDArray[np.bool_] | None:
    """The convex hull of ``mask``'s outline pixel centres, filled (pixels within ``tol`` of it count); None when
    the outline is degenerate (fewer than 3 points, or collinear)."""
    from scipy.spatial import ConvexHull, QhullError

    pts = np.argwhere(mask & ~ndi.binary_erosion(mask)).astype(np.float64)
    if len(pts) < 3:
        return None
    try:
        hull = ConvexHull(pts)
    except QhullError:
        return None
    # only pixels within the outline's box (widened by ``tol``) can lie in the hull: test those
    lo = np.maximum(np.floor(pts.min(axis=0) - tol).astype(int), 0)
    hi = np.minimum(np.ceil(pts.max(axis=0) + tol).astype(int) + 1, mask.shape)
    rr, cc = np.mgrid[lo[0] : hi[0], lo[1] : hi[1]]
    q = np.stack([rr.ravel(), cc.ravel(), np.ones(rr.size)], axis=1)
    out = np.zeros(mask.shape, bool)
    out[lo[0] : hi[0], lo[1] : hi[1]] = (q @ hull.equations.T <= tol).all(axis=1).reshape(rr.shape)
    return out


def _hull(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """The convex hull of ``mask`` (pixel centres), filled; ``mask`` itself when it has none."""
    h = _filled_hull(mask, 0.5)
    return mask if h is None else h


def _waist_cut(mask: NDArray[np.bool_], spacing: tuple[float, float], keep: tuple[int, int], min_depth_mm: float,
               max_ratio: float) -> tuple[float, NDArray[np.bool_]] | None:
    """Where ``mask`` is two round bodies pressed together: a waist between two notches of its outline (each at
    least ``min_depth_mm`` deep under its convex hull) shorter than ``max_ratio`` times the smaller part's
    equivalent diameter, each part at least a fifth of the whole.  Returns the shortest such waist's ratio and the
    part away from ``keep`` (row, column), or None without such a waist."""
    hull = _hull(mask)
    gaps = hull & ~mask
    depth = ndi.distance_transform_edt(hull, sampling=spacing)
    gl, gn = ndi.label(gaps)
    if gn < 2:
        return None
    deepest = []
    for g in range(1, gn + 1):
        d = np.where(gl == g, depth, -1.0)
        i = int(np.argmax(d))
        if float(d.flat[i]) >= min_depth_mm:
            deepest.append(np.unravel_index(i, mask.shape))
    best: tuple[float, NDArray[np.bool_]] | None = None
    total = float(mask.sum())
    for a in range(len(deepest)):
        for b in range(a + 1, len(deepest)):
            (r0, c0), (r1, c1) = deepest[a], deepest[b]
            length = float(np.hypot((r1 - r0) * spacing[0], (c1 - c0) * spacing[1]))
            n = int(np.ceil(2.0 * max(abs(r1 - r0), abs(c1 - c0)))) + 2
            line = np.zeros(mask.shape, bool)
            line[np.rint(np.linspace(r0, r1, n)).astype(int), np.rint(np.linspace(c0, c1, n)).astype(int)] = True
            parts, pn = ndi.label(mask & ~ndi.binary_dilation(line))
            if pn < 2:
                continue
            sizes = label_sizes(parts, pn)
            order = np.argsort(-sizes)
            if sizes[order[1]] < 0.2 * total:
                continue
            small = float(sizes[order[1]]) * spacing[0] * spacing[1]
            ratio = length / (2.0 * np.sqrt(small / np.pi))
            if ratio > max_ratio or (best is not None and ratio >= best[0]):
                continue
            # the part holding ``keep`` (or nearest to it) stays; the other big part goes
            mine = parts[keep] if parts[keep] > 0 else order[0] + 1
            if parts[keep] == 0:
                _, (ri, ci) = ndi.distance_transform_edt(parts == 0, return_indices=True)
                mine = parts[ri[keep], ci[keep]]
            other = order[1] + 1 if mine == order[0] + 1 else order[0] + 1
            best = (ratio, parts == other)
    return best


def _belly(cand: NDArray[np.bool_], core: NDArray[np.bool_],
           xy: tuple[NDArray[np.floating[Any]], NDArray[np.floating[Any]]], seed: tuple[float, float],
           spacing: tuple[float, float], frac: float, close_mm: float,
           hu_local: NDArray[np.floating[Any]] | None = None, drop_hu: float = 0.0, min_low_mm2: float = 50.0,
           ref_at: tuple[float, float, float] | None = None, front_y: float | None = None, neck_frac: float = 0.7,
           waist_depth_mm: float = 3.0, waist_ratio: float = 0.8, gutter: bool = False, lateral_ratio: float = 0.0,
           again: bool = False) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """:func:`_belly_found` (the belly and what is not psoas); with ``gutter`` the fainter tissue it cut off behind the
    vertebral body's centre and medial to the seed, joined to the belly, is given back to it (:func:`_gutter`).

    Anatomy: between the psoas, the vertebral body and the transverse process' root no organ lies (the kidney is
    lateral to the psoas; bowel, vessels, nodes and ureter in front of it), so fainter tissue there is the psoas'
    own intramuscular fat in partial volume, as in a fatty psoas: a 3 mm fat blob cut 40 % of a thin phantom's
    psoas on the slice above L3's middle.  It is given back after the belly is found, so the cut still parts the
    quadratus lumborum lying behind and lateral to it, and only where it is as thick as the belly (what discs of
    ``frac`` times its inscribed radius reach): a strip down behind the psoas toward the process is intertransverse
    and quadratus tissue.

    With ``again`` the belly is then found once more with the given-back tissue never cut (``spare``), and what the
    gutter gives back to that belly is added: a fainter streak across the back of the belly left a neck, between
    it and the vertebral body, that the discs could not pass, so the psoas' normal tissue behind the streak was
    lost with it (average phantom, seed 7, no contact: -24 %).  The second look stands only if it keeps the first
    belly (95 %) and nothing it adds stands out behind and lateral to the first belly's centre by more than the
    disc's radius (:func:`_sheets_behind`): through a fainter seam between the psoas and the quadratus lumborum it
    reached the quadratus' medial lobe (thin phantom with every contact and contrast, seed 7: +8 % -> +66 %)."""
    found = (cand, core, xy, seed, spacing, frac, close_mm, hu_local, drop_hu, min_low_mm2, ref_at, front_y,
             neck_frac, waist_depth_mm, waist_ratio, lateral_ratio)
    belly, excl = _belly_found(*found)
    if not gutter or not belly.any():
        return belly, excl
    give = _gutter(belly, excl, cand, xy, seed, spacing, frac, close_mm)
    if again and give.any():
        belly2, excl2 = _belly_found(*found, spare=give)
        # what the second look adds is the psoas' own back, under or medial to its centre; a piece standing out
        # behind and lateral to it is the quadratus lumborum reached through the given-back seam (as the sheet stop
        # judges it), and the first look stands; so it does where the second loses part of the first (its discs,
        # grown with the streak filled, no longer pass a neck the first passed: it kept 98-100 % on the phantoms)
        kept = float((belly2 & belly).sum()) >= 0.95 * float(belly.sum())
        if kept and not _sheets_behind(belly | give, belly2, xy, float(np.sign(seed[0])), spacing, frac,
                                       close_mm).any():
            belly, excl = belly2, excl2
            give = _gutter(belly, excl, cand, xy, seed, spacing, frac, close_mm)
    return belly | give, excl & ~give


def _gutter(belly: NDArray[np.bool_], excl: NDArray[np.bool_], cand: NDArray[np.bool_],
            xy: tuple[NDArray[np.floating[Any]], NDArray[np.floating[Any]]], seed: tuple[float, float],
            spacing: tuple[float, float], frac: float, close_mm: float) -> NDArray[np.bool_]:
    """The tissue of ``excl`` that :func:`_belly` gives back to ``belly``: candidates behind the vertebral body's
    centre and medial to the seed, as thick as the belly, joined to it."""
    side = float(np.sign(seed[0]))
    xm, ym = np.broadcast_to(xy[0], cand.shape), np.broadcast_to(xy[1], cand.shape)
    back = excl & cand & (ym > 0.0) & (side * xm <= side * seed[0])
    # only what is as thick as the belly (reached by discs of ``frac`` times its inscribed radius, as the belly
    # itself): a strip down behind it toward the process is intertransverse and quadratus tissue, not psoas
    px = float(min(spacing))
    r_in = float(ndi.distance_transform_edt(_solid(belly, spacing, close_mm), sampling=spacing).max())
    back &= opening(_solid(belly | back, spacing, close_mm), max(frac * r_in / px, 1.0))
    lab, n = ndi.label(back)
    if not n:
        return np.zeros(cand.shape, bool)
    ids = np.unique(lab[ndi.binary_dilation(belly) & back])
    return np.asarray(np.isin(lab, ids[ids > 0]))


def _belly_found(cand: NDArray[np.bool_], core: NDArray[np.bool_],
                 xy: tuple[NDArray[np.floating[Any]], NDArray[np.floating[Any]]], seed: tuple[float, float],
                 spacing: tuple[float, float], frac: float, close_mm: float,
                 hu_local: NDArray[np.floating[Any]] | None = None, drop_hu: float = 0.0, min_low_mm2: float = 50.0,
                 ref_at: tuple[float, float, float] | None = None, front_y: float | None = None,
                 neck_frac: float = 0.7, waist_depth_mm: float = 3.0, waist_ratio: float = 0.8,
                 lateral_ratio: float = 0.0, spare: NDArray[np.bool_] | None = None
                 ) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """The round muscle belly around ``core``, with flat sheets and other bellies joined to it cut off.

    Anatomy: the psoas major is a fusiform muscle, round to oval in cross-section; what touches it
    on CT at the same HU is flatter (quadratus lumborum posterolaterally, the crus, the abdominal wall
    sheet) or another rounded organ joined by a narrower contact (a non-enhanced kidney, a bowel
    loop).  ``core`` (the component picked near the seed, fat specks closed) is opened by a disc of
    ``frac`` times its inscribed radius at its deepest point near the seed (within 15 mm of its
    pixel nearest the seed: a kidney joined to it may be deeper): the belly is what such discs reach
    sliding from that point without leaving the muscle, and the candidate pixels ``cand`` there
    (pieces of the same muscle split off by intramuscular fat).  A neck narrower than that disc, or
    a sheet thinner than it, is not psoas.  Computed with distance transforms (cheap for any radius).

    With ``hu_local`` (the muscle-window tissue's local mean HU, fat left out so the muscle's edge keeps its
    value): tissue more than ``drop_hu`` (or 2.5 x the spread of the local means there) below the median of the
    muscle at ``ref_at`` (x, y, radius in mm: against the vertebral body's side at mid-depth, where only psoas
    lies) is not psoas, and the belly is found again without it.  Unenhanced, what lies on the psoas with no fat
    plane is mostly fainter than muscle: kidney parenchyma 30-35 HU, bowel wall and fluid 10-40 HU, against
    40-60 HU of psoas (a fatty psoas of 30-40 HU cannot be parted from a kidney this way: its contact is cut only
    where it is narrow).

    With ``front_y`` (the vertebral body's anterior surface, mm): the candidates are parted into round blobs
    (``_blobs``: a neck narrower than ``neck_frac`` times the smaller one's inscribed diameter parts two); the
    psoas' blob is the one at ``ref_at``, and a blob at least half as thick centred in front of the vertebral body
    or in front of the psoas' centre by more than its inscribed radius (the duodenum, a bowel loop, the vena cava,
    a node lying on its anterior surface) is not psoas, whatever its HU.  Last, two round bodies pressed together
    with no neck are parted at a waist between two notches of the outline (``_waist_cut``: each notch
    ``waist_depth_mm`` deep, the waist shorter than ``waist_ratio`` times the smaller part's diameter) when the
    other part lies in front of the vertebral body, or (with ``lateral_ratio`` > 0, the waist shorter than that
    times the smaller part's diameter) when it lies lateral to the kept part: its centre farther out than the kept
    part's equivalent radius plus half its own.  Anatomy: at L3 the kidney's lower pole and the colon lie lateral
    to the psoas, and unenhanced they are at its HU (a fatty psoas of 30-40 HU and a kidney of 30-35 HU); two halves
    of one oval muscle parted at a notch lie closer together than that (their centres 0.85 times its radius apart,
    against 1.06 times it for the sum), so a psoas lobe is not cut.  ``spare``: tissue never cut as fainter (what
    :func:`_belly` gave back as the psoas' own).  Returns the belly and the tissue found not to be psoas (a grown or
    closed outline must not take it back).
    """
    belly, excl = _belly_cuts(cand, core, xy, seed, spacing, frac, close_mm, hu_local, drop_hu, min_low_mm2, ref_at,
                              front_y, neck_frac, spare)
    if ref_at is not None and belly.any():
        near = np.hypot(np.broadcast_to(xy[0], cand.shape) - ref_at[0],
                        np.broadcast_to(xy[1], cand.shape) - ref_at[1]) <= ref_at[2]
        if (near & cand).any() and not (belly & near).any():
            # what is left after the cuts is not against the vertebral body's side (a psoas split by fat into pieces
            # smaller than what lies on it keeps a neighbour's piece): no psoas, rather than that piece
            return np.zeros(cand.shape, bool), excl | belly
    if front_y is None or ref_at is None or not belly.any():
        return belly, excl
    # two round bodies pressed together with no neck (the duodenum lying across the psoas' front, the kidney's
    # lower pole against its lateral edge): a waist between two notches of the outline; the part in front of the
    # vertebral body, or lateral to the kept part, is not psoas
    xb, yb = np.broadcast_to(xy[0], cand.shape), np.broadcast_to(xy[1], cand.shape)
    keep = np.unravel_index(int(np.argmin(np.hypot(xb - ref_at[0], yb - ref_at[1]))), cand.shape)
    solid = _solid(belly, spacing, close_mm)
    found = _waist_cut(solid, spacing, (int(keep[0]), int(keep[1])), waist_depth_mm, max(waist_ratio, lateral_ratio))
    if found is None:
        return belly, excl
    ratio, cut = found
    parted = ratio <= waist_ratio and float(yb[cut].mean()) < front_y
    if not parted and ratio <= lateral_ratio:
        kept = solid & ~cut
        area = spacing[0] * spacing[1] / np.pi
        side = float(np.sign(seed[0]))
        beyond = side * (float(xb[cut].mean()) - float(xb[kept].mean()))
        parted = beyond > float(np.sqrt(kept.sum() * area)) + 0.5 * float(np.sqrt(cut.sum() * area))
    if not parted:
        return belly, excl
    return belly & ~cut, excl | (cut & cand)


def _belly_cuts(cand: NDArray[np.bool_], core: NDArray[np.bool_],
                xy: tuple[NDArray[np.floating[Any]], NDArray[np.floating[Any]]], seed: tuple[float, float],
                spacing: tuple[float, float], frac: float, close_mm: float,
                hu_local: NDArray[np.floating[Any]] | None, drop_hu: float, min_low_mm2: float,
                ref_at: tuple[float, float, float] | None, front_y: float | None, neck_frac: float,
                spare: NDArray[np.bool_] | None = None) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """:func:`_belly` up to its waist cut: fainter tissue (never in ``spare``) and blobs in front cut off."""
    low = np.zeros(core.shape, bool)
    xm, ym = xy
    if hu_local is not None and drop_hu > 0 and ref_at is not None:
        inner = cand & (np.hypot(np.broadcast_to(xm, cand.shape) - ref_at[0],
                                 np.broadcast_to(ym, cand.shape) - ref_at[1]) <= ref_at[2])
        if int(inner.sum()) >= 10:
            vals = hu_local[inner]
            ref = float(np.median(vals))
            # the muscle's own spread of local means (its noise and texture) widens the margin
            spread = 1.4826 * float(np.median(np.abs(vals - ref)))
            low = cand & (hu_local < ref - max(drop_hu, 2.5 * spread))
            if spare is not None:
                low &= ~spare
            # a fainter organ is a region, not scattered noise pixels
            lab, n = ndi.label(low)
            if n:
                sizes = label_sizes(lab, n) * spacing[0] * spacing[1]
                low = np.concatenate([[False], sizes >= min_low_mm2])[lab]
    rest = cand & ~low
    solid = _solid(rest, spacing, close_mm)
    dt = ndi.distance_transform_edt(solid, sampling=spacing)
    belly, centre = _belly_once(rest, core & ~low, xy, seed, spacing, frac, close_mm, (solid, dt))
    if front_y is None or not centre.any():
        return belly, low
    # a round blob joined to the psoas by a neck narrower than it, centred in front of the vertebral body (the
    # duodenum, a bowel loop, the vena cava, a node): not psoas, whatever its HU
    px = float(min(spacing))
    blobs, deepest = _blobs(solid, dt, px, neck_frac)
    yb = np.broadcast_to(ym, cand.shape)
    own = np.unique(blobs[centre & (blobs > 0)])
    if ref_at is not None and (blobs > 0).any():
        # the psoas' blob is the one against the vertebral body's side at mid-depth (the belly found so far may be
        # centred on a deeper organ lying on it)
        d = np.hypot(np.broadcast_to(xm, cand.shape) - ref_at[0], yb - ref_at[1])
        j = int(np.argmin(np.where(blobs > 0, d, np.inf)))
        if float(d.flat[j]) <= ref_at[2]:
            own = np.array([blobs.flat[j]])
    # ... or in front of the psoas' own centre by more than its inscribed radius (lying on its anterior surface)
    own_front = min((float(yb.flat[deepest[int(r)]]) - float(dt.flat[deepest[int(r)]]) for r in own
                     if int(r) in deepest), default=front_y)
    own_r = max((float(dt.flat[deepest[int(r)]]) for r in own if int(r) in deepest), default=0.0)
    # (a round body, at least half as thick as the psoas: not a sliver of it parted by intramuscular fat)
    ahead = [r for r, i in deepest.items()
             if r not in own and float(yb.flat[i]) < max(front_y, min(own_front, front_y + 20.0))
             and float(dt.flat[i]) >= 0.5 * own_r]
    if not ahead:
        return belly, low
    other = solid & np.isin(blobs, ahead)
    belly, _ = _belly_once(rest & ~other, core & ~low & ~other, xy, seed, spacing, frac, close_mm)
    return belly, low | other


def _sheets_behind(belly: NDArray[np.bool_], core: NDArray[np.bool_],
                   xy: tuple[NDArray[np.floating[Any]], NDArray[np.floating[Any]]], side: float,
                   spacing: tuple[float, float], frac: float, close_mm: float) -> NDArray[np.bool_]:
    """The pieces of ``core`` (the muscle component the belly was found in) left outside ``belly`` that reach farther
    from it than the belly's disc radius (``frac`` times its inscribed radius) and are centred behind and lateral
    (``side``: +1 left, -1 right, as ``xy``'s first axis) to its deepest point.

    Anatomy: the quadratus lumborum lies posterolateral to the psoas, in front of the transverse process, and often
    touches it with no fat plane; the belly's opening cuts its sheet off, but growing the belly back into the muscle
    window, or closing its outline, took the sheet's part next to the contact again (a systematic +9..15 % psoas
    area on the anatomical phantoms, most of it quadratus).  What the discs missed within their radius of the belly
    is the psoas' own irregular edge (a fatty psoas' rim, a nub) and stays growable; what lies in front or medial
    to its centre (a kidney taken as the belly, the crus) is left to the other rules."""
    sheet = core & ~belly
    lab, n = ndi.label(sheet)
    if n == 0 or not belly.any():
        return np.zeros(belly.shape, bool)
    dt = ndi.distance_transform_edt(_solid(belly, spacing, close_mm), sampling=spacing)
    i = int(np.argmax(dt))
    rho = frac * float(dt.flat[i])
    far = ndi.distance_transform_edt(~belly, sampling=spacing)
    xb, yb = np.broadcast_to(xy[0], belly.shape), np.broadcast_to(xy[1], belly.shape)
    idx = np.arange(1, n + 1)
    reach = np.asarray(ndi.maximum(far, lab, index=idx), dtype=np.float64)
    mx = np.asarray(ndi.mean(xb, lab, index=idx), dtype=np.float64)
    my = np.asarray(ndi.mean(yb, lab, index=idx), dtype=np.float64)
    ok = (reach > rho) & (side * (mx - float(xb.flat[i])) > 0.0) & (my > float(yb.flat[i]))
    return np.asarray(np.concatenate([[False], ok])[lab])


def _fragments(belly: NDArray[np.bool_], cand: NDArray[np.bool_], excl: NDArray[np.bool_],
               spacing: tuple[float, float], within_mm: float) -> NDArray[np.bool_]:
    """The pieces of ``cand`` apart from ``belly`` (not in ``excl``) lying wholly within ``within_mm`` of it.

    Anatomy: fatty infiltration parts a psoas' fascicles at its edge; a fat speck opening onto the outline cuts a
    sliver off the component the belly was found in, and without it the outline's closing cannot bridge the speck
    (a 4-pixel medial sliver cost a thin phantom's psoas 14 % of its area).  Such a sliver lies within the
    outline's own scale.  What lies on the psoas (a node, the crus, the quadratus lumborum, bowel) reaches farther
    beyond it (6-11 mm on the phantoms' contacts), or was found not to be psoas already."""
    none = np.zeros(belly.shape, bool)
    if within_mm <= 0 or not belly.any():
        return none
    lab, n = ndi.label(cand & ~belly & ~excl)
    if n == 0:
        return none
    far = ndi.distance_transform_edt(~belly, sampling=spacing)
    reach = np.asarray(ndi.maximum(far, lab, index=np.arange(1, n + 1)), dtype=np.float64)
    ok = (reach <= within_mm) & (label_sizes(lab, n) <= 0.5 * float(belly.sum()))
    return np.asarray(np.concatenate([[False], ok])[lab])


def _fit_ellipse(x: NDArray[np.float64], y: NDArray[np.float64]
                 ) -> tuple[float, float, NDArray[np.float64], float, float] | None:
    """The ellipse through the points (``x``, ``y``) in mm by direct least squares (Fitzgibbon, Pilu & Fisher 1999,
    in Halir & Flusser's stable form): its centre, the matrix ``Q`` with ``d^T Q d = 1`` on it (``d`` the offset from
    the centre) and its semi-axes (short, long); None when the points fit no ellipse."""
    mx, my = float(x.mean()), float(y.mean())
    u, v = x - mx, y - my
    d1 = np.stack([u * u, u * v, v * v], axis=1)
    d2 = np.stack([u, v, np.ones_like(u)], axis=1)
    s1, s2, s3 = d1.T @ d1, d1.T @ d2, d2.T @ d2
    try:
        t = -np.linalg.solve(s3, s2.T)
    except np.linalg.LinAlgError:
        return None
    m = np.array([[0.0, 0.0, 0.5], [0.0, -1.0, 0.0], [0.5, 0.0, 0.0]]) @ (s1 + s2 @ t)
    _, vec = np.linalg.eig(m)
    vec = np.real(vec)
    cond = 4.0 * vec[0] * vec[2] - vec[1] ** 2
    if not (cond > 0).any():
        return None
    a1 = vec[:, int(np.argmax(cond > 0))]
    a, b, c = (float(w) for w in a1)
    d, e, f = (float(w) for w in t @ a1)
    den = b * b - 4.0 * a * c
    if den >= 0:
        return None
    x0, y0 = (2.0 * c * d - b * e) / den, (2.0 * a * e - b * d) / den
    f0 = a * x0 * x0 + b * x0 * y0 + c * y0 * y0 + d * x0 + e * y0 + f
    if f0 == 0:
        return None
    q = np.array([[a, 0.5 * b], [0.5 * b, c]]) / -f0
    lam = np.linalg.eigvalsh(q)
    if not (lam > 0).all():
        return None
    return x0 + mx, y0 + my, q, float(1.0 / np.sqrt(lam[1])), float(1.0 / np.sqrt(lam[0]))


def _beyond_oval(belly: NDArray[np.bool_], sheet: NDArray[np.bool_],
                 xy: tuple[NDArray[np.floating[Any]], NDArray[np.floating[Any]]], spacing: tuple[float, float],
                 within_mm: float) -> NDArray[np.bool_]:
    """The belly pixels beyond the oval of its free outline (its edge away from ``sheet``) and within ``within_mm``
    of ``sheet``: the corner of the contact its discs filled.

    Anatomy: psoas major is fusiform, oval in section at L3; where the quadratus lumborum lies on it with no fat
    plane, its edge there continues the oval of the rest of its outline (as a reader draws it).  Nothing is cut when
    the free outline is short (under half the edge), fits no oval, or the oval misses it by more than a pixel (an
    irregular or fatty psoas, a teardrop one): a tissue boundary is guessed only where the muscle's own shape says
    where it runs."""
    none = np.zeros(belly.shape, bool)
    px = float(min(spacing))
    edge = belly & ~ndi.binary_erosion(belly)
    near = ndi.distance_transform_edt(~sheet, sampling=spacing)
    free = edge & (near > 1.5 * px)
    if int(free.sum()) < 12 or free.sum() < 0.5 * edge.sum():
        return none
    xb, yb = np.broadcast_to(xy[0], belly.shape), np.broadcast_to(xy[1], belly.shape)
    fit = _fit_ellipse(xb[free].astype(np.float64), yb[free].astype(np.float64))
    if fit is None:
        return none
    x0, y0, q, short, long = fit
    if long > 3.0 * short:
        return none

    def radius(m: NDArray[np.bool_]) -> NDArray[np.float64]:  # 1 on the oval, in units of its size
        dx, dy = xb[m] - x0, yb[m] - y0
        return np.asarray(np.sqrt(q[0, 0] * dx * dx + 2.0 * q[0, 1] * dx * dy + q[1, 1] * dy * dy))

    if float(np.median(np.abs(radius(free) - 1.0))) * short > px:
        return none
    cand = belly & (near <= within_mm)
    out = np.zeros(belly.shape, bool)
    # beyond the oval by more than half a pixel (the outline's pixel centres lie on it)
    out[cand] = radius(cand) > 1.0 + 0.5 * px / short
    if out.sum() > 0.2 * belly.sum():
        return none
    return out


def _solid(mask: NDArray[np.bool_], spacing: tuple[float, float], close_mm: float) -> NDArray[np.bool_]:
    """``mask`` with its specks (closed by a disc of ``close_mm``) and holes filled."""
    px = float(min(spacing))
    return fill_holes(closing(mask, close_mm / px) | mask) if close_mm >= px else fill_holes(mask)


def _belly_once(cand: NDArray[np.bool_], core: NDArray[np.bool_],
                xy: tuple[NDArray[np.floating[Any]], NDArray[np.floating[Any]]], seed: tuple[float, float],
                spacing: tuple[float, float], frac: float, close_mm: float,
                solid_dt: tuple[NDArray[np.bool_], NDArray[np.floating[Any]]] | None = None
                ) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """:func:`_belly` without the HU check: the belly and its centre (the deep part the discs slide in).
    ``solid_dt``: ``cand``'s :func:`_solid` and its distance transform, where the caller has them."""
    if not core.any():
        return core, core
    px = float(min(spacing))
    if solid_dt is None:
        solid = _solid(cand, spacing, close_mm)
        dt = ndi.distance_transform_edt(solid, sampling=spacing)
    else:
        solid, dt = solid_dt
    xm, ym = xy
    dist = np.hypot(np.broadcast_to(xm, core.shape) - seed[0], np.broadcast_to(ym, core.shape) - seed[1])
    near = solid & (dist <= float(dist[core].min()) + 15.0)
    i = int(np.argmax(np.where(near, dt, -1.0)))
    rho = frac * float(dt.flat[i])
    if rho < 2.0 * px:  # too small to tell a neck from pixel noise
        return core, core & (dt >= 0.5 * float(dt.flat[i]))
    centres = dt >= rho
    cl, _ = ndi.label(centres)
    centres = cl == cl.flat[i]
    reach = ndi.distance_transform_edt(~centres, sampling=spacing) < rho + px
    return np.asarray(cand & solid & reach), np.asarray(centres)


def _crop(hu: NDArray[np.float32], spacing: tuple[float, float], anat: SliceAnatomy, p: TissueParams
          ) -> tuple[NDArray[np.float32], tuple[int, int, int, int], float, NDArray[np.bool_],
                     NDArray[np.float64], NDArray[np.float64]] | None:
    """The crop around the vertebra: HU, its bounds, the body's posterior wall (mm behind the centre),
    the patient's bone, and the crop's mm offsets from the centre (rows behind, columns to the left)."""
    dy, dx = spacing
    r0, c0 = anat.centre_rc
    hw, hh = anat.half_width_mm, anat.half_height_mm
    # the posterior compartments start at the body's posterior wall, just in front of the canal where the
    # finder traced it (the body's own half height is a smoothed maximum over neighbouring slices).  The
    # midline stays the body's centre column: the canal's centre, a voxel or so off it, moved the
    # medial cut and cost the right erector 0.035 Dice on the obese phantom with no gain on the real CT
    wall = hh  # the vertebral body's posterior wall, mm behind its centre
    if anat.canal_rc is not None:
        wall = min(max((anat.canal_rc[0] - r0) * dy - p.canal_to_wall_mm, 0.5 * hh), 2.0 * hh)
    lat_max = max(hw + p.psoas_lateral_mm, p.erector_lateral_mm, p.paraspinal_lateral_mm) + 20.0  # ribs beside it
    top, bottom = -hh - 50.0, wall + 120.0
    ra = max(0, int(np.floor(r0 + top / dy)))
    rb = min(hu.shape[0], int(np.ceil(r0 + bottom / dy)) + 1)
    ca = max(0, int(np.floor(c0 - lat_max / dx)))
    cb = min(hu.shape[1], int(np.ceil(c0 + lat_max / dx)) + 1)
    crop = hu[ra:rb, ca:cb]
    if crop.size == 0:
        return None
    # bony landmarks are the patient's: the table (often above bone_hu) lies outside the body
    blab, bn = ndi.label(crop > -500.0)
    sr0, sc0 = int(round(r0)) - ra, int(round(c0)) - ca
    if bn and 0 <= sr0 < crop.shape[0] and 0 <= sc0 < crop.shape[1] and blab[sr0, sc0]:
        inside = fill_holes(np.asarray(blab == blab[sr0, sc0]))
    else:
        inside = np.ones(crop.shape, bool)
    bone_env = (crop > p.bone_hu) & inside
    ymm = ((np.arange(ra, rb) - r0) * dy)[:, None].astype(np.float64)
    xmm = ((np.arange(ca, cb) - c0) * dx)[None, :].astype(np.float64)
    return crop, (ra, rb, ca, cb), wall, np.asarray(bone_env), ymm, xmm


def _side_bone(fl: _Floor, lat_row: NDArray[np.floating[Any]], p: TissueParams) -> SideBone:
    """One side's landmarks as carried to nearby slices: the process tip and the floor on a 1 mm grid, and where ribs
    lie beside the compartment the most posterior bone per grid column (its nearest pixel column within 0.75 mm;
    NaN where none is that near or it holds no bone)."""
    has_tp = fl.tip is not None and fl.tip >= p.tp_min_lat_mm
    grid = np.arange(0.0, p.erector_lateral_max_mm + 1.0)
    wall: tuple[float, ...] = ()
    if fl.ribs and fl.bone_post is not None and p.rib_wall:
        near = np.abs(lat_row[None, :] - grid[:, None])
        j = np.argmin(near, axis=1)
        w = np.where(near[np.arange(grid.size), j] <= 0.75, fl.bone_post[j], np.nan)
        wall = tuple(float(round(v, 2)) for v in w)
    if not has_tp or fl.line is None:
        return SideBone(None, (), wall)
    keep = lat_row >= 0.0
    order = np.argsort(lat_row[keep])
    floor = np.interp(grid, lat_row[keep][order], fl.line[keep][order])
    return SideBone(fl.tip, tuple(float(round(v, 2)) for v in floor), wall)


def bony_landmarks(hu: NDArray[np.float32], spacing: tuple[float, float], anat: SliceAnatomy,
                   p: TissueParams) -> tuple[SideBone, SideBone]:
    """The transverse process tip and posterior bony floor of each side (left, right) on one slice."""
    cr = _crop(hu, spacing, anat, p)
    if cr is None:
        return SideBone(None), SideBone(None)
    crop, _, wall, bone_env, ymm, xmm = cr
    sides = []
    for sgn in (1.0, -1.0):
        lat = sgn * xmm
        sides.append(_side_bone(_posterior_floor(bone_env, ymm, lat, wall, spacing[0] * spacing[1], p,
                                                 anat.ribs_possible), lat[0], p))
    return sides[0], sides[1]


def process_reach_mm(level: LevelResult, k: int, slice_mm: float, p: TissueParams) -> float:
    """How far along the spine slice ``k`` looks for a transverse process: half the vertebral pitch (body plus
    disc) of the vertebra it lies in or nearest to, where the level finder measured it, else ``tp_context_mm``.

    Processes repeat once per pitch, so every slice lies within half a pitch of the process of the
    vertebra above or below it."""
    if not level.vertebrae or p.tp_context_mm <= 0:
        return p.tp_context_mm
    v = min(level.vertebrae, key=lambda w: 0 if w.first <= k <= w.last else min(abs(k - w.first), abs(k - w.last)))
    if v.pitch is None:
        return p.tp_context_mm
    return max(p.tp_context_mm, 0.5 * v.pitch * slice_mm)


def with_neighbours(anat: SliceAnatomy, k: int, landmarks: Callable[[int], tuple[SideBone, SideBone]],
                    n_slices: int, slice_mm: float, p: TissueParams, reach_mm: float | None = None) -> SliceAnatomy:
    """``anat`` of slice ``k`` with the bony landmarks of the slices within ``reach_mm`` along the spine
    (``process_reach_mm``; ``tp_context_mm`` without it)."""
    reach_mm = p.tp_context_mm if reach_mm is None else reach_mm
    if reach_mm <= 0 or slice_mm <= 0:
        return anat
    reach = int(np.floor(reach_mm / slice_mm + 1e-6))
    near = []
    for kk in range(max(0, k - reach), min(n_slices, k + reach + 1)):
        if kk != k:
            left, right = landmarks(kk)
            if left.tip_mm is not None or right.tip_mm is not None or left.wall_mm or right.wall_mm:
                near.append(NeighbourBone((kk - k) * slice_mm, left, right))
    return replace(anat, neighbours=tuple(near))


def _carried(neighbours: tuple[NeighbourBone, ...], side: str, p: TissueParams
             ) -> tuple[float, NDArray[np.float64]] | None:
    """The transverse-process plane of the nearest slices with a process, above and below (interpolated along the
    spine between them, or the one within reach): its tip (mm from the midline) and floor on the 1 mm grid.

    The tip of each process (above, below) is its longest reach over the slices within reach that show it: a
    slice through its upper or lower edge cuts it short.  The floor is the nearest slice's."""
    best: dict[int, tuple[float, SideBone]] = {}
    reach: dict[int, float] = {}
    for nb in neighbours:
        sb = nb.left if side == "left" else nb.right
        if sb.tip_mm is None or not sb.floor_mm:
            continue
        key = 1 if nb.dz_mm > 0 else -1
        reach[key] = max(reach.get(key, 0.0), sb.tip_mm)
        if key not in best or abs(nb.dz_mm) < abs(best[key][0]):
            best[key] = (nb.dz_mm, sb)
    if not best:
        return None
    if len(best) == 1:
        key, (_, sb) = next(iter(best.items()))
        return reach[key], np.asarray(sb.floor_mm)
    (da, a), (db, b) = best[1], best[-1]
    ta, tb = reach[1], reach[-1]
    wa = abs(db) / (abs(da) + abs(db))
    return wa * ta + (1 - wa) * tb, wa * np.asarray(a.floor_mm) + (1 - wa) * np.asarray(b.floor_mm)


def _wall(neighbours: tuple[NeighbourBone, ...], side: str) -> NDArray[np.float64] | None:
    """The chest wall of the nearby slices: per column of the 1 mm grid, the most posterior bone of the nearest slice
    above and the nearest below that hold bone in that column (``SideBone.wall_mm``), interpolated along the spine
    between them, or the one there is; NaN where no slice within reach holds any.  None without rib-bearing slices."""
    walls = [(nb.dz_mm, (nb.left if side == "left" else nb.right).wall_mm) for nb in neighbours]
    walls = [(dz, w) for dz, w in walls if w]
    if not walls:
        return None
    size = min(len(w) for _, w in walls)
    dz = np.asarray([d for d, _ in walls], dtype=np.float64)[:, None]
    w = np.asarray([ww[:size] for _, ww in walls], dtype=np.float64)
    has = np.isfinite(w)
    up = np.where(has & (dz > 0), dz, np.inf)
    down = np.where(has & (dz < 0), -dz, np.inf)
    cols = np.arange(size)
    ia, ib = np.argmin(up, axis=0), np.argmin(down, axis=0)
    da, db = up[ia, cols], down[ib, cols]
    wa, wb = w[ia, cols], w[ib, cols]
    both = np.isfinite(da) & np.isfinite(db)
    out = np.where(np.isfinite(da), wa, np.where(np.isfinite(db), wb, np.nan))
    if both.any():  # only the columns with bone on both sides are weighed (elsewhere inf * NaN)
        out[both] = (db[both] * wa[both] + da[both] * wb[both]) / (da[both] + db[both])
    return out if np.isfinite(out).any() else None


def _outline(mask: NDArray[np.bool_], region: NDArray[np.bool_], px: float, close_mm: float,
             smooth_mm: float = 0.0) -> NDArray[np.bool_]:
    """A muscle as its outline, not only its muscle-window pixels, inside ``region`` (its bounds, bone left out):
    the outline smoothed by ``smooth_mm`` (opening, then closing; never coarser than that), then fat clefts,
    specks and concavities narrower than 2 x ``close_mm`` taken in.

    Anatomy: the multifidus and the longissimus and iliocostalis are parted by fat clefts, fatty infiltration
    lies between the fascicles of any muscle; TotalSegmentator's autochthon and iliopsoas, and the "total
    cross-sectional area" of body-composition studies, hold them.  That fat is also IMAT, never skeletal
    muscle (the muscle window decides that).  Worked on the mask's box: the result is the whole array's."""
    if not mask.any():
        return mask
    it = int(np.floor(smooth_mm / px + 1e-6))
    bb = _around(mask, int(np.ceil(close_mm / px)) + it + 2)
    out, reg = mask[bb], region[bb]
    if it > 0:
        out = ndi.binary_closing(ndi.binary_opening(out, iterations=it), iterations=it) & reg
    if close_mm > 0:
        out = fill_holes(closing(out, close_mm / px) | out) & reg
    full = np.zeros(mask.shape, bool)
    full[bb] = out
    return full


def _around(mask: NDArray[np.bool_], margin: int) -> tuple[slice, slice]:
    """The bounding box of ``mask`` grown by ``margin`` pixels (morphology of radius < margin on it equals the
    whole array's, and costs only the box's area)."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return (slice(max(0, int(rows[0]) - margin), int(rows[-1]) + margin + 1),
            slice(max(0, int(cols[0]) - margin), int(cols[-1]) + margin + 1))


def lumbar_named(hu: NDArray[np.float32], spacing: tuple[float, float], anat: SliceAnatomy,
                 p: TissueParams, compartments: bool = False) -> dict[str, NDArray[np.bool_]]:
    """Psoas and erector spinae, left and right, found relative to the vertebra (on a crop around it).

    With ``compartments`` the paraspinal compartment of each side is returned as well
    (``paraspinal_region_left`` / ``_right``: where that side's paraspinal muscles may lie).
    """
    dy, dx = spacing
    hw, hh = anat.half_width_mm, anat.half_height_mm
    keys = list(L3_NAMED) + (["paraspinal_region_left", "paraspinal_region_right"] if compartments else [])
    out = {k: np.zeros(hu.shape, bool) for k in keys}
    cr = _crop(hu, spacing, anat, p)
    if cr is None:
        return out
    crop, (ra, rb, ca, cb), wall, bone_env, ymm, xmm = cr
    soft = (crop >= p.muscle_hu[0]) & (crop <= p.muscle_hu[1])
    bone = crop > p.muscle_hu[1]
    soft &= ~fill_holes(np.asarray(ndi.binary_closing(bone, disk(1.5))))

    # components are separated on a stricter window and with thin bridges cut, so enhancing
    # organs (liver, spleen) and the diaphragm crura do not join a muscle; the chosen core is
    # then grown back into the full muscle window
    strict = soft & (crop <= p.named_core_max_hu)
    if p.core_smooth_mm > 0:
        smooth = ndi.gaussian_filter(crop, sigma=(p.core_smooth_mm / dy, p.core_smooth_mm / dx))
        strict &= smooth <= p.core_smooth_max_hu
    bridge_px = p.bridge_mm / float(np.sqrt(dy * dx))
    psoas_bridge_px = max(1.0, p.psoas_bridge_mm / float(np.sqrt(dy * dx)))

    def pick(region_full: NDArray[np.bool_], seed: tuple[float, float], max_dist_mm: float = 25.0,
             largest: bool = False, open_px: float = 0.0, compact: bool = False,
             search_full: NDArray[np.bool_] | None = None) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
        """The muscle picked near ``seed``, and the tissue beside it found not to be it (compact picks only).

        ``search_full`` (default ``region_full``) is the search box whose edges an organ cut by it would press
        against; ``region_full`` may be cut further by anatomical bounds (the transverse process tip), which a
        muscle meets along its own outline."""
        out_full = np.zeros(crop.shape, bool)
        excluded = np.zeros(crop.shape, bool)
        rows, cols = np.nonzero(region_full.any(axis=1))[0], np.nonzero(region_full.any(axis=0))[0]
        if rows.size == 0:
            return out_full, excluded
        bb = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        region, ym, xm = region_full[bb], ymm[bb[0]], xmm[:, bb[1]]
        r_open = max(psoas_bridge_px if compact else bridge_px, open_px)
        cand = (opening(strict[bb], r_open) if r_open >= 1.0 else strict[bb]) & region
        cl, cn = ndi.label(cand)
        if cn == 0:
            return out_full, excluded
        sr_, sc_ = (seed[1] - ym[0, 0]) / dy, (seed[0] - xm[0, 0]) / dx
        wa, wb = max(0, int(sr_ - max_dist_mm / dy)), min(cl.shape[0], int(sr_ + max_dist_mm / dy) + 2)
        va, vb = max(0, int(sc_ - max_dist_mm / dx)), min(cl.shape[1], int(sc_ + max_dist_mm / dx) + 2)
        if wa >= wb or va >= vb:
            return out_full, excluded
        win = cl[wa:wb, va:vb]
        dist = np.hypot(xm[:, va:vb] - seed[0], ym[wa:wb, :] - seed[1])
        near = (dist <= max_dist_mm) & (win > 0)
        if not near.any():
            return out_full, excluded
        if largest:  # the biggest muscle mass inside the search disc (thin strips beside it lose)
            ids = np.unique(win[near])
            best = ids[int(np.argmax(ndi.sum_labels(near, win, index=ids)))]
        else:
            best = win[near][int(np.argmin(dist[near]))]
        core = cl == best
        if compact:
            local = None
            if p.belly_drop_hu > 0:
                # the soft tissue's local mean HU (normalised smoothing over muscle-window pixels not next to fat: fat,
                # its partial volume at the muscle's edge and bone do not lower or raise it)
                sure = soft[bb] & ~ndi.binary_dilation(crop[bb] < p.muscle_hu[0])
                w = sure.astype(np.float32)
                sig = (p.belly_hu_smooth_mm / dy, p.belly_hu_smooth_mm / dx)
                num = ndi.gaussian_filter(np.where(sure, crop[bb], 0.0).astype(np.float32), sigma=sig)
                local = num / np.maximum(ndi.gaussian_filter(w, sigma=sig), 1e-3)
            wall_x = seed[0] - np.sign(seed[0]) * 20.0  # the vertebral body's side
            belly, low = _belly(cand, core, (xm, ym), seed, spacing, p.belly_open_frac, p.belly_close_mm, local,
                                p.belly_drop_hu, p.belly_low_min_mm2,
                                (wall_x + np.sign(seed[0]) * p.belly_ref_mm, 0.0, p.belly_ref_mm - 2.0), -hh,
                                p.belly_neck_frac, gutter=p.psoas_gutter, lateral_ratio=p.psoas_lateral_waist,
                                again=p.psoas_gutter_again)
            if p.psoas_sheet_stop:
                sheet = _sheets_behind(belly, core & ~low, (xm, ym), float(np.sign(seed[0])), spacing,
                                       p.belly_open_frac, p.belly_close_mm)
                if p.psoas_contact_mm > 0 and sheet.any():
                    # across the contact the psoas' outline continues the oval of its free outline
                    wedge = _beyond_oval(belly, sheet, (xm, ym), spacing, p.psoas_contact_mm)
                    belly = belly & ~wedge
                    sheet = sheet | (wedge & cand)
                low = low | sheet
            belly = belly | _fragments(belly, cand, low, spacing, p.psoas_fragment_mm)
            core = belly
            excluded[bb] = low
            if not core.any():
                return out_full, excluded
        if compact and float(np.broadcast_to(ym, core.shape)[core].mean()) < -p.psoas_front_frac * hh:
            # the psoas lies beside the vertebral body; a mass in front of it is the aorta or the vena cava
            return out_full, excluded
        if compact:
            # a muscle lies inside its box; a component pressed against the box's edges over much of
            # its outline is an organ cut by the box (liver or spleen beside the vertebra), not a muscle
            solid = fill_holes(core)
            edge = solid & ~ndi.binary_erosion(solid)
            search = region if search_full is None else search_full[bb]
            on_box = edge & ~ndi.binary_erosion(search, border_value=0)
            # ... or one lying in enhancing soft tissue (the part of an enhancing organ below the strict cut)
            # enhancing soft tissue (organ parenchyma above the strict cut), not the partial-volume rim of bone
            organ_like = soft[bb] & ~strict[bb] & ~ndi.binary_dilation(bone[bb], disk(2.0))
            # ... nor the vertebral body's own section: on a disc slice the annulus (70-120 HU) is where the psoas
            # lies against the spine, not an organ
            spine = (xm / (hw + p.disc_margin_mm)) ** 2 + (ym / (hh + p.disc_margin_mm)) ** 2 <= 1.0
            organ_like &= ~spine
            organ_side = edge & ndi.binary_dilation(organ_like & ~solid, disk(1.5))
            if float((on_box | organ_side).sum()) > p.box_contact_max * float(edge.sum()):
                return out_full, excluded
        grow = max(1.0, max(bridge_px, open_px) + 1.0)
        grown = dilate(core, grow) & soft[bb] & region & ~excluded[bb]
        if open_px > bridge_px:
            gl, _ = ndi.label(grown)
            ids = np.unique(gl[core & grown])
            grown = np.isin(gl, ids[ids > 0])
        out_full[bb] = grown
        return out_full, excluded

    # the erector's back surface is the thoracolumbar fascia under the subcutaneous fat (the fat joined
    # to the air behind the patient's back); where ribs lie beside the compartment, the superficial back
    # muscles (latissimus dorsi, serratus posterior inferior, trapezius) lie on it as well
    under_fat_mm = np.full(crop.shape, np.inf)
    rows_back = np.nonzero(ymm[:, 0] > wall)[0]  # only behind the vertebral body (where the erector lies)
    if rows_back.size:
        sub = crop[rows_back[0] :]
        back = (sub < -500.0) & (ymm[rows_back[0] :] > wall + 20.0)
        skin = ndi.distance_transform_edt(~back, sampling=spacing) <= p.skin_mm + 1.0
        fat = sub <= p.fat_hu[1]
        px = float(np.sqrt(dy * dx))
        # the subcutaneous fat, not the clefts between the paraspinal muscles joined to it by a thin channel
        # (along the spinous process): channels narrower than 2 x sat_channel_mm do not carry it inward
        wide = opening(fat, p.sat_channel_mm / px) if p.sat_channel_mm >= px else fat
        outside = components_touching(wide | skin, back)
        if p.sat_channel_mm >= px:
            outside |= dilate(outside, p.sat_channel_mm / px) & fat
        under_fat_mm[rows_back[0] :] = ndi.distance_transform_edt(~outside, sampling=spacing)
    for side, sgn in (("left", 1.0), ("right", -1.0)):
        lat = sgn * xmm
        psoas_box = (lat > hw * 0.5) & (lat < hw + p.psoas_lateral_mm) & (ymm > -hh - 45.0) & (ymm < hh + 20.0)
        psoas_search = psoas_box
        fl = _posterior_floor(bone_env, ymm, lat, wall, dy * dx, p, anat.ribs_possible)
        floor, ribs, tip = fl.ok, fl.ribs, fl.tip
        # the lateral raphe (the fascia's posterior and middle layers meeting at the quadratus
        # lumborum's lateral edge) lies beyond the transverse process tip; a slice without a process
        # (a disc, between processes) takes the processes of the nearest slices within tp_context_mm,
        # and only without any the fixed bound
        has_tp = tip is not None and tip >= p.tp_min_lat_mm
        carried = None if has_tp else _carried(anat.neighbours, side, p)
        if has_tp and tip is not None:
            lat_max = min(p.erector_lateral_max_mm, tip + p.raphe_beyond_tip_mm)
        elif carried is not None:
            lat_max = min(p.erector_lateral_max_mm, carried[0] + p.raphe_beyond_tip_mm)
        else:
            lat_max = p.erector_lateral_mm
        if carried is not None:
            # between processes the floor is their plane (the intertransverse ligaments and muscles join them),
            # beyond this slice's own bone
            grid = np.arange(carried[1].size, dtype=np.float64)
            beyond = lat > (fl.lat_out if fl.lat_out is not None else 0.0)
            carried_ok = ymm > np.interp(lat, grid, carried[1])
            if ribs:  # rib necks and levatores costarum lie in front of it as well: the deeper floor bounds it
                efloor = floor & (~beyond | carried_ok)
            else:  # lumbar: beyond the lamina and pedicle only the intertransverse plane does
                efloor = np.where(beyond, carried_ok & (True if fl.lateral_ok is None else fl.lateral_ok), floor)
        else:
            efloor = floor
        chest = _wall(anat.neighbours, side) if ribs and p.rib_wall else None
        if chest is not None and fl.bone_post is not None and fl.line is not None and fl.lat_out is not None:
            # the chest wall: ribs and the intercostal muscles between them, which the erector lies behind; a slice
            # between two ribs takes the ribs of the nearest slices that show bone in each column, beyond its own
            # vertebra's bone, and the floor runs across the columns between them and its own bone
            lat_row = lat[0]
            grid = np.arange(chest.size, dtype=np.float64)
            own = np.isfinite(fl.bone_post)
            far = np.isfinite(chest) & (grid > fl.lat_out)
            xs = np.concatenate([lat_row[own], grid[far]])
            ys = np.concatenate([fl.bone_post[own], chest[far]])
            order = np.argsort(xs, kind="stable")
            line = np.interp(lat_row, xs[order], ys[order])
            beyond = lat_row > fl.lat_out
            efloor = efloor & (~beyond | (ymm > np.maximum(fl.line, line)[None, :]))
        under_fat = under_fat_mm > (p.erector_sheet_mm if ribs else p.erector_fascia_mm)
        erector_box = (lat > 0.0) & (lat < lat_max) & (ymm > wall + p.erector_front_mm) & efloor & under_fat
        px = float(np.sqrt(dy * dx))
        # the psoas' own reading of the tip: bone behind the body that reaches barely beyond its side is an articular
        # process or the root of a process cut by the slab (on a slice next to a disc), and cutting the psoas there
        # took its back half (the average phantom at 5 mm: tips of 27-31 mm against the body's 21-22, the right
        # psoas' 3D course 4.4 cm2 between slices of 10; real lumbar tips reach 40-50 mm)
        ps_tp = has_tp and tip is not None and tip >= hw + p.psoas_tip_beyond_body_mm
        ps_carried = carried if not has_tp else (None if ps_tp else _carried(anat.neighbours, side, p))
        if not ps_tp and ps_carried is not None and p.tp_thickness_mm > 0:
            # between processes nothing bony stops the psoas behind: it lies in front of the processes' plane (their
            # back surface on the nearest slices, less a process's thickness), where the paraspinal compartment and
            # the quadratus lumborum's medial edge begin
            tp_front = (np.interp(lat, np.arange(ps_carried[1].size, dtype=np.float64), ps_carried[1])
                        - p.tp_thickness_mm)
            psoas_box = psoas_box & (ymm < tp_front)
        psoas_tip = tip if ps_tp else (ps_carried[0] if ps_carried is not None else None)
        if psoas_tip is not None and p.psoas_beyond_tip_mm > 0:
            # behind the vertebral body's centre the psoas lies in front of the transverse process, medial to its
            # tip; the quadratus lumborum lies lateral to the tip (it arises from it).  Between processes (a disc,
            # between two processes) the tip is theirs, as for the erector
            psoas_box = psoas_box & ~((ymm > 0.0) & (lat > psoas_tip + p.psoas_beyond_tip_mm))
        ps, not_psoas = pick(np.asarray(psoas_box), (sgn * (hw + 20.0), 0.0), compact=True,
                             search_full=np.asarray(psoas_search))
        out[f"psoas_{side}"][ra:rb, ca:cb] = _outline(ps, np.asarray(psoas_box) & ~bone & ~not_psoas, px,
                                                      p.psoas_outline_mm)
        er, _ = pick(np.asarray(erector_box), (sgn * 40.0, wall + 35.0), 35.0, True, p.erector_open_mm / px)
        out[f"erector_{side}"][ra:rb, ca:cb] = _outline(er, np.asarray(erector_box) & ~bone, px, p.erector_close_mm,
                                                        p.erector_smooth_mm)
        if compartments:
            medial = (lat > 0.0) if side == "left" else (lat >= 0.0)
            region = medial & (lat < p.paraspinal_lateral_mm) & (ymm > wall + p.paraspinal_front_mm) & floor
            out[f"paraspinal_region_{side}"][ra:rb, ca:cb] = region
    return out


def noise_hu(hu: NDArray[np.float32]) -> float:
    """Pixel noise (HU) of a slice: the robust spread (MAD) of neighbouring-pixel differences in soft tissue and
    fat (-150..150 HU), divided by sqrt 2.  Edges are a minority of those differences and the median ignores them;
    correlated noise (smooth kernels) reads lower than its SD, which is what thresholds pixel by pixel feel."""
    diffs = []
    rows, cols = hu[::2], hu[:, ::2]  # every other row's horizontal and column's vertical pairs: plenty, and fast
    for d, a in ((rows[:, 1:] - rows[:, :-1], rows[:, :-1]), (cols[1:, :] - cols[:-1, :], cols[:-1, :])):
        ok = (a > -150.0) & (a < 150.0)
        diffs.append(d[ok])
    d = np.concatenate(diffs)
    if d.size < 100:
        return 0.0
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def for_segmentation(hu: NDArray[np.float32], spacing: tuple[float, float], p: TissueParams
                     ) -> tuple[NDArray[np.float32], str | None]:
    """The slice the regions are found on: smoothed where its pixel noise would break them apart (low-dose CT,
    thin slices), with a note saying so; ``hu`` itself otherwise.

    Pixel noise above about 25 HU splits muscle (-29..150) and fat (-190..-30) into speckle, and the
    openings that part muscles then part a muscle from itself (on the shared real CT with added white noise
    the erector's Dice against TotalSegmentator fell from 0.84 to 0.52 between 20 and 30 HU added).  A
    Gaussian of sigma s pixels divides white noise by about 2 s sqrt(pi): s is chosen for
    ``noise_target_hu``, at most ``noise_max_sigma_mm``."""
    sd = noise_hu(hu)
    if sd <= p.noise_smooth_above_hu:
        return hu, None
    px = float(np.sqrt(spacing[0] * spacing[1]))
    s_px = min(sd / (2.0 * np.sqrt(np.pi) * p.noise_target_hu), p.noise_max_sigma_mm / px)
    s_px = max(s_px, 0.5)
    out = np.asarray(ndi.gaussian_filter(hu, sigma=s_px), dtype=np.float32)
    return out, f"image noise about {sd:.0f} HU: smoothed (Gaussian sigma {s_px * px:.1f} mm) for segmentation only"


# --------------------------------------------------------------------------------------------
# whole-slice segmentation


def _windows(hu: NDArray[np.float32], body: NDArray[np.bool_], p: TissueParams
             ) -> tuple[NDArray[np.bool_], NDArray[np.bool_], NDArray[np.bool_]]:
    fat = body & (hu >= p.fat_hu[0]) & (hu <= p.fat_hu[1])
    muscle_hu = body & (hu >= p.muscle_hu[0]) & (hu <= p.muscle_hu[1])
    bone_hull = fill_holes(np.asarray(ndi.binary_closing(body & (hu > p.muscle_hu[1]), disk(1.5))))
    return fat, muscle_hu, bone_hull


def _empty(level: str, shape: tuple[int, ...], reason: str) -> SliceSegmentation:
    empty = np.zeros(shape, bool)
    return SliceSegmentation(masks={k: empty for k in keys_for_level(level)}, body=empty, notes=(reason,))


def turned_named(hu: NDArray[np.float32], spacing: tuple[float, float], anat: SliceAnatomy, p: TissueParams,
                 roll_deg: float = 0.0, compartments: bool = False) -> dict[str, NDArray[np.bool_]]:
    """:func:`lumbar_named` on the slice turned back by the spine's roll (:mod:`pipelines.body_composition.roll`;
    ``anat`` in the turned frame), its masks on the stored slice; the slice itself where ``roll_deg`` is 0."""
    if roll_deg == 0.0:
        return lumbar_named(hu, spacing, anat, p, compartments)
    named = lumbar_named(turn_back(hu, spacing, anat.centre_rc, roll_deg), spacing, anat, p, compartments)
    return {k: turn_forward(m, spacing, anat.centre_rc, roll_deg) for k, m in named.items()}


def segment_lumbar(hu: NDArray[np.float32], spacing: tuple[float, float], anat: SliceAnatomy,
                   p: TissueParams, roll_deg: float = 0.0) -> SliceSegmentation:
    """L3 (any lumbar or lower thoracic slice): muscle compartments, SAT, VAT, IMAT.

    ``roll_deg``: the spine's roll on this slice (``roll.SpineRoll``; ``anat`` and its neighbours' landmarks in the
    turned frame).  Only the compartments and named muscles, which are found relative to the vertebra's axes, are
    found on the slice turned back by it (:func:`turned_named`); the trunk, the HU windows and everything read from
    them stay on the stored slice, so no tissue class is resampled."""
    dy, dx = spacing
    px = float(np.sqrt(dy * dx))
    # Regions (trunk, envelope, compartments, organs, the wall band) are decided on a smoothed copy where the
    # slice's pixel noise calls for it (``for_segmentation``; the copy is the slice itself otherwise): noise
    # speckle in the subcutaneous fat closes the envelope across it, and openings part a muscle from itself.
    # Each pixel's tissue (the muscle and fat windows) is read from the slice as it is, so thin fat layers
    # are not blurred away and no area takes the smoothing's partial volume.
    hs, noise_note = for_segmentation(hu, spacing, p)
    tr = trunk_of(hs, spacing, anat.centre_rc, p)
    body = tr.body
    if not body.any():
        return _empty("L3", hu.shape, "no trunk found on the level slice")
    fat, muscle_hu, bone_hull = _windows(hu, body, p)
    fat_s, muscle_s, bone_hull_s = (fat, muscle_hu, bone_hull) if hs is hu else _windows(hs, body, p)
    inner = erode(body, p.skin_mm / px)
    nonfat = inner & ~fat_s & (hs > -500)
    envelope = fill_holes(closing(nonfat, p.close_mm / px) & inner)
    sat = fat & ~envelope
    soft = muscle_hu & envelope & ~bone_hull
    soft_s = soft if hs is hu else muscle_s & envelope & ~bone_hull_s

    named = turned_named(hs, spacing, anat, p, roll_deg, compartments=True)
    smooth = ndi.gaussian_filter(hu, sigma=(p.organ_smooth_mm / dy, p.organ_smooth_mm / dx))
    enhancing = smooth > p.organ_hu
    para = (named.pop("paraspinal_region_left") | named.pop("paraspinal_region_right")) & envelope & ~enhancing
    masks: dict[str, NDArray[np.bool_]] = {k: v & envelope for k, v in named.items()}
    psoas = masks["psoas_left"] | masks["psoas_right"]

    # the wall band: depth from the outer fascia, the paraspinal compartment counted as outside
    cavity_side = envelope & ~para
    depth = ndi.distance_transform_edt(cavity_side, sampling=spacing)
    bulky = opening(soft_s & ~psoas, p.organ_bulk_mm / px)
    deep = soft_s & (depth > p.wall_max_mm)
    organ = components_touching(bulky, deep) | (soft_s & enhancing)
    band = soft_s & cavity_side & (depth <= p.wall_max_mm) & ~psoas
    band &= ~(organ & (depth > p.wall_keep_mm))
    rim = cavity_side & ~erode(cavity_side, 1.5) & ~dilate(para, 1.5)
    wall = components_touching(band, rim) & soft
    paraspinal_muscle = soft & para
    muscle = (wall | psoas | paraspinal_muscle | masks["erector_left"] | masks["erector_right"]) & soft

    holes = fill_holes(muscle) & ~muscle
    hl, hn = ndi.label(holes)
    if hn:
        sizes = label_sizes(hl, hn) * dy * dx
        holes = np.concatenate([[False], sizes <= p.imat_max_hole_mm2])[hl]
    imat = fat & envelope & (holes | para)
    vat = fat & envelope & ~imat & ~para
    masks["skeletal_muscle"] = muscle
    masks["sat"] = sat
    masks["vat"] = vat
    masks["imat"] = imat
    truncated = bool(body[0, :].any() or body[-1, :].any() or body[:, 0].any() or body[:, -1].any())
    vb = _vertebral_body_area(hu, spacing, anat, p)
    notes = (*tr.notes, noise_note) if noise_note else tr.notes
    if roll_deg:
        notes = (*notes, f"spine roll of {roll_deg:+.1f} deg: compartments and named muscles found on the slice "
                         "turned back by it")
    return SliceSegmentation(masks={k: np.asarray(masks[k]) for k in keys_for_level("L3")}, body=np.asarray(body),
                             truncated=truncated, limbs=tr.limbs, notes=notes,
                             body_area_cm2=float(body.sum()) * dy * dx / 100.0, vertebral_body_cm2=vb,
                             trunk_half_widths_mm=_half_widths(body, spacing, anat.centre_rc),
                             trunk_lateral_concavity=_lateral_concavity(body, anat.centre_rc))


def _half_widths(body: NDArray[np.bool_], spacing: tuple[float, float],
                 centre_rc: tuple[float, float]) -> tuple[float, float] | None:
    """How far the trunk reaches to the patient's left and right of the vertebra (mm)."""
    cols = np.nonzero(body.any(axis=0))[0]
    if cols.size == 0:
        return None
    c0 = centre_rc[1]
    return (max(0.0, float(cols[-1] - c0)) * spacing[1], max(0.0, float(c0 - cols[0])) * spacing[1])


def _lateral_concavity(body: NDArray[np.bool_], centre_rc: tuple[float, float]) -> float | None:
    """Share of the trunk's area that its convex hull adds beside the spine (outer half of each side).

    A trunk outline is nearly convex at the sides; an arm lying against it leaves notches in front
    of and behind the contact.  The groove along the spine and the navel are medial and not counted.
    """
    rows, cols = np.nonzero(body.any(axis=1))[0], np.nonzero(body.any(axis=0))[0]
    if rows.size < 3 or cols.size < 3:
        return None
    box = body[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    inside = _filled_hull(box, 1e-6)
    if inside is None:
        return None
    xx = np.arange(box.shape[1])[None, :]
    c0 = centre_rc[1] - cols[0]
    half = max(float(box.shape[1] - 1 - c0), float(c0))
    notch = inside & ~box & (np.abs(xx - c0) > 0.5 * half)
    return float(notch.sum()) / float(box.sum())


def _vertebral_body_area(hu: NDArray[np.float32], spacing: tuple[float, float], anat: SliceAnatomy,
                         p: TissueParams) -> float | None:
    """Cross-section of the vertebral body, cm2: the convex hull of the bone inside the body's outline as the level
    finder measured it (its half width and half height about its centre, widened by 15 %: they are smoothed
    maxima); None with no bone there.

    Anatomy: a vertebral body is convex in cross-section, a thin cortical ring around cancellous bone that lies
    below ``bone_hu`` where it is osteoporotic, and the ring has gaps (the basivertebral foramen behind, nutrient
    foramina, partial volume).  Hole filling after a closing by a disc of two pixels closed the ring on 2 mm
    pixels only: on 1 mm pixels it left the cortex's nearest fragment, 0.2 cm2 for a 13.6 cm2 body, and the psoas
    to vertebral body gate made every psoas "not evaluable"."""
    dy, dx = spacing
    r0, c0 = anat.centre_rc
    hw, hh = 1.15 * anat.half_width_mm, 1.15 * anat.half_height_mm
    ra, rb = max(0, int(np.floor(r0 - hh / dy))), min(hu.shape[0], int(np.ceil(r0 + hh / dy)) + 1)
    ca, cb = max(0, int(np.floor(c0 - hw / dx))), min(hu.shape[1], int(np.ceil(c0 + hw / dx)) + 1)
    if ra >= rb or ca >= cb:
        return None
    yy = ((np.arange(ra, rb) - r0) * dy)[:, None]
    xx = ((np.arange(ca, cb) - c0) * dx)[None, :]
    bone = (hu[ra:rb, ca:cb] > p.bone_hu) & ((xx / hw) ** 2 + (yy / hh) ** 2 <= 1.0)
    hull = _filled_hull(bone, 0.5)
    if hull is None:
        return None
    return float(hull.sum()) * dy * dx / 100.0


def segment_c3(hu: NDArray[np.float32], spacing: tuple[float, float], anat: SliceAnatomy,
               p: TissueParams, roll_deg: float = 0.0) -> SliceSegmentation:
    """C3 by Swartz 2016: paravertebral muscles and both sternocleidomastoids (no SAT, VAT or psoas).

    ``roll_deg``: the spine's roll on this slice (a head and neck turned on the table; ``roll.SpineRoll``).  Every
    region here is a bound on the position relative to the vertebral body's centre (the midline that parts left from
    right, beside or behind the body), so those positions are measured along the vertebra's own axes: the pixel
    grid's coordinates are turned, the slice is not (no pixel is resampled)."""
    dy, dx = spacing
    px = float(np.sqrt(dy * dx))
    hs, noise_note = for_segmentation(hu, spacing, p)  # regions on a smoothed copy where noise calls for it
    tr = trunk_of(hs, spacing, anat.centre_rc, p)
    body = tr.body
    if not body.any():
        return _empty("C3", hu.shape, "no neck found on the level slice")
    fat, muscle_hu, bone_hull = _windows(hu, body, p)
    inner = erode(body, p.skin_mm / px)
    soft = muscle_hu & inner & ~bone_hull
    _, muscle_s, bone_hull_s = (fat, muscle_hu, bone_hull) if hs is hu else _windows(hs, body, p)
    soft_s = muscle_s & inner & ~bone_hull_s
    smooth = ndi.gaussian_filter(hu, sigma=(p.organ_smooth_mm / dy, p.organ_smooth_mm / dx))
    strict = soft_s & (smooth <= p.organ_hu)
    bridge_px = p.bridge_mm / px
    cand = opening(strict, bridge_px) if bridge_px >= 1.0 else strict
    depth = ndi.distance_transform_edt(body, sampling=spacing)
    r0, c0 = anat.centre_rc
    hw, hh = anat.half_width_mm, anat.half_height_mm
    ymm: NDArray[np.floating[Any]] = ((np.arange(hu.shape[0]) - r0) * dy)[:, None]
    xmm: NDArray[np.floating[Any]] = ((np.arange(hu.shape[1]) - c0) * dx)[None, :]
    if roll_deg:  # mm behind and to the left of the centre along the vertebra's axes (roll.turn_back's frame)
        t = np.deg2rad(roll_deg)
        ymm, xmm = np.cos(t) * ymm + np.sin(t) * xmm, np.cos(t) * xmm - np.sin(t) * ymm
    masks: dict[str, NDArray[np.bool_]] = {}
    parted: dict[str, str] = {}
    spine = dilate(bone_hull & (np.abs(ymm) < hh + 40.0) & (np.abs(xmm) < hw + 30.0), 12.0 / px)
    for side, sgn in (("left", 1.0), ("right", -1.0)):
        lat = sgn * xmm
        scm_region = (lat > hw) & (ymm < hh) & (depth <= p.scm_depth_mm) & (lat < p.neck_lateral_mm)
        cl, cn = ndi.label(cand & scm_region)
        scm = np.zeros(hu.shape, bool)
        if cn:
            sizes = label_sizes(cl, cn) * dy * dx
            best = int(np.argmax(sizes))
            if sizes[best] >= p.scm_min_mm2:
                scm = dilate(cl == best + 1, bridge_px + 1.0) & soft & scm_region
        masks[f"sternocleidomastoid_{side}"] = scm
        if scm.any():
            # muscle just behind the region's posterior bound that the sternocleidomastoid touches: one pixel per
            # pixel of contact along the bound
            behind = cand & (ymm >= hh) & (lat > 0.0) & (depth <= p.scm_depth_mm) & (lat < p.neck_lateral_mm)
            contact_mm = float((scm & dilate(behind, 1.0)).sum()) * px
            diameter_mm = 2.0 * float(np.sqrt(float(scm.sum()) * dy * dx / np.pi))
            if contact_mm >= p.scm_joined_frac * diameter_mm:
                why = (f"{side} sternocleidomastoid joined to the muscles behind it with no fat plane over "
                       f"{contact_mm:.0f} mm: parted from the {side} paravertebral muscles by a line, not by anatomy "
                       "(their sum is in the C3 muscle area)")
                parted[f"sternocleidomastoid_{side}"] = parted[f"paravertebral_{side}"] = why
        medial = (lat > 0.0) if side == "left" else (lat >= 0.0)
        pv_region = medial & (ymm > -hh - p.prevertebral_mm) & (lat < p.neck_lateral_mm) & ~dilate(scm, 1.0)
        # muscle hugging the spine (deep neck muscles, longus, scalenes) and the posterior neck muscles
        # behind the vertebral body centre (trapezius, splenius, levator scapulae) even across a fat plane;
        # small round pieces in front of that (vessels, nodes) only where they touch the spine
        pl, pn = ndi.label(cand & pv_region)
        pv = components_touching(cand & pv_region, spine)
        if pn:
            ids = np.arange(1, pn + 1)
            area = ndi.sum_labels(np.ones(pl.shape), pl, index=ids) * dy * dx
            cy = np.asarray(ndi.mean(np.broadcast_to(ymm, pl.shape), pl, index=ids))
            back = ids[(area >= p.posterior_piece_min_mm2) & (cy > 0.0)]
            pv |= np.isin(pl, back)
        masks[f"paravertebral_{side}"] = dilate(pv, bridge_px + 1.0) & soft & pv_region
    masks["skeletal_muscle"] = np.asarray(np.logical_or.reduce([masks[k] for k in C3_NAMED]))
    truncated = bool(body[0, :].any() or body[-1, :].any() or body[:, 0].any() or body[:, -1].any())
    notes = (*tr.notes, noise_note) if noise_note else tr.notes
    if roll_deg:
        notes = (*notes, f"spine roll of {roll_deg:+.1f} deg: left, right, beside and behind the vertebra taken "
                         "along its own axes")
    return SliceSegmentation(masks={k: np.asarray(masks[k]) for k in keys_for_level("C3")}, body=np.asarray(body),
                             truncated=truncated, limbs=tr.limbs, notes=notes, parted_by_line=parted,
                             body_area_cm2=float(body.sum()) * dy * dx / 100.0,
                             vertebral_body_cm2=_vertebral_body_area(hu, spacing, anat, p),
                             trunk_half_widths_mm=_half_widths(body, spacing, anat.centre_rc))


class TissueSlicer:
    """The weight-free slice segmenter: the structures of the level (L3 or C3) on one canonical slice."""

    def __init__(self, params: TissueParams | None = None) -> None:
        self.p = params or TissueParams()

    def run(self, hu: NDArray[np.float32], spacing: tuple[float, float], anat: SliceAnatomy,
            level: str = "L3", roll_deg: float = 0.0) -> SliceSegmentation:
        """``roll_deg``: the spine's roll (see :func:`segment_lumbar` and :func:`segment_c3`)."""
        if level == "C3":
            return segment_c3(hu, spacing, anat, self.p, roll_deg)
        return segment_lumbar(hu, spacing, anat, self.p, roll_deg)

    def named(self, hu: NDArray[np.float32], spacing: tuple[float, float],
              anat: SliceAnatomy, roll_deg: float = 0.0) -> Mapping[str, NDArray[np.bool_]]:
        return turned_named(for_segmentation(hu, spacing, self.p)[0], spacing, anat, self.p, roll_deg)
