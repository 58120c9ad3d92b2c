"""One table of DICOM facts (node/dicom_facts.py): no other list in node/, the SCP's and the sweeps'
contexts are the table, docs/node.md carries it, and SEG/RTSTRUCT/SR series complete by their own rule
(real files from other tools, sent by dcmtk storescu to a running node)."""

from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path

import pydicom
import pydicom.uid
import pytest
from pydicom._uid_dict import UID_dictionary
from pynetdicom import AE
from pynetdicom.presentation import PresentationContext

from node import dicom_facts as facts
from node.completion import SliceInfo, decide, geometry_reason
from node.config import NodeConfig
from node.dicom_facts import Completion, CompletionReason, Encoding
from node.server import build_ae
from node.sweep import retrieve_contexts
from tests.conftest import need
from tests.node_helpers import config_of, running_node, write_config
from tests.peers import REPO, storescu, wait_until

DICOM_ROOT = "1.2.840.10008."  # the standard's own UIDs: SOP classes, transfer syntaxes, ...
FACTS = REPO / "node" / "dicom_facts.py"


def _standard_uid_names() -> set[str]:
    """The names pydicom.uid exports for the standard's UIDs (CTImageStorage, JPEG2000Lossless, ...)."""
    return {n for n in dir(pydicom.uid) if isinstance(v := getattr(pydicom.uid, n), str) and v.startswith(DICOM_ROOT)}


def test_no_sop_class_or_transfer_syntax_outside_the_table() -> None:
    names = _standard_uid_names()
    found: list[str] = []
    for path in sorted((REPO / "node").rglob("*.py")):
        if path == FACTS:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for n in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(n, 'lineno', 0)}"
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and DICOM_ROOT in n.value:
                found.append(f"{where}: {n.value!r}")
            elif isinstance(n, ast.ImportFrom) and n.module == "pydicom.uid":
                found += [f"{where}: imports {a.name}" for a in n.names if a.name in names]
            elif isinstance(n, ast.Attribute) and n.attr in names and ast.unparse(n.value).endswith("uid"):
                found.append(f"{where}: {ast.unparse(n)}")
    assert not found, "UIDs of the standard outside node/dicom_facts.py:\n" + "\n".join(found)


def _contexts(contexts: Sequence[PresentationContext]) -> dict[str, list[str]]:
    return {str(c.abstract_syntax): [str(t) for t in c.transfer_syntax] for c in contexts}


TABLE = {str(c.uid): [str(t.uid) for t in facts.TRANSFER_SYNTAXES] for c in facts.STORAGE_SOP_CLASSES}


def test_scp_contexts_are_the_table() -> None:
    ae = build_ae(NodeConfig())
    got = _contexts(ae.supported_contexts)
    assert got.pop(str(facts.VERIFICATION))
    assert got == TABLE


def test_sweep_contexts_are_the_table(tmp_path: Path) -> None:
    ae = AE()
    roles = retrieve_contexts(ae, facts.STUDY_ROOT_GET)
    got = _contexts(ae.requested_contexts)
    assert got.pop(str(facts.STUDY_ROOT_GET))
    assert got == TABLE
    assert {str(r.sop_class_uid) for r in roles} == set(TABLE)
    # C-MOVE sub-operations go to the node's own SCP (build_ae), which accepts the same table
    got = _contexts(build_ae(config_of(write_config(tmp_path)).node).supported_contexts)
    assert got.pop(str(facts.VERIFICATION))
    assert got == TABLE


def test_table_agrees_with_pydicom() -> None:
    for c in facts.STORAGE_SOP_CLASSES:
        known = UID_dictionary.get(c.uid)
        if known is not None:  # Label Map Segmentation (2024) is newer than pydicom 3.0's dictionary
            assert known[0] == c.name and known[1] == "SOP Class", c
        assert c.image == (c.completion is not Completion.OBJECT)
    assert len(facts.SOP_CLASSES) == len(facts.STORAGE_SOP_CLASSES)
    for t in facts.TRANSFER_SYNTAXES:
        assert t.uid.is_transfer_syntax, t
        assert t.implicit_vr == t.uid.is_implicit_VR and t.little_endian == t.uid.is_little_endian, t
        assert (t.encoding is Encoding.DEFLATED) == t.uid.is_deflated, t
        assert (t.encoding is Encoding.ENCAPSULATED) == t.uid.is_encapsulated, t
    assert len(facts.TRANSFER_SYNTAX_BY_UID) == len(facts.TRANSFER_SYNTAXES)
    assert not [t for t in facts.TRANSFER_SYNTAXES if not t.little_endian]  # no big endian
    # the images, the objects and the classes whose Pixel Data the door checks
    images = {c.name for c in facts.STORAGE_SOP_CLASSES if c.image}
    assert images == {"CT Image Storage", "Enhanced CT Image Storage", "Legacy Converted Enhanced CT Image Storage"}
    assert facts.PIXEL_DATA_CLASS_UIDS == {c.uid for c in facts.STORAGE_SOP_CLASSES
                                            if c.image or "Segmentation" in c.name}


def test_docs_carry_the_table() -> None:
    doc = (REPO / "docs" / "node.md").read_text(encoding="utf-8")
    assert facts.markdown() in doc, "docs/node.md: paste the output of `python -m node.dicom_facts`"


def test_states_are_the_stored_strings() -> None:
    from node import db

    assert db.JobState is facts.JobState and db.ExportState is facts.ExportState
    assert [str(s) for s in facts.SeriesState] == ["receiving", "complete", "purged"]
    assert db.Series.__table__.c.state.default.arg == facts.SeriesState.RECEIVING
    assert db.Sweep.__table__.c.state.default.arg == facts.SweepState.RUNNING
    assert db.SweepItem.__table__.c.state.default.arg == facts.SweepItemState.PENDING


