"""Export back-off, dead letters retried once the destination answers C-ECHO, one thread per
destination (issue 11, item 8), with dcmtk storescp as the destination.

Time is a fake clock where the schedule matters (``node.export.now``): the tests read the
scheduled ``next_attempt_at`` of each attempt and never wait for them."""

from __future__ import annotations

import datetime as dt
import random
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select

from node import export as export_mod
from node.audit import AuditLog
from node.config import Config, DestinationConfig, NodeConfig
from node.db import Database, Export, ExportState, Job, JobState
from node.export import Exporter, backed_off, is_dead_letter, nominal_delay, retry_delay
from tests.conftest import need
from tests.peers import free_port, stop_pid, wait_port, wait_until
from tests.synthetic_ct import write_study

pytestmark = pytest.mark.peers


def dest(name: str, port: int, **kw: float) -> DestinationConfig:
    return DestinationConfig(name=name, ae_title="STORESCP", host="127.0.0.1", port=port, **kw)  # type: ignore[arg-type]


@contextmanager
def storescp(port: int, folder: Path) -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(folder), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port)
        yield folder
    finally:
        stop_pid(proc)


@contextmanager
def silent_listener() -> Iterator[int]:
    """Accepts TCP connections (the kernel's backlog) and never answers: a hung PACS."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    try:
        yield int(s.getsockname()[1])
    finally:
        s.close()


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def setup(tmp_path: Path, destinations: list[DestinationConfig], results: int = 1,
          database_url: str = "") -> tuple[Database, Config, list[Path]]:
    need("storescp")
    study = write_study(tmp_path / "src", 0, dt.date(2024, 1, 2), slices=results)
    config = Config(node=NodeConfig(storage=tmp_path / "var"), destinations=tuple(destinations))
    db = Database(database_url or f"sqlite:///{tmp_path / 'prognode.db'}")
    with db.session() as s:
        job = Job(series_uid="1.2.3", study_uid="1.2", route="ct", pipeline="test-sr", inputs={}, input_key="k",
                  state=JobState.DONE.value)
        s.add(job)
        s.flush()
        for d in destinations:
            for i, f in enumerate(study.files):
                s.add(Export(job_id=job.id, destination=d.name, path=str(f), sop_instance_uid=f"1.2.3.{i}"))
    return db, config, list(study.files)


def rows(db: Database, destination: str) -> list[Export]:
    with db.read() as s:
        return list(s.scalars(select(Export).where(Export.destination == destination).order_by(Export.id)))


def test_backoff_schedule() -> None:
    d = dest("pacs", 104, retry_seconds=10, retry_max_seconds=40, retry_jitter=0.2, dead_letter_after_seconds=100)
    assert [nominal_delay(d, n) for n in range(1, 6)] == [10, 20, 40, 40, 40]
    assert backed_off(d, 3) == 70 and backed_off(d, 4) == 110 and backed_off(d, 100) == 10 + 20 + 40 * 98
    rng = random.Random(1)
    for n in range(1, 10):
        assert nominal_delay(d, n) <= retry_delay(d, n, rng) <= min(40, nominal_delay(d, n) * 1.2)
    assert [is_dead_letter(d, n) for n in range(1, 7)] == [False, False, False, False, True, True]
    assert is_dead_letter(dest("pacs", 104, max_attempts=2), 2)
    default = DestinationConfig(name="pacs", ae_title="PACS", host="h", port=104)
    assert default.dead_letter_after_seconds >= 24 * 3600 and default.max_attempts == 0
    assert not is_dead_letter(default, 20) and backed_off(default, 1000) < 1e9  # capped: no overflow


def test_down_backs_off_then_dead_letter_then_echo_requeues_and_delivers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()  # nothing listens yet
    d = dest("pacs", port, retry_seconds=10, retry_max_seconds=40, retry_jitter=0.2, dead_letter_after_seconds=100,
             probe_seconds=30, timeout_seconds=5)
    db, config, files = setup(tmp_path, [d])
    clock = Clock()
    monkeypatch.setattr(export_mod, "now", clock)
    audit = AuditLog(tmp_path / "audit.jsonl")
    exporter = Exporter(db, config, audit, rng=random.Random(7))
    scheduled = []
    for attempt in range(1, 6):
        assert exporter.tick() == 0
        (row,) = rows(db, "pacs")
        assert row.attempts == attempt and "association failed" in row.last_error
        if attempt < 5:
            assert row.state == ExportState.PENDING
            delay = row.next_attempt_at - clock.t
            assert nominal_delay(d, attempt) <= delay <= min(40, nominal_delay(d, attempt) * 1.2) + 1e-9
            scheduled.append(round(delay, 3))
            clock.t += delay / 2
            assert exporter.tick() == 0 and rows(db, "pacs")[0].attempts == attempt  # not due yet: no attempt
            clock.t = row.next_attempt_at
        else:
            assert row.state == ExportState.DEAD  # 10 + 20 + 40 + 40 >= 100 s of back-off
    assert scheduled == sorted(scheduled) and scheduled[0] >= 10 and scheduled[-1] <= 40
    # dead letter; the destination is probed every probe_seconds (30 s) and still down
    clock.t += 30
    exporter.tick()
    assert exporter._reach["pacs"].next_probe == clock.t + 30
    assert rows(db, "pacs")[0].state == ExportState.DEAD
    with storescp(port, tmp_path / "received") as received:
        clock.t += 10  # before the next probe: nothing happens
        exporter.tick()
        assert rows(db, "pacs")[0].state == ExportState.DEAD
        clock.t += 25  # the probe is due: C-ECHO answers, the dead letter is pending again and sent
        assert exporter.tick() == 1
        (row,) = rows(db, "pacs")
        assert row.state == ExportState.SENT and row.attempts == 1 and row.sent_at is not None
        assert len(list(received.iterdir())) == 1
    events = [e["event"] for e in audit.read()]
    assert events.count("export_failed") == 4 and events.count("export_dead") == 1
    assert "export_destination_up" in events and events[-1] == "export_sent"
    db.dispose()


def test_waiting_results_go_as_soon_as_the_destination_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               database_url: str) -> None:
    port = free_port()
    d = dest("pacs", port, retry_seconds=600, retry_max_seconds=3600, probe_seconds=5, timeout_seconds=5)
    db, config, _ = setup(tmp_path, [d], results=2, database_url=database_url)
    clock = Clock()
    monkeypatch.setattr(export_mod, "now", clock)
    exporter = Exporter(db, config, AuditLog(None))
    exporter.tick()
    assert all(r.attempts == 1 and r.next_attempt_at >= clock.t + 600 for r in rows(db, "pacs"))
    with storescp(port, tmp_path / "received") as received:
        clock.t += 6  # long before the next attempt, but the probe is due
        assert exporter.tick() == 2
        assert len(list(received.iterdir())) == 2
    db.dispose()


def test_a_hung_destination_does_not_hold_up_the_others(tmp_path: Path) -> None:
    need("storescp")
    port = free_port()
    with silent_listener() as hung, storescp(port, tmp_path / "received") as received:
        slow = dest("hung", hung, timeout_seconds=30)
        good = dest("good", port)
        db, config, files = setup(tmp_path, [slow, good], results=3)
        exporter = Exporter(db, config, AuditLog(None), poll_seconds=0.05)
        stop = threading.Event()
        t = threading.Thread(target=exporter.run, args=(stop,), daemon=True)
        t.start()
        try:
            wait_until(lambda: all(r.state == ExportState.SENT for r in rows(db, "good")), 25,
                       what="results at the good destination")
            # ... while the hung one is still in its first attempt (30 s association timeout)
            assert all(r.attempts == 0 and r.state == ExportState.PENDING for r in rows(db, "hung"))
            assert len(list(received.iterdir())) == 3
        finally:
            stop.set()
            exporter.wake.set()
    t.join(40)
    assert not t.is_alive()
    db.dispose()


def test_a_backlog_goes_in_bounded_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_mod, "BATCH", 3)  # results read into memory per association
    port = free_port()
    db, config, _ = setup(tmp_path, [dest("pacs", port)], results=5)
    exporter = Exporter(db, config, AuditLog(None))
    with storescp(port, tmp_path / "received") as received:
        assert exporter.tick() == 3
        assert exporter.tick() == 2
        assert len(list(received.iterdir())) == 5
    db.dispose()
