"""DICOM TLS with dcmtk's +tls tools and certificates made here; AE/IP allow-lists; the audit log."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE

from node import config as config_mod
from node.access import AccessPolicy
from node.audit import AuditLog
from node.config import Config, SourceConfig
from node.db import Database
from node.index import Index
from node.server import DicomServer
from node.storage import Storage
from node.sweep import default_store_handler
from node.tls import TlsError, client_context, client_identity_handlers, server_context
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
    rogue_ca: Path
    elsewhere_cert: Path  # signed by the CA, names only pacs.elsewhere.test (not 127.0.0.1)
    elsewhere_key: Path


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
    _leaf(d, "elsewhere", "ca.crt", "ca.key", "DNS:pacs.elsewhere.test")
    return Pki(d, d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key",
               d / "rogue.crt", d / "rogue.key", d / "rogue-ca.crt", d / "elsewhere.crt", d / "elsewhere.key")


def node_config(tmp: Path, pki: Pki, allowed_aets: str = "[]", allowed_hosts: str = "[]",
                node_tls_extra: str = "") -> Config:
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
ca_bundle = "{pki.ca}"
{node_tls_extra}
""")
    c = config_mod.load(cfg)
    c.storage_dir.mkdir(parents=True, exist_ok=True)
    return c


@pytest.fixture
def tls_scp(tmp_path: Path, pki: Pki) -> Iterator[tuple[Config, Database, AuditLog]]:
    cfg = node_config(tmp_path, pki, allowed_aets='["STORESCU", "ECHOSCU@127.0.0.0/8", "FARAWAY@10.9.0.0/16"]')
    db = Database(cfg.database_url)
    audit = AuditLog(tmp_path / "audit.jsonl")
    server = DicomServer(cfg, Storage(cfg.storage_dir, fsync=False), Index(db, cfg.storage_dir), audit,
                         server_context(cfg.node.tls, cfg.base_dir),
                         extra_handlers=client_identity_handlers(cfg.node.tls, audit)).start()
    try:
        yield cfg, db, audit
    finally:
        server.stop(timeout=5)
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