# Completion by SOP class (pure) -----------------------------------------------------------


RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"  # starts with MR's "1.2.840.10008.5.1.4.1.1.4": no prefix rule


def test_completion_rule_by_sop_class_not_prefix() -> None:
    assert facts.completion_of(RTSTRUCT) is Completion.OBJECT
    assert facts.completion_of("1.2.840.10008.5.1.4.1.1.88.34") is Completion.OBJECT
    assert facts.completion_of("1.2.840.10008.5.1.4.1.1.66.4") is Completion.OBJECT
    assert facts.completion_of("1.2.840.10008.5.1.4.1.1.2") is Completion.STACK
    assert facts.completion_of("1.2.840.10008.5.1.4.1.1.2.1") is Completion.MULTIFRAME
    assert facts.completion_of("1.2.840.10008.5.1.4.1.1.4") is Completion.STACK  # not in the table: images


def test_objects_complete_by_their_own_rule() -> None:
    obj = SliceInfo(None, 1, Completion.OBJECT)
    assert geometry_reason([obj], None) is CompletionReason.OBJECT
    assert geometry_reason([obj, obj], 5) is CompletionReason.OBJECT  # an announced image count is not theirs
    assert geometry_reason([SliceInfo(None, 3, Completion.OBJECT)], None) is CompletionReason.OBJECT  # SEG
    assert decide([obj], None, idle=0.6, settle=0.5, quiet=20) is CompletionReason.OBJECT
    assert decide([obj], None, idle=0.1, settle=0.5, quiet=20) is None  # settle first, as every rule
    # an Enhanced CT of one frame, without top-level geometry, is still a volume
    assert geometry_reason([SliceInfo(None, 1, Completion.MULTIFRAME)], None) is CompletionReason.MULTIFRAME
    # objects in a series of images are left out of the images' geometry
    stack = [SliceInfo(p, 1) for p in (0.0, 2.0, 4.0)]
    assert geometry_reason([*stack, obj], None) is CompletionReason.GEOMETRY
    assert geometry_reason([*(SliceInfo(p, 1) for p in (0.0, 2.0, 6.0)), obj], None) is None  # a gap stays a gap
    # an image without geometry waits for the quiet time
    assert geometry_reason([SliceInfo(None, 1)], None) is None
    assert decide([SliceInfo(None, 1)], None, idle=19, settle=0.5, quiet=20) is None
    assert decide([SliceInfo(None, 1)], None, idle=20, settle=0.5, quiet=20) is CompletionReason.QUIET


# Real objects from other tools, sent by storescu ----------------------------------------


OBJECTS = (  # one instance per series: (file, SOP class name)
    ("rtutils_phantom_rtstruct/rt.dcm", "RT Structure Set Storage"),  # rt-utils, implicit VR
    ("rtutils_phantom_rtstruct/invalid_reference_rt.dcm", "RT Structure Set Storage"),  # MIM
    ("dcmqi_seg_sr_refs/segmentations/liver.dcm", "Segmentation Storage"),  # dcmqi, 3 frames
    ("dcmqi_seg_sr_refs/segmentations/sparse-labelmap-noppv.dcm", "Label Map Segmentation Storage"),
    ("dcmqi_seg_sr_refs/sr-example/sr.dcm", "Comprehensive SR Storage"),  # dcmqi TID 1500
    ("highdicom_testfiles/seg_image_ct_binary_single_frame.dcm", "Segmentation Storage"),  # one frame
    ("highdicom_testfiles/sr_document.dcm", "Comprehensive 3D SR Storage"),
    ("pydicom_testfiles/test-SR.dcm", "Comprehensive SR Storage"),
)


def storescu_profile(folder: Path) -> list[str]:
    """storescu options proposing every SOP class of the table (dcmtk 3.6.7 refuses to send the Label Map
    SEG class it does not know unless a config file names it), each with the native syntaxes."""
    lines = ["[[TransferSyntaxes]]", "[Native]", "TransferSyntax1 = LittleEndianExplicit",
             "TransferSyntax2 = LittleEndianImplicit", "[[PresentationContexts]]", "[Table]"]
    lines += [f"PresentationContext{i} = {c.uid}\\Native" for i, c in enumerate(facts.STORAGE_SOP_CLASSES, 1)]
    lines += ["[[Profiles]]", "[Table]", "PresentationContexts = Table"]
    path = folder / "storescu.cfg"
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return ["-xf", str(path), "Table"]


@pytest.mark.peers
def test_seg_rtstruct_sr_series_complete_on_arrival_not_after_quiet_time(tmp_path: Path, shared_data: Path) -> None:
    need("storescu")
    files = [shared_data / f for f, _ in OBJECTS]
    series = {}
    for (f, name), path in zip(OBJECTS, files, strict=True):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert facts.SOP_CLASSES[str(ds.SOPClassUID)].name == name, f
        series[str(ds.SeriesInstanceUID)] = f
    assert len(series) == len(OBJECTS)  # one series each
    quiet, settle = 30.0, 0.3
    cfg = write_config(tmp_path, completion={"quiet_seconds": quiet, "settle_seconds": settle})
    with running_node(cfg) as node:
        storescu(node.port, files, extra=storescu_profile(tmp_path))
        views = wait_until(lambda: (vs := [node.index.series(u) for u in series])
                           and all(v is not None and v.state == "complete" for v in vs) and vs,
                           10, what="every object series complete")
    for v in views:
        assert v is not None
        what = f"{series[v.series_uid]}: {v}"
        assert v.instances == 1, what
        assert v.completion_reason == CompletionReason.OBJECT, what
        assert v.completed_at is not None and settle <= v.completed_at - v.last_received < quiet / 3, what
