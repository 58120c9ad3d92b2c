"""Storage writes and the index's re-index from disk (the files are the source of truth)."""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
from pathlib import Path

import pydicom

from node.db import Database
from node.index import Index
from node.service import RUNNING_MARK
from node.storage import INCOMING, INSTANCES, Storage
from tests.node_helpers import running_node, write_config
from tests.peers import storescu, wait_until
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


def test_a_start_after_an_unclean_stop_indexes_what_the_index_lost(tmp_path: Path) -> None:
    """kill -9 or power loss leaves the running mark behind; the next start re-indexes the files
    received since the last start that the index lacks (its last commits may be gone)."""
    write_study(tmp_path / "ct", 0, dt.date(2024, 1, 2), slices=4)
    cfg = write_config(tmp_path)
    with running_node(cfg) as node:
        storescu(node.port, tmp_path / "ct")
        wait_until(lambda: node.index.instance_count() == 4, 10, what="4 instances indexed")
        mark = node.config.storage_dir / RUNNING_MARK
        db_file = Path(node.config.database_url.removeprefix("sqlite:///"))
        assert mark.exists()
    assert not mark.exists()  # a clean stop removes it
    with sqlite3.connect(db_file) as c:  # the index lost its last commits; the mark stayed
        c.execute("DELETE FROM instances")
        c.execute("DELETE FROM series")
    mark.write_text("1\n")
    with running_node(cfg) as node:
        assert node.index.instance_count() == 4
        assert [e for e in node.audit.read() if e["event"] == "index_recovered"][-1]["instances"] == 4
    with running_node(cfg) as node:  # after a clean stop nothing is looked at again
        assert len([e for e in node.audit.read() if e["event"] == "index_recovered"]) == 1