@contextlib.contextmanager
def storescp_tls(folder: Path, key: Path, cert: Path, ca: Path, peer_auth: str = "-rc") -> Iterator[tuple[int, Path]]:
    """dcmtk storescp +tls as the PACS (AE DCMTKSCP): ``peer_auth`` -rc requires a client certificate
    from ``ca`` (mutual TLS), -ic asks for none.  Yields (port, folder the received files land in)."""
    need("storescp")
    port = free_port()
    out = folder / f"received-{port}"
    out.mkdir(parents=True)
    proc = subprocess.Popen(["storescp", "-aet", "DCMTKSCP", "+tls", str(key), str(cert), "+cf", str(ca),
                             peer_auth, "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port, out
    finally:
        stop_pid(proc)


def _destination(name: str, port: int, tls: str) -> str:
    return (f'[[destinations]]\nname = "{name}"\nae_title = "DCMTKSCP"\nhost = "127.0.0.1"\nport = {port}\n'
            f"max_attempts = 1\n[destinations.tls]\n{tls}\n")


def _peer_config(tmp: Path, destinations: str) -> Path:
    cfg = tmp / "peers.toml"
    cfg.write_text(f'[node]\nae_title = "PROGNODE"\nstorage = "var"\n[web]\nenabled = false\n'
                   f'[logging]\naudit_file = "var/audit.jsonl"\n{destinations}')
    return cfg


def _echo(cfg: Path, name: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from node.cli import main

    rc = main(["echo", name, "--config", str(cfg), "--timeout", "5"])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_export_over_mutual_tls_to_dcmtk_storescp(tmp_path: Path, pki: Pki) -> None:
    """The export's C-STORE goes over TLS with the destination's CA bundle and client certificate to a
    storescp +tls that requires one (-rc): the results with patient name and ID arrive; the same
    destination without our client certificate gets a dead letter that says why."""
    from sqlalchemy import select

    from node.db import Export, Job
    from node.export import Exporter

    study = write_study(tmp_path / "dcm", 5, dt.date(2026, 3, 2), slices=2)
    with storescp_tls(tmp_path, pki.server_key, pki.server_cert, pki.ca) as (port, out):
        mutual = (f'enabled = true\nca_bundle = "{pki.ca}"\nclient_certificate = "{pki.client_cert}"\n'
                  f'client_private_key = "{pki.client_key}"')
        cfg = config_mod.load(_peer_config(tmp_path, _destination("pacs", port, mutual)
                                           + _destination("nocert", port, f'enabled = true\nca_bundle = "{pki.ca}"')))
        cfg.storage_dir.mkdir()
        db = Database(cfg.database_url)
        try:
            with db.session() as s:
                s.add(Job(id=1, series_uid=study.series_uids[0], study_uid=study.study_uid, route="r",
                          pipeline="p", input_key="k1", state="done"))
                s.flush()
                for dest in ("pacs", "nocert"):
                    for f in study.files:
                        s.add(Export(job_id=1, destination=dest, path=str(f),
                                     sop_instance_uid=str(dcmread(f).SOPInstanceUID)))
            assert Exporter(db, cfg, AuditLog(None)).tick() == 2
            with db.read() as s:
                rows = {(r.destination, r.state): r.last_error for r in s.scalars(select(Export))}
        finally:
            db.dispose()
        received = sorted(out.iterdir())
        assert len(received) == 2
        ds = dcmread(received[0])
        assert ds.PatientID == dcmread(study.files[0]).PatientID and ds.StudyInstanceUID == study.study_uid
        assert ("pacs", "sent") in rows and ("nocert", "dead") in rows
        assert "TLS" in rows[("nocert", "dead")] and "client certificate" in rows[("nocert", "dead")]


def test_echo_over_tls_verifies_the_peer(tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    """``prognode echo`` uses each destination's tls: mutual TLS to a storescp +tls -rc; server-authenticated
    TLS (a CA bundle, no client certificate) to one that asks for none; refused with a clear error: a
    certificate for another name at 127.0.0.1 (unless server_hostname names it), a CA bundle that did not
    sign the PACS's certificate, and plain TCP to a TLS port."""
    need("storescp")
    ca = f'enabled = true\nca_bundle = "{pki.ca}"'
    client = f'\nclient_certificate = "{pki.client_cert}"\nclient_private_key = "{pki.client_key}"'
    with storescp_tls(tmp_path, pki.server_key, pki.server_cert, pki.ca) as (mport, _), \
            storescp_tls(tmp_path, pki.elsewhere_key, pki.elsewhere_cert, pki.ca, "-ic") as (eport, _), \
            storescp_tls(tmp_path, pki.server_key, pki.server_cert, pki.ca, "-ic") as (sport, _):
        cfg = _peer_config(tmp_path, "".join([
            _destination("mutual", mport, ca + client),
            _destination("server-only", sport, ca),
            _destination("by-localhost", sport, ca + '\nserver_hostname = "localhost"'),
            _destination("elsewhere", eport, ca),
            _destination("elsewhere-named", eport, ca + '\nserver_hostname = "pacs.elsewhere.test"'),
            _destination("wrong-ca", sport, f'enabled = true\nca_bundle = "{pki.rogue_ca}"'),
            _destination("plain", sport, "enabled = false"),
        ]))
        for name in ("mutual", "server-only", "by-localhost", "elsewhere-named"):
            rc, text = _echo(cfg, name, capsys)
            assert rc == 0 and "over TLS): ok" in text, (name, text)
        rc, text = _echo(cfg, "elsewhere", capsys)
        assert rc == 1 and "does not name '127.0.0.1'" in text and "server_hostname" in text, text
        rc, text = _echo(cfg, "wrong-ca", capsys)
        assert rc == 1 and "not trusted" in text and "ca_bundle" in text, text
        rc, text = _echo(cfg, "plain", capsys)
        assert rc == 1 and "no association" in text, text


def test_sweep_associates_with_the_sources_tls(tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep's associations (C-FIND, C-MOVE, C-GET all go through ``Sweeper._associate``) carry the
    source's client context: host name checked, CA bundle only, our certificate for mutual TLS."""
    from node.sweep import Sweeper, SweepError

    (tmp_path / "c.toml").write_text(f"""[[sources]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242
[sources.tls]
enabled = true
ca_bundle = "{pki.ca}"
client_certificate = "{pki.client_cert}"
client_private_key = "{pki.client_key}"
server_hostname = "pacs.test"
""")
    cfg = config_mod.load(tmp_path / "c.toml", environ={})
    seen: list[Any] = []

    def fake_associate(self: AE, host: str, port: int, **kw: Any) -> Any:
        seen.append((host, port, kw))

        class _Assoc:
            is_established = is_rejected = is_aborted = False
        return _Assoc()

    monkeypatch.setattr(AE, "associate", fake_associate)
    sweeper = Sweeper(cfg, None, default_store_handler)  # type: ignore[arg-type]
    with pytest.raises(SweepError, match="pacs"):
        src = cfg.source("pacs")
        assert isinstance(src, SourceConfig)
        sweeper._associate(src, AE(ae_title="PROGNODE"))
    (host, port, kw), = seen
    ctx, hostname = kw["tls_args"]
    assert (host, port, hostname, kw["ae_title"]) == ("127.0.0.1", 4242, "pacs.test", "PACS")
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert len(ctx.get_ca_certs()) == 1  # the configured CA, not the system store


def test_tls_config_errors(tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    """Each setting is checked where it belongs and the error names the key."""
    from node.config import ConfigError, NodeTlsConfig, PeerTlsConfig

    def load_error(text: str) -> str:
        (tmp_path / "bad.toml").write_text(text)
        with pytest.raises(ConfigError) as e:
            config_mod.load(tmp_path / "bad.toml", environ={})
        return str(e.value)

    dest = '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "pacs.test"\nport = 104\n[destinations.tls]\n'
    assert "destinations[0].tls.ca_bundle: required" in load_error(dest + "enabled = true\n")
    assert "destinations[0].tls.certificate: not a peer TLS key; use client_certificate" in load_error(
        dest + 'enabled = true\nca_bundle = "ca.pem"\ncertificate = "c.pem"\n')
    assert "destinations[0].tls.client_certificate: goes together with client_private_key" in load_error(
        dest + 'enabled = true\nca_bundle = "ca.pem"\nclient_certificate = "c.pem"\n')
    assert "node.tls.private_key: required" in load_error('[node.tls]\nenabled = true\ncertificate = "c.pem"\n')
    assert "node.tls.ca_bundle: required for mutual TLS" in load_error(
        '[node.tls]\nenabled = true\ncertificate = "c.pem"\nprivate_key = "k.pem"\n')
    assert "node.tls.calling_aet_names" in load_error(
        '[node.tls]\nenabled = true\ncertificate = "c.pem"\nprivate_key = "k.pem"\n'
        "require_client_certificate = false\ncalling_aet_names = { CT1 = [\"ct1\"] }\n")
    # a peer: server-authenticated TLS needs only a CA bundle, or the system store when asked for
    assert PeerTlsConfig(enabled=True, ca_bundle=pki.ca).client_certificate is None
    assert PeerTlsConfig(enabled=True, use_system_store=True).ca_bundle is None
    # the node: server-only TLS; "ca_certificates" is still read as ca_bundle
    assert NodeTlsConfig(enabled=True, certificate=pki.server_cert, private_key=pki.server_key,
                         require_client_certificate=False).ca_bundle is None
    assert NodeTlsConfig.model_validate({"ca_certificates": str(pki.ca)}).ca_bundle == pki.ca
    # files: missing or mismatched, named by key
    with pytest.raises(TlsError, match=r"node\.tls\.certificate: file not found"):
        server_context(NodeTlsConfig(enabled=True, certificate=Path("missing.crt"), private_key=pki.server_key,
                                     ca_bundle=pki.ca), tmp_path)
    with pytest.raises(TlsError, match="cannot load"):
        server_context(NodeTlsConfig(enabled=True, certificate=pki.server_cert, private_key=pki.client_key,
                                     ca_bundle=pki.ca), tmp_path)
    with pytest.raises(TlsError, match=r"destinations 'x' tls\.ca_bundle: file not found"):
        client_context(PeerTlsConfig(enabled=True, ca_bundle=Path("nope.pem")), tmp_path, "destinations 'x' tls")
    # prognode config check builds every TLS setting once
    from node.cli import main

    (tmp_path / "files.toml").write_text(dest + 'enabled = true\nca_bundle = "missing-ca.pem"\n')
    assert main(["config", "check", str(tmp_path / "files.toml")]) == 2
    assert "destinations 'pacs' tls.ca_bundle: file not found" in capsys.readouterr().err
    # server-only TLS on the node: no client certificate asked for
    ctx = server_context(NodeTlsConfig(enabled=True, certificate=pki.server_cert, private_key=pki.server_key,
                                       require_client_certificate=False), tmp_path)
    assert ctx.verify_mode == ssl.CERT_NONE and ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_client_identity_rules() -> None:
    """``[node.tls] calling_aet_names``: CN or subjectAltName, case-insensitive; unlisted AE titles refused."""
    from node.config import NodeTlsConfig
    from node.tls import certificate_names, check_client_identity

    cert = {"subject": ((("commonName", "ct1-console"),),),
            "subjectAltName": (("DNS", "CT1.hospital.test"), ("IP Address", "10.0.0.7"))}
    assert certificate_names(cert) == {"ct1-console", "CT1.hospital.test", "10.0.0.7"}
    tls = NodeTlsConfig(calling_aet_names={"CT1": ("ct1.hospital.test",), "CT2": ("ct2-console",)})
    assert check_client_identity(tls, "CT1", cert) is None
    assert check_client_identity(tls, "CT2", cert) is not None
    assert "not in node.tls.calling_aet_names" in (check_client_identity(tls, "CT3", cert) or "")
    assert "no client certificate" in (check_client_identity(tls, "CT1", {}) or "")
    assert check_client_identity(NodeTlsConfig(), "ANY", None) is None


def test_documented_tls_examples_load(tmp_path: Path) -> None:
    """The commented TLS example in config.toml and the one in the README are valid configuration."""
    import re

    root = Path(__file__).resolve().parents[1]
    text = (root / "config.toml").read_text()
    start, end = text.index("# [destinations.tls]"), text.index("[[routes]]")
    block = "\n".join(line[2:] if re.match(r"^# [\[a-z]", line) else line for line in text[start:end].splitlines())
    (tmp_path / "config.toml").write_text(text[:start] + block + "\n" + text[end:])
    cfg = config_mod.load(tmp_path / "config.toml", environ={})
    assert cfg.node.tls.enabled and cfg.node.tls.calling_aet_names and cfg.destinations[0].tls.enabled
    readme = (root / "README.md").read_text()
    section = readme[readme.index("### DICOM TLS on every leg"):]
    example = section[section.index("```toml") + 7:section.index("```\n", section.index("```toml") + 7)]
    (tmp_path / "readme.toml").write_text(example)
    cfg = config_mod.load(tmp_path / "readme.toml", environ={})
    assert cfg.node.tls.ca_bundle is not None and cfg.destinations[0].tls.server_hostname == "pacs.hospital.example"


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
ca_bundle = "{pki.ca}"
client_certificate = "{pki.client_cert}"
client_private_key = "{pki.client_key}"
"""
        (tmp_path / "config.toml").write_text(text)
        cfg = config_mod.load(tmp_path / "config.toml")
        db = Database(cfg.database_url)
        node = None
        if method == "move":  # the node's own SCP (over TLS) receives the C-MOVE sub-operations
            from node.service import Node

            (tmp_path / "config.toml").write_text(text + "[web]\nenabled = false\n")
            node = Node(config_mod.load(tmp_path / "config.toml")).start()
        try:
            out = run_sweep(cfg, db, dt.date(2026, 3, 1), dt.date(2026, 3, 5))
        finally:
            if node is not None:
                node.stop()
        assert (out.studies, out.retrieved, out.instances_retrieved, out.failed) == (1, 1, 3, 0)
        db.dispose()


def test_node_scp_over_tls_with_dcmtk(tmp_path: Path, pki: Pki) -> None:
    """The node itself (Node: SCP, index, completion) accepts dcmtk storescu +tls with a client certificate,
    and ``[node.tls] calling_aet_names`` ties calling AE titles to client certificates."""
    need("storescu", "echoscu")
    from node.service import Node

    cfg = node_config(tmp_path, pki, node_tls_extra='calling_aet_names = { STORESCU = ["client.test"], '
                                                   'ECHOSCU = ["CLIENT"], CT9 = ["ct9.hospital.test"] }')
    (tmp_path / "config.toml").write_text((tmp_path / "config.toml").read_text() + "[web]\nenabled = false\n")
    cfg = config_mod.load(tmp_path / "config.toml")
    node = Node(cfg).start()
    try:
        port = cfg.node.port
        good = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
        study = write_study(tmp_path / "dcm", 4, dt.date(2026, 3, 2), slices=2)
        r = _dcmtk("storescu", port, "STORESCU", good, [str(f) for f in study.files])
        assert r.returncode == 0, r.stdout + r.stderr
        assert _dcmtk("echoscu", port, "ECHOSCU", good).returncode == 0  # the subject CN "client"
        assert _dcmtk("echoscu", port, "CT9", good).returncode != 0  # a certificate for another name
        assert _dcmtk("echoscu", port, "OTHER", good).returncode != 0  # an AE title tied to no certificate
        assert _dcmtk("echoscu", port, "ECHOSCU", []).returncode != 0  # plain TCP refused
        assert _dcmtk("echoscu", port, "ECHOSCU", ["+tla", "+cf", str(pki.ca)]).returncode != 0  # no client cert
    finally:
        node.stop(timeout=5)
    rejected = [r for r in AuditLog(cfg.path(cfg.logging.audit_file)).read() if r["event"] == "association_rejected"]
    assert [r["calling_ae"] for r in rejected] == ["CT9", "OTHER"]
    assert "client.test" in rejected[0]["reason"] and "calling_aet_names" in rejected[1]["reason"]
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
