"""The prognode command line: config check, overrides, echo, run, extensions."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import types
from pathlib import Path

import pydicom
import pytest

from node import cli as node_cli
from node.config import load
from tests.conftest import need
from tests.node_helpers import cli, pacs_destination, write_config
from tests.node_pipelines import FACTORIES
from tests.peers import Orthanc, dciodvfy, with_uids

pytestmark = pytest.mark.peers


def test_config_check_ok_and_errors_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_config(tmp_path / "good", destinations=[pacs_destination(4242)],
                        routes=[{"name": "ct", "when": {"Modality": "CT"}, "pipelines": ["tissue-hu"],
                                 "send_to": ["pacs"]}])
    r = cli("config", "check", str(good))
    assert r.returncode == 0 and r.stdout.startswith("ok:"), r.stderr

    cases = {
        '[node]\nport = "eleven"\n': "node.port",
        "[node]\nbogus = 1\n": "node.bogus",
        '[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "h"\nport = "x"\n': "destinations[0].port",
        '[[routes]]\nname = "r"\npipelines = ["no-such"]\n': "routes[0].pipelines[0]",
        '[[routes]]\nname = "r"\npipelines = ["tissue-hu"]\nsend_to = ["nowhere"]\n': "routes[0].send_to",
        '[node]\nae_title = "THIS-TITLE-IS-FAR-TOO-LONG"\n': "node.ae_title",
    }
    for i, (text, key) in enumerate(cases.items()):
        p = tmp_path / f"bad{i}.toml"
        p.write_text(text)
        assert node_cli.main(["config", "check", str(p)]) == 2
        err = capsys.readouterr().err
        assert key in err, (key, err)
    assert node_cli.main(["config", "check", str(good), "--set", "node.port=notaport"]) == 2
    assert "node.port" in capsys.readouterr().err


def test_overrides_cli_beats_environment_beats_file(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, node={"port": 1111})
    assert load(cfg, environ={}).node.port == 1111
    assert load(cfg, environ={"PROGNODE_NODE_PORT": "2222"}).node.port == 2222
    assert load(cfg, ["node.port=3333"], environ={"PROGNODE_NODE_PORT": "2222"}).node.port == 3333
    assert load(cfg, environ={}).storage_dir == (tmp_path / "var").resolve()  # relative to the file


def test_echo_destination(tmp_path: Path, pacs: Orthanc) -> None:
    cfg = write_config(tmp_path, destinations=[pacs_destination(pacs.dicom_port)])
    r = cli("echo", "pacs", "--config", str(cfg))
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    assert node_cli.main(["echo", "nowhere", "--config", str(cfg)]) == 2


def test_run_pipeline_on_a_folder(tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need("dciodvfy")
    ct = with_uids(shared_data / "totalseg_example_ct_dicom" / "dicom", tmp_path / "ct", seed="cli")
    out = tmp_path / "out"
    assert node_cli.main(["run", "test-sr", str(ct[0].parent), "--out", str(out)], factories=FACTORIES) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pipeline"] == "test-sr" and summary["instances"] == 20 and summary["evaluable"]
    sr = out / "sr.dcm"
    ok, report = dciodvfy(sr)
    assert ok, report
    ds = pydicom.dcmread(sr)
    assert ds.StudyInstanceUID == pydicom.dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID
    assert ds.SoftwareVersions and ds.DeviceSerialNumber  # identity from config and package, no placeholders
    assert str(sr) in capsys.readouterr().out
    # two series in one folder are not guessed at
    shutil.copy(shared_data / "pydicom_testfiles" / "CT_small.dcm", ct[0].parent / "other.dcm")
    r = node_cli.main(["run", "test-sr", str(ct[0].parent), "--out", str(tmp_path / "out2")], factories=FACTORIES)
    assert r == 2


def test_extensions_skip_missing_modules_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert node_cli.EXTENSIONS == ("node.sweep:register", "node.retention:register",
                                   "pipelines.radiomics.cohort:register",
                                   "pipelines.survival.cli:register",
                                   "pipelines.body_composition.train:register", "pipelines.deep.train:register",
                                   "node.retract:register",
                                   "node.sweep.cohort:register")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    node_cli.load_extensions(sub, ("prognode_missing_pkg.cli:register", "pipelines.no_such_module:register"))

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "prognode_broken_ext.py").write_text("import prognode_dependency_that_is_missing\n")
    with pytest.raises(ModuleNotFoundError):
        node_cli.load_extensions(sub, ("prognode_broken_ext:register",))

    calls: list[object] = []
    ok = types.ModuleType("prognode_ok_ext")
    ok.register = lambda s: calls.append(s)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "prognode_ok_ext", ok)
    node_cli.load_extensions(sub, ("prognode_ok_ext:register",))
    assert calls == [sub]
    assert node_cli.build_parser().parse_args(["status", "--config", "x.toml", "--json"]).json
