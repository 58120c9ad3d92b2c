"""DICOM TLS with dcmtk's +tls tools and certificates made here; AE/IP allow-lists; the audit log."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from node import config as config_mod
from node.access import AccessPolicy
from node.audit import AuditLog
from node.config import Config, TlsConfig
from node.db import Database
from node.sweep import Receiver, default_store_handler
from node.tls import TlsError, client_context, server_context, tls_args
from tests.conftest import need
from tests.peers import echoscu, free_port, pacs_source_toml, stop_pid, wait_port
from tests.synthetic_ct import write_study


@dataclass(frozen=True)
class Pki:
    folder: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # signed by another CA
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _leaf(folder: Path, name: str, ca: str, ca_key: str, san: str) -> None:
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=folder)
    (folder / f"{name}.ext").write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                                        "keyUsage=digitalSignature,keyEncipherment\n"
                                        "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-sha256", "-extfile", f"{name}.ext", cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    need("openssl")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                 "-days", "2", "-sha256", "-subj", f"/CN=prognode test {ca}",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                 cwd=d)
    _leaf(d, "server", "ca.crt", "ca.key", "IP:127.0.0.1,DNS:localhost")
    _leaf(d, "client", "ca.crt", "ca.key", "DNS:client.test")
    _leaf(d, "rogue", "rogue-ca.crt", "rogue-ca.key", "DNS:rogue.test")
    return Pki(d, d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key",
               d / "rogue.crt", d / "rogue.key")


def node_config(tmp: Path, pki: Pki, allowed_aets: str = "[]", allowed_hosts: str = "[]") -> Config:
    cfg = tmp / "config.toml"
    cfg.write_text(f"""
