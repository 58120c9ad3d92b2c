"""Helpers for the node tests: configs on free ports, an in-process node, a raw C-STORE SCU."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from node.config import Config, load
from node.service import Node
from tests.node_pipelines import FACTORIES
from tests.peers import REPO, free_port

FAST = {"completion": {"settle_seconds": 0.3, "quiet_seconds": 2.0, "poll_seconds": 0.05},
        "jobs": {"retry_seconds": 0.3, "max_attempts": 2}}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(folder: Path, destinations: Sequence[dict[str, Any]] = (), routes: Sequence[dict[str, Any]] = (),
                 pipelines: dict[str, dict[str, Any]] | None = None, **sections: dict[str, Any]) -> Path:
    """A config.toml in ``folder``: node on a free port, storage in ``folder/var``, fast timings."""
    data: dict[str, dict[str, Any]] = {"node": {"port": free_port(), "storage": "var", "min_free_bytes": 0},
                                       "web": {"enabled": False}}
    for k, v in FAST.items():
        data[k] = dict(v)
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    for d in destinations:
        lines.append("[[destinations]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in d.items()]
    for r in routes:
        lines.append("[[routes]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in r.items()]
    for name, opts in (pipelines or {}).items():
        lines.append(f'[pipelines."{name}"]')
        lines += [f"{k} = {_toml_value(v)}" for k, v in opts.items()]
    path = folder / "config.toml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def pacs_destination(port: int, **kw: Any) -> dict[str, Any]:
    return {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": port, "retry_seconds": 0.3,
            "max_attempts": 50, **kw}


ROUTE = {"name": "ct", "when": {"Modality": "CT"}, "pipelines": ["test-sr"], "send_to": ["pacs"]}


@contextmanager
def running_node(config_path: Path, overrides: Sequence[str] = ()) -> Iterator[Node]:
    """An in-process node with the test pipelines; stopped afterwards."""
    config = load(config_path, list(overrides), environ={})
    node = Node(config, factories=FACTORIES).start()
    try:
        yield node
    finally:
        node.stop(timeout=10)


def config_of(config_path: Path) -> Config:
    return load(config_path, environ={})


def node_process(config_path: Path, test_pipelines: bool = False, log: Path | None = None) -> subprocess.Popen[bytes]:
    """The node as a separate process: ``python -m node serve`` (or the same CLI with test pipelines)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    entry = [str(REPO / "tests" / "node_serve.py")] if test_pipelines else ["-m", "node"]
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, *entry, "serve", "--config", str(config_path)], cwd=REPO, env=env,
                            stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                            start_new_session=True)


def cli(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=check)


def send_raw(port: int, sop_class: str, sop_instance: str, transfer_syntax: str, payload: bytes,
             called: str = "PROGNODE") -> tuple[int, str]:
    """C-STORE an already-encoded dataset as-is (pynetdicom SCU, chunked send from a file whose
    meta names the SOP class, instance and transfer syntax); returns (status, ErrorComment)."""
    import tempfile
    from io import BytesIO

    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom import AE, _config
    from pynetdicom.presentation import build_context

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    buf = BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=False)  # type: ignore[arg-type]
    with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
        f.write(buf.getvalue() + payload)
        f.flush()
        ae = AE(ae_title="RAWSCU")
        ae.requested_contexts = [build_context(sop_class, [transfer_syntax])]
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        assert assoc.is_established, "association failed"
        old = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            rsp = assoc.send_c_store(Path(f.name))
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = old
            assoc.release()
    if rsp is None or "Status" not in rsp:
        return -1, ""
    return int(rsp.Status), str(rsp.get("ErrorComment", "") or "")


def dataset_bytes(path: Path) -> tuple[str, str, str, bytes]:
    """(SOP class, SOP instance, transfer syntax, encoded dataset without file meta) of a DICOM file,
    identifiers taken from the file meta (they may be empty in the dataset)."""
    import pydicom
    from pynetdicom.dsutils import encode

    ds = pydicom.dcmread(path)
    ts = ds.file_meta.TransferSyntaxUID
    payload = encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    assert payload is not None
    return (str(ds.file_meta.MediaStorageSOPClassUID), str(ds.file_meta.MediaStorageSOPInstanceUID), str(ts),
            payload)
