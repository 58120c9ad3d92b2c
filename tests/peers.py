"""Real DICOM peers for tests, benchmarks and the demo: Orthanc, dcmtk tools, free ports.

Everything binds 127.0.0.1 on a free port, and whoever starts a process stops it by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PROGNODE_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def stop_pid(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, by PID (never by name)."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def bind_shim() -> Path:
    """Compile (once, cached) the LD_PRELOAD shim that keeps Orthanc on loopback."""
    src = REPO / "scripts" / "bind_localhost.c"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prognode"
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"bind_localhost-{int(src.stat().st_mtime)}.so"
    if not out.exists():
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(tmp), str(src), "-ldl"], check=True)
        os.replace(tmp, out)
    return out


@dataclass
class Orthanc:
    """A private Orthanc (with DICOMweb) on loopback: the PACS of tests and the demo."""

    workdir: Path
    aet: str = "ORTHANC"
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # name -> (aet, host, port)
    extra_config: dict[str, Any] = field(default_factory=dict)  # more Orthanc settings (e.g. DICOM TLS)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        plugins = [p for p in ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",) if Path(p).exists()]
        cfg = {
            "Name": "prognode-test-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "Plugins": plugins,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 2,
            "SaveJobs": False,
            "HttpThreadsCount": 4,
        }
        cfg.update(self.extra_config)
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(cfg, indent=1))
        env = dict(os.environ, LD_PRELOAD=str(bind_shim()))
        log = open(self.workdir / "orthanc.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            ["Orthanc", str(cfg_path)], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        wait_port(self.http_port, timeout)
        wait_port(self.dicom_port, timeout)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None

    # REST helpers ------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: bytes | str, content_type: str = "application/json") -> Any:
        data = body.encode() if isinstance(body, str) else body
        req = urllib.request.Request(self.url + path, data=data, method="POST", headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read() or b"null")

    def upload(self, files: Sequence[Path]) -> None:
        for f in files:
            self.post("/instances", f.read_bytes(), "application/dicom")

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        req = urllib.request.Request(
            f"{self.url}/modalities/{name}",
            data=json.dumps({"AET": aet, "Host": host, "Port": port}).encode(),
            method="PUT",
        )
        urllib.request.urlopen(req, timeout=10).read()

    def instances_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        found = self.post("/tools/find", json.dumps({"Level": "Instance", "Query": {"StudyInstanceUID": study_uid},
                                                     "Expand": True}))
        return list(found)

    def modalities_in_study(self, study_uid: str) -> list[str]:
        series = self.post("/tools/find", json.dumps({"Level": "Series", "Query": {"StudyInstanceUID": study_uid},
                                                      "Expand": True}))
        return sorted(s["MainDicomTags"].get("Modality", "") for s in series)


@contextmanager
def orthanc(workdir: Path | None = None, **kwargs: Any) -> Iterator[Orthanc]:
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="prognode-orthanc-")
        workdir = Path(tmp)
    o = Orthanc(workdir, **kwargs).start()
    try:
        yield o
    finally:
        o.stop()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def storescu(
    port: int,
    files: Sequence[Path] | Path,
    called: str = "PROGNODE",
    calling: str = "STORESCU",
    extra: Sequence[str] = (),
    check: bool = True,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu as the scanner; ``files`` may be a folder (sent with +sd +r)."""
    args = ["storescu", "-aet", calling, "-aec", called, *extra]
    if isinstance(files, Path) and files.is_dir():
        args += ["+sd", "+r", "127.0.0.1", str(port), str(files)]
    else:
        args += ["127.0.0.1", str(port), *[str(f) for f in files]]  # type: ignore[union-attr]
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=timeout)


