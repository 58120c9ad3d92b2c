"""``prognode cohort features --source NAME --studies LIST.csv``: studies retrieved from Orthanc (C-GET, WADO-RS)
through the node's store path into per-study folders, extracted by the folder-based command, removed unless
--keep; a study that cannot be retrieved is an error row and the cohort goes on."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from node import cli as node_cli
from node.sweep.cohort import folder_name, read_study_list
from tests.conftest import need
from tests.peers import Orthanc, orthanc, sweep_node_config
from tests.phantoms import sphere_phantom, write_ct, write_seg

SPACING = (2.5, 1.0, 1.0)


@pytest.fixture(scope="module")
def cohort_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Orthanc, list[str]]]:
    """Orthanc holding two phantom studies (CT + SEG); s1 also has AccessionNumber ACC-1.  Yields the study UIDs."""
    need("Orthanc")
    root = tmp_path_factory.mktemp("cohort-pacs")
    uids: list[str] = []
    files: list[Path] = []
    for i, radius in enumerate((7.0, 9.0)):
        hu, tumour = sphere_phantom((12, 48, 48), SPACING, radius, seed=i, tumour_hu=50 + 10 * i)
        ct = write_ct(hu, SPACING, root / f"s{i}" / "ct", patient_id=f"P{i}")
        seg = write_seg(ct, tumour, root / f"s{i}" / "seg.dcm")
        for f in [*ct, seg]:
            ds = pydicom.dcmread(f)
            ds.AccessionNumber = f"ACC-{i}"
            ds.save_as(f)
        uids.append(str(pydicom.dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID))
        files += [*ct, seg]
    with orthanc(root / "orthanc") as o:
        o.upload(files)
        yield o, uids


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_study_list_reading(tmp_path: Path) -> None:
    p = tmp_path / "list.csv"
    p.write_text("StudyInstanceUID\n1.2.3\n# a comment\n\nACC-9,extra\n1.2.3\n")
    assert read_study_list(p) == ["1.2.3", "ACC-9"]
    assert folder_name("ACC 9/x") == "ACC_9_x"


@pytest.mark.parametrize("method", ["get", "wado"])
def test_cohort_features_from_a_source(tmp_path: Path, cohort_pacs: tuple[Orthanc, list[str]], method: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    pacs, uids = cohort_pacs
    cfg = sweep_node_config(tmp_path / "node", pacs, method, node_extra="fsync = false")
    studies = tmp_path / "studies.csv"
    # s0 by its StudyInstanceUID, s1 by its AccessionNumber, and one the PACS does not have
    studies.write_text(f"StudyInstanceUID\n{uids[0]}\nACC-1\n1.2.3.4.5\n")
    out = tmp_path / "features.csv"
    work = tmp_path / "work"
    keep = method == "wado"
    argv = ["cohort", "features", str(work), "--out", str(out), "--no-progress", "--config", str(cfg),
            "--source", "pacs", "--studies", str(studies), *(["--keep"] if keep else [])]
    assert node_cli.main(argv) == 0
    text = capsys.readouterr().out
    rows = _rows(out)
    assert sorted(r["study"] for r in rows) == sorted([uids[0], "ACC-1"]), text
    assert {r["study_uid"] for r in rows} == set(uids)
    by_study = {r["study"]: r for r in rows}
    assert float(by_study["ACC-1"]["intra_shape_VoxelVolume"]) > float(by_study[uids[0]]["intra_shape_VoxelVolume"])
    errors = _rows(out.with_name("features.errors.csv"))
    assert [(e["study"], e["stage"]) for e in errors] == [("1.2.3.4.5", "retrieve")]
    assert "no study with StudyInstanceUID 1.2.3.4.5" in errors[0]["reason"]
    # the per-study copies go unless --keep; the node's own copy stays in its storage (13 instances a study)
    assert sorted(p.name for p in work.iterdir()) == (sorted([uids[0], "ACC-1"]) if keep else [])
    assert len(list((tmp_path / "node" / "var" / "instances").rglob("*.dcm"))) == 2 * 13

    # again: both studies are in the table, nothing is retrieved, the unknown one is an error again
    assert node_cli.main(argv) == 0
    assert "2 already in" in capsys.readouterr().out
    assert len(_rows(out)) == 2
