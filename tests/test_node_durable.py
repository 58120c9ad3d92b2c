"""Durability corners (issue 11, item 8): unique temporary files, one Storage per process, a failed
index write that leaves an earlier acknowledged file alone."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from node.db import Instance
from node.handlers import OUT_OF_RESOURCES
from node.server import route_keywords
from node.storage import INCOMING, INSTANCES, Storage
from node.sweep import default_store_handler
from tests.node_helpers import dataset_bytes, running_node, send_raw, write_config
from tests.synthetic_ct import write_study


def _uids(f: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def test_two_storages_of_one_folder_never_share_a_temporary_file(tmp_path: Path) -> None:
    """Before: both made ``<pid>.<serial>.tmp`` with O_TRUNC, so the second truncated and reused the
    first's file made ahead of time, and an acknowledged instance got another instance's bytes."""
    study = write_study(tmp_path / "src", 0, dt.date(2024, 1, 2), slices=12)
    a, b = Storage(tmp_path / "var", fsync=False), Storage(tmp_path / "var", fsync=False)
    try:
        written = {}
        for i, f in enumerate(study.files):
            store = a if i % 2 == 0 else b
            stored = store.write_instance(*_uids(f), (f.read_bytes(),))
            written[stored.path] = f.read_bytes()
            for s in (a, b):  # let each make its next temporary file ahead of time, interleaved
                s._maker.submit(lambda: None).result()
        for rel, data in written.items():
            assert (tmp_path / "var" / rel).read_bytes() == data
    finally:
        a.close()
        b.close()
    assert not list((tmp_path / "var" / INSTANCES / INCOMING).iterdir())


def test_temporary_files_are_created_exclusively(tmp_path: Path) -> None:
    store = Storage(tmp_path / "var", fsync=False)
    try:
        serial = next(store._serial)
        squatter = tmp_path / "var" / INSTANCES / INCOMING
        squatter.mkdir(parents=True, exist_ok=True)
        taken = squatter / f"{os.getpid()}.{store._token}.{serial + 1}.tmp"
        taken.write_bytes(b"somebody else's")
        tmp, fd = store._new_temporary()
        os.close(fd)
        assert tmp != taken and taken.read_bytes() == b"somebody else's"
    finally:
        store.close()


def test_one_storage_per_process_and_folder(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    with running_node(cfg) as node:
        assert Storage.shared(node.config.storage_dir, node.config.node.fsync,
                              node.config.node.min_free_bytes) is node.storage
        node.storage.close()  # that holder is done; the node's use goes on
        handler: Any = default_store_handler(node.config, node.db)  # what a C-GET sweep inside serve uses
        assert handler.keywords["store"] is node.storage
        assert handler.keywords["extra_keywords"] == route_keywords(node.config)  # the SCP's route keywords
        assert not node.storage._closed
        node.storage.close()
    assert node.storage._closed  # the node's stop closed it: its last holder
    fresh = Storage.shared(node.config.storage_dir)
    assert fresh is not node.storage
    fresh.close()


@pytest.mark.peers
def test_failed_index_write_keeps_the_earlier_acknowledged_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = write_study(tmp_path / "src", 0, dt.date(2024, 1, 2), slices=1)
    first = study.files[0]
    second = tmp_path / "second.dcm"  # the same instance (UIDs), other bytes
    ds = pydicom.dcmread(first)
    ds.InstanceNumber = 99
    ds.save_as(second)
    cfg = write_config(tmp_path)
    with running_node(cfg) as node:
        sop_class, sop, ts, payload = dataset_bytes(first)
        assert send_raw(node.port, sop_class, sop, ts, payload)[0] == 0
        with node.db.read() as s:
            row = s.get(Instance, sop)
            assert row is not None
            path, sha = row.path, row.sha256
        original = (node.config.storage_dir / path).read_bytes()

        def broken(*_a: Any, **_k: Any) -> Any:
            raise RuntimeError("index unavailable")

        monkeypatch.setattr(node.index, "record_instance", broken)
        monkeypatch.setattr(node.index, "has_instance_safely", lambda _sop: False)  # the index cannot even be read
        status, comment = send_raw(node.port, *dataset_bytes(second)[:3], dataset_bytes(second)[3])
        assert status == OUT_OF_RESOURCES and "index write failed" in comment
        assert (node.config.storage_dir / path).read_bytes() == original  # still there, unchanged
        assert hashlib.sha256(original).hexdigest() == sha
        with node.db.read() as s:
            row = s.get(Instance, sop)
            assert row is not None and row.sha256 == sha and row.path == path  # and indexed as before
        monkeypatch.undo()
        assert send_raw(node.port, *dataset_bytes(second)[:3], dataset_bytes(second)[3])[0] == 0
        replaced = (node.config.storage_dir / path).read_bytes()
        assert replaced != original and pydicom.dcmread(node.config.storage_dir / path).InstanceNumber == 99
        with node.db.read() as s:
            assert s.scalar(select(Instance.sha256).where(Instance.sop_instance_uid == sop)) == \
                hashlib.sha256(replaced).hexdigest()
        spares = {p.name for p in (node.config.storage_dir / INSTANCES / INCOMING).iterdir()}
    # nothing staged is left behind (only the temporaries made ahead of time, removed at stop)
    assert len(spares) <= 8
    assert not list((tmp_path / "var" / INSTANCES / INCOMING).iterdir())


def test_a_new_file_is_removed_when_its_index_write_fails(tmp_path: Path) -> None:
    study = write_study(tmp_path / "src", 0, dt.date(2024, 1, 2), slices=1)
    store = Storage(tmp_path / "var", fsync=False)
    try:
        stored = store.stage_instance(*_uids(study.files[0]), (study.files[0].read_bytes(),))
        assert not stored.staged and (store.root / stored.path).exists()
        store.discard(stored)
        assert not (store.root / stored.path).exists()
        first = store.write_instance(*_uids(study.files[0]), (b"first",))
        again = store.stage_instance(*_uids(study.files[0]), (b"second",))
        assert again.staged and (store.root / first.path).read_bytes() == b"first"
        store.commit(again)
        assert (store.root / first.path).read_bytes() == b"second" and not Path(again.staged).exists()
    finally:
        store.close()