[node]
ae_title = "PROGNODE"
port = {free_port()}
storage = "var"
fsync = false
allowed_calling_aets = {allowed_aets}
allowed_hosts = {allowed_hosts}
[node.tls]
enabled = true
certificate = "{pki.server_cert}"
private_key = "{pki.server_key}"
ca_certificates = "{pki.ca}"
""")
    c = config_mod.load(cfg)
    c.storage_dir.mkdir(parents=True, exist_ok=True)
    return c


@pytest.fixture
def tls_scp(tmp_path: Path, pki: Pki) -> Iterator[tuple[Config, Database, AuditLog]]:
    cfg = node_config(tmp_path, pki, allowed_aets='["STORESCU", "ECHOSCU@127.0.0.0/8", "FARAWAY@10.9.0.0/16"]')
    db = Database(cfg.database_url)
    audit = AuditLog(tmp_path / "audit.jsonl")
    receiver = Receiver(cfg, default_store_handler(cfg, db, audit=audit), audit)
    try:
        yield cfg, db, audit
    finally:
        receiver.stop()
        db.dispose()


def _dcmtk(tool: str, port: int, calling: str, tls: list[str], files: list[str] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool, "-aet", calling, "-aec", "PROGNODE", *tls, "127.0.0.1", str(port), *files],
                          capture_output=True, text=True, timeout=60)


def test_dcmtk_tls_to_pynetdicom_scp(tls_scp: tuple[Config, Database, AuditLog], pki: Pki, tmp_path: Path) -> None:
    need("echoscu", "storescu")
    cfg, _db, audit = tls_scp
    port = cfg.node.port
    good = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
    assert _dcmtk("echoscu", port, "ECHOSCU", good).returncode == 0
    study = write_study(tmp_path / "dcm", 0, dt.date(2026, 3, 2), slices=2)
    r = _dcmtk("storescu", port, "STORESCU", good, [str(f) for f in study.files])
    assert r.returncode == 0, r.stdout + r.stderr
    stored = sorted((cfg.storage_dir / "instances").rglob("*.dcm"))
    assert len(stored) == 2 and dcmread(stored[0]).StudyInstanceUID == study.study_uid
    # no client certificate (anonymous TLS), a certificate from another CA, and plain TCP all fail
    assert _dcmtk("echoscu", port, "ECHOSCU", ["+tla", "+cf", str(pki.ca)]).returncode != 0
    rogue = ["+tls", str(pki.rogue_key), str(pki.rogue_cert), "+cf", str(pki.ca)]
    assert _dcmtk("echoscu", port, "ECHOSCU", rogue).returncode != 0
    assert _dcmtk("echoscu", port, "ECHOSCU", []).returncode != 0
    # allow-lists: an unknown AE, and an AE allowed only from another network, are rejected
    assert _dcmtk("echoscu", port, "INTRUDER", good).returncode != 0
    assert _dcmtk("echoscu", port, "FARAWAY", good).returncode != 0
    records = audit.read()
    stores = [r for r in records if r["event"] == "instance_stored"]
    assert len(stores) == 2 and stores[0]["calling_ae"] == "STORESCU" and stores[0]["ts"].endswith("+00:00")
    rejected = [r for r in records if r["event"] == "association_rejected"]
    assert [r["calling_ae"] for r in rejected] == ["INTRUDER", "FARAWAY"]
    assert "not allowed from 127.0.0.1" in rejected[1]["reason"]


def test_pynetdicom_tls_scu_to_dcmtk_storescp(tmp_path: Path, pki: Pki) -> None:
    need("storescp")
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "-aet", "DCMTKSCP", "+tls", str(pki.server_key), str(pki.server_cert),
                             "+cf", str(pki.ca), "-rc", "-od", str(out), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_port(port)
        study = write_study(tmp_path / "dcm", 1, dt.date(2026, 3, 2), slices=1)
        ds = dcmread(study.files[0])
        peer = TlsConfig(enabled=True, certificate=pki.client_cert, private_key=pki.client_key,
                         ca_certificates=pki.ca)
        ae = AE(ae_title="PROGNODE")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="DCMTKSCP", tls_args=tls_args(peer, tmp_path, "127.0.0.1"))
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assoc.release()
        assert int(status.Status) == 0
        assert len(list(out.iterdir())) == 1
        # hostname checking also works when the certificate names the host
        ctx = client_context(peer, tmp_path, check_hostname=True)
        assoc = ae.associate("127.0.0.1", port, ae_title="DCMTKSCP", tls_args=(ctx, "127.0.0.1"))
        assert assoc.is_established
        assoc.release()
        # an SCU without a client certificate is refused by storescp -rc
        anon = TlsConfig(enabled=False, ca_certificates=pki.ca)
        assoc = ae.associate("127.0.0.1", port, ae_title="DCMTKSCP", tls_args=(client_context(anon, tmp_path),
                                                                               "127.0.0.1"))
        assert not assoc.is_established
    finally:
        stop_pid(proc)


def test_tls_config_errors(tmp_path: Path, pki: Pki) -> None:
    assert tls_args(TlsConfig(), tmp_path, "h") is None
    with pytest.raises(TlsError, match="not found"):
        server_context(TlsConfig(enabled=True, certificate=Path("missing.crt"), private_key=pki.server_key,
                                 ca_certificates=pki.ca), tmp_path)
    with pytest.raises(TlsError, match="needs ca_certificates"):
        server_context(TlsConfig(enabled=True, certificate=pki.server_cert, private_key=pki.server_key), tmp_path)
    with pytest.raises(TlsError, match="cannot load"):
        server_context(TlsConfig(enabled=True, certificate=pki.server_cert, private_key=pki.client_key,
                                 ca_certificates=pki.ca), tmp_path)


def test_access_policy_rules() -> None:
    p = AccessPolicy.from_lists(["CT1", "PACS@10.0.0.0/24"], ["10.0.0.0/8", "127.0.0.1"])
    assert p.check("CT1", "10.1.2.3") is None
    assert p.check("PACS", "10.0.0.7") is None
    assert p.check("PACS", "10.0.1.7") is not None
    assert p.check("CT2", "10.0.0.7") is not None
    assert p.check("CT1", "192.168.1.1") is not None
    assert AccessPolicy.from_lists([], []).check("ANY", "203.0.113.9") is None


def test_node_scp_allow_list_pairs(tmp_path: Path) -> None:
    """The node's own SCP honours "AET@network" entries next to plain AE titles."""
    need("echoscu")
    from node.index import Index
    from node.server import DicomServer
    from node.storage import Storage

    cfg_file = tmp_path / "config.toml"
    cfg_file.write_text(f'[node]\nport = {free_port()}\nstorage = "var"\n'
                        'allowed_calling_aets = ["ECHOSCU@127.0.0.0/8", "FARAWAY@10.9.0.0/16", "PLAIN"]\n')
    cfg = config_mod.load(cfg_file)
    cfg.storage_dir.mkdir()
    db = Database(cfg.database_url)
    audit = AuditLog(tmp_path / "audit.jsonl")
    server = DicomServer(cfg, Storage(cfg.storage_dir), Index(db, cfg.storage_dir), audit).start()
    try:
        port = cfg.node.port
        assert echoscu(port, calling="ECHOSCU") == 0
        assert echoscu(port, calling="PLAIN") == 0
        assert echoscu(port, calling="FARAWAY") != 0
        assert echoscu(port, calling="INTRUDER") != 0
    finally:
        server.stop(timeout=5)
        db.dispose()
    rejected = [r["calling_ae"] for r in audit.read() if r["event"] == "association_rejected"]
    assert "FARAWAY" in rejected


