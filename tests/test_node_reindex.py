"""Storage writes and the index's re-index from disk (the files are the source of truth)."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pydicom

from node.db import Database
from node.index import Index
from node.storage import INCOMING, INSTANCES, Storage
from tests.synthetic_ct import write_study


def test_reindex_from_disk_restores_instances_the_index_lost(tmp_path: Path) -> None:
    study = write_study(tmp_path / "src", 0, dt.date(2024, 1, 2), slices=4)
    store = Storage(tmp_path / "var")
    for f in study.files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        store.write_instance(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                             (f.read_bytes(),))
    store.close()  # removes the temporary files made ahead of time
    assert not list((tmp_path / "var" / INSTANCES / INCOMING).iterdir())  # every write renamed: nothing left
    index = Index(Database(f"sqlite:///{tmp_path / 'lost.db'}"), store.root)  # an index that lost its commits
    assert index.reindex_from_disk(since=time.time() + 3600) == 0  # only files newer than `since`
    assert index.reindex_from_disk() == len(study.files)
    assert index.reindex_from_disk() == 0  # idempotent
    views = index.all_series()
    assert len(views) == 1 and views[0].instances == len(study.files) and views[0].modality == "CT"