def echoscu(port: int, called: str = "PROGNODE", calling: str = "ECHOSCU", extra: Sequence[str] = ()) -> int:
    return subprocess.run(["echoscu", "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port)],
                          capture_output=True, timeout=30).returncode


def dciodvfy(path: Path) -> tuple[bool, str]:
    """Run dicom3tools' dciodvfy; ok means no line starting with 'Error'."""
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    errors = [ln for ln in out.splitlines() if ln.startswith("Error")]
    return (not errors, out)


def wait_until(predicate: Any, timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached after {timeout}s")


def http_json(url: str, timeout: float = 10.0) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url}: HTTP {e.code}: {e.read()[:200]!r}") from e


# Real data with proper identifiers (node tests, bench, demo) ----------------------------


def with_uids(src: Path, dst: Path, seed: str = "prognode", patient_id: str = "PN-TEST-1") -> list[Path]:
    """Copy a series (e.g. the shared TotalSegmentator CT, whose UIDs are empty) giving it
    Study, Series and SOP Instance UIDs derived from ``seed``, CT Image Storage and a patient
    ID; pixel data and its encoding are kept as they are.  Returns the written files, sorted."""
    import pydicom
    from pydicom.uid import CTImageStorage, generate_uid

    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src.iterdir() if p.is_file())
    study, series = generate_uid(entropy_srcs=[seed, "study"]), generate_uid(entropy_srcs=[seed, "series"])
    out = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        sop = generate_uid(entropy_srcs=[seed, f.name])
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        if not ds.get("SOPClassUID"):
            ds.SOPClassUID = ds.file_meta.get("MediaStorageSOPClassUID", CTImageStorage)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        if not ds.get("PatientID"):
            ds.PatientID = patient_id
        if not ds.get("PatientName"):
            ds.PatientName = "Test^Prognode"
        if not ds.get("StudyID"):
            ds.StudyID = "1"
        if not ds.get("AccessionNumber"):
            ds.AccessionNumber = ""
        if ds.get("SeriesNumber") in (None, ""):
            ds.SeriesNumber = 1
        p = dst / f"{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


# Node configs that point at an Orthanc (tests/test_sweep.py, tests/test_tls.py, bench/sweep.py) ---------------


def pacs_source_toml(pacs: Orthanc, retrieve: str = "move", name: str = "pacs") -> str:
    """A ``[[sources]]`` entry of a node's config.toml for ``pacs`` (C-MOVE or C-GET; ``wado``: its DICOMweb
    plug-in as a ``kind = "dicomweb"`` source, QIDO-RS and WADO-RS)."""
    if retrieve == "wado":
        return f'[[sources]]\nname = "{name}"\nkind = "dicomweb"\nurl = "{pacs.url}/dicom-web"\n'
    return (f'[[sources]]\nname = "{name}"\nae_title = "{pacs.aet}"\nhost = "127.0.0.1"\n'
            f'port = {pacs.dicom_port}\nretrieve = "{retrieve}"\n')


def sweep_node_config(folder: Path, pacs: Orthanc, retrieve: str = "move", max_concurrent: int = 2,
                      node_extra: str = "", sweep_extra: str = "") -> Path:
    """``folder/config.toml`` of a node that sweeps ``pacs``.

    The node's DICOM port is free and registered in Orthanc as modality ``prognode`` (AE PROGNODE) for
    C-MOVE; storage and the audit file under ``folder/var``; the web dashboard is off (no port 8080).
    ``node_extra``/``sweep_extra`` are TOML lines added to ``[node]``/``[sweep]``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    pacs.add_modality("prognode", "PROGNODE", "127.0.0.1", port)
    cfg = folder / "config.toml"
    cfg.write_text(f'[node]\nae_title = "PROGNODE"\nhost = "127.0.0.1"\nport = {port}\nstorage = "var"\n{node_extra}\n'
                   f"{pacs_source_toml(pacs, retrieve)}\n"
                   f'[sweep]\nsource = "pacs"\nmax_concurrent = {max_concurrent}\n{sweep_extra}\n'
                   '[web]\nenabled = false\n[logging]\naudit_file = "var/audit.jsonl"\n')
    return cfg