@pytest.mark.parametrize("method", ["get", "move"])
def test_sweep_over_dicom_tls(tmp_path: Path, pki: Pki, method: str) -> None:
    """Orthanc with DICOM TLS as the PACS: the sweep's C-FIND and C-GET/C-MOVE run over mutual TLS."""
    need("Orthanc")
    from node.sweep import run_sweep
    from tests.peers import orthanc

    study = write_study(tmp_path / "dcm", 3, dt.date(2026, 3, 2), slices=3)
    tls_cfg = {"DicomTlsEnabled": True, "DicomTlsCertificate": str(pki.server_cert),
               "DicomTlsPrivateKey": str(pki.server_key), "DicomTlsTrustedCertificates": str(pki.ca),
               "DicomTlsRemoteCertificateRequired": True}
    with orthanc(tmp_path / "orthanc", extra_config=tls_cfg) as pacs:
        pacs.upload(list(study.files))
        cfg = node_config(tmp_path, pki)
        pacs.add_modality("prognode", "PROGNODE", "127.0.0.1", cfg.node.port)
        if method == "move":  # Orthanc must open TLS to the node for the C-MOVE sub-operations
            req = urllib.request.Request(f"{pacs.url}/modalities/prognode", method="PUT", data=json.dumps(
                {"AET": "PROGNODE", "Host": "127.0.0.1", "Port": cfg.node.port, "UseDicomTls": True}).encode())
            urllib.request.urlopen(req, timeout=10).read()
        text = (tmp_path / "config.toml").read_text() + pacs_source_toml(pacs, method) + f"""[sources.tls]
enabled = true
certificate = "{pki.client_cert}"
private_key = "{pki.client_key}"
ca_certificates = "{pki.ca}"
"""
        (tmp_path / "config.toml").write_text(text)
        cfg = config_mod.load(tmp_path / "config.toml")
        db = Database(cfg.database_url)
        out = run_sweep(cfg, db, dt.date(2026, 3, 1), dt.date(2026, 3, 5))
        assert (out.studies, out.retrieved, out.instances_retrieved, out.failed) == (1, 1, 3, 0)
        db.dispose()


def test_node_scp_over_tls_with_dcmtk(tmp_path: Path, pki: Pki) -> None:
    """The node itself (Node: SCP, index, completion) accepts dcmtk storescu +tls with a client certificate."""
    need("storescu", "echoscu")
    from node.service import Node

    cfg = node_config(tmp_path, pki)
    (tmp_path / "config.toml").write_text((tmp_path / "config.toml").read_text() + "[web]\nenabled = false\n")
    cfg = config_mod.load(tmp_path / "config.toml")
    node = Node(cfg).start()
    try:
        port = cfg.node.port
        good = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
        study = write_study(tmp_path / "dcm", 4, dt.date(2026, 3, 2), slices=2)
        r = _dcmtk("storescu", port, "STORESCU", good, [str(f) for f in study.files])
        assert r.returncode == 0, r.stdout + r.stderr
        assert _dcmtk("echoscu", port, "ECHOSCU", []).returncode != 0  # plain TCP refused
        assert _dcmtk("echoscu", port, "ECHOSCU", ["+tla", "+cf", str(pki.ca)]).returncode != 0  # no client cert
    finally:
        node.stop(timeout=5)
    assert len(list((cfg.storage_dir).rglob("*.dcm"))) == 2


def test_silent_tls_clients_do_not_block_accepts(tmp_path: Path, pki: Pki) -> None:
    """The TLS handshake runs in the connection's own thread with node.association_timeout: clients that
    connect and say nothing (or send garbage instead of a ClientHello) neither stop dcmtk's echoscu +tls
    from getting through at once nor stay open past the timeout."""
    need("echoscu")
    from node.index import Index
    from node.server import DicomServer
    from node.storage import Storage
    from tests.probes import closed_within, connect, stalled_connections

    cfg = node_config(tmp_path, pki)
    cfg = config_mod.load(tmp_path / "config.toml", [f"node.association_timeout={1.5}"])
    db = Database(cfg.database_url)
    server = DicomServer(cfg, Storage(cfg.storage_dir), Index(db, cfg.storage_dir), AuditLog(None),
                         server_context(cfg.node.tls, cfg.base_dir)).start()
    port = cfg.node.port
    silent = [connect(port) for _ in range(5)] + stalled_connections(port, 3)
    try:
        good = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca), "-to", "5", "-ta", "5"]
        assert _dcmtk("echoscu", port, "ECHOSCU", good).returncode == 0
        assert closed_within(silent, 10)[0] == len(silent)
        assert _dcmtk("echoscu", port, "ECHOSCU", good).returncode == 0
    finally:
        for s in silent:
            s.close()
        server.stop(timeout=2)
        db.dispose()
