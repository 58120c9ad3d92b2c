"""deploy/: compose services, ports and volumes; Helm templates rendered without helm; systemd unit;
Dockerfile references; every shipped config.toml validates against node.config."""

from __future__ import annotations

import base64
import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from node import config as config_mod
from tests.peers import REPO

DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "prognode"


# A tiny renderer for the Helm template subset the chart uses -----------------------------------------
_ACTION = re.compile(r"(\s*)\{\{(-?)\s*(.*?)\s*(-?)\}\}")


def _lookup(path: str, scope: dict[str, Any]) -> Any:
    if not path.startswith("."):
        raise ValueError(f"unsupported template value {path!r}")
    cur: Any = scope
    for part in path[1:].split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(f"template refers to missing {path}")
        cur = cur[part]
    return cur


def _eval(expr: str, scope: dict[str, Any]) -> str:
    head, *filters = [p.strip() for p in expr.split("|")]
    value: Any = _lookup(head, scope)
    for f in filters:
        name, *args = f.split()
        if name == "quote":
            value = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        elif name == "toYaml":
            value = yaml.safe_dump(value, default_flow_style=False, sort_keys=False).rstrip("\n")
        elif name == "b64enc":
            value = base64.b64encode(str(value).encode()).decode()
        elif name == "nindent":
            pad = " " * int(args[0])
            value = "\n" + "\n".join(pad + ln if ln else ln for ln in str(value).splitlines())
        else:
            raise ValueError(f"unsupported template filter {name!r}")
    return str(value)


def render(template: str, values: dict[str, Any], release: str = "prognode") -> str:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    scope = {"Values": values, "Release": {"Name": release}, "Chart": {"Name": chart["name"],
                                                                        "Version": chart["version"]}}

    def sub(m: re.Match[str]) -> str:
        ws, trim_left, expr, _trim_right = m.groups()
        return ("" if trim_left else ws) + _eval(expr, scope)

    def cond(m: re.Match[str]) -> str:  # {{- if .Values.x }} ... {{- end }} (not nested)
        return m.group(2) if _lookup(m.group(1), scope) else ""

    return _ACTION.sub(sub, _IF.sub(cond, template))


_IF = re.compile(r"\{\{-?\s*if\s+(\S+)\s*-?\}\}(.*?)\s*\{\{-?\s*end\s*-?\}\}", re.DOTALL)


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, Any]]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    values["web"]["token"] = "t0ken"
    values["web"]["readToken"] = "r3ad"
    out = {}
    for t in sorted((CHART / "templates").glob("*.yaml")):
        doc = yaml.safe_load(render(t.read_text(), values))
        if doc is not None:  # a template switched off by its values
            out[doc["kind"]] = doc
    return out


def test_helm_chart_renders(rendered: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    assert set(rendered) == {"Deployment", "Service", "PersistentVolumeClaim", "ConfigMap", "Secret", "NetworkPolicy"}
    dep = rendered["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"dicom": 11112, "web": 8080}
    assert dep["spec"]["selector"]["matchLabels"] == dep["spec"]["template"]["metadata"]["labels"]
    svc = rendered["Service"]
    assert {(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {("dicom", 11112, "dicom"),
                                                                                      ("web", 8080, "web")}
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts) == set(volumes)
    assert mounts["data"] == "/var/lib/prognode"
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == rendered["PersistentVolumeClaim"]["metadata"]["name"]
    assert volumes["config"]["configMap"]["name"] == rendered["ConfigMap"]["metadata"]["name"]
    assert volumes["tls"]["secret"]["secretName"] == rendered["Secret"]["metadata"]["name"]
    assert rendered["PersistentVolumeClaim"]["spec"]["resources"]["requests"]["storage"] == "50Gi"
    secret = rendered["Secret"]["data"]
    assert base64.b64decode(secret["web-token"]) == b"t0ken"
    assert base64.b64decode(secret["web-read-token"]) == b"r3ad"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env["PROGNODE_WEB_TOKEN"] == {"name": rendered["Secret"]["metadata"]["name"], "key": "web-token"}
    assert env["PROGNODE_WEB_READ_TOKEN"] == {"name": rendered["Secret"]["metadata"]["name"], "key": "web-read-token"}
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["web"]) and annotations["prometheus.io/path"] == "/metrics"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and pod["securityContext"]["runAsNonRoot"]
    # the ConfigMap's config.toml is a valid prognode config whose ports match the pod's
    cfg_file = tmp_path / "config.toml"
    cfg_file.write_text(rendered["ConfigMap"]["data"]["config.toml"])
    cfg = config_mod.load(cfg_file, environ={})
    assert (cfg.node.port, cfg.web.port, cfg.web.host) == (ports["dicom"], ports["web"], "0.0.0.0")
    assert str(cfg.storage_dir) == mounts["data"]


def test_helm_network_policy(rendered: dict[str, dict[str, Any]]) -> None:
    """Ingress only to the DICOM port from dicomFrom and to the web port from webFrom; egress only DNS and the
    PACS of the default config; no rule open to every source or to 0.0.0.0/0."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())["networkPolicy"]
    pol = rendered["NetworkPolicy"]["spec"]
    dep = rendered["Deployment"]
    assert pol["podSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert pol["policyTypes"] == ["Ingress", "Egress"]
    by_port = {r["ports"][0]["port"]: r for r in pol["ingress"]}
    assert set(by_port) == {"dicom", "web"}  # the container's named ports
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert set(by_port) == {p["name"] for p in container["ports"]}
    assert by_port["dicom"]["from"] == values["dicomFrom"] and by_port["web"]["from"] == values["webFrom"]
    for rule in pol["ingress"] + pol["egress"]:
        peers = rule.get("from", rule.get("to"))
        assert peers, f"a rule without peers admits everyone: {rule}"
        for peer in peers:
            assert peer.get("ipBlock", {}).get("cidr") not in ("0.0.0.0/0", "::/0"), peer
    dns, *pacs = pol["egress"]
    assert {p["port"] for p in dns["ports"]} == {53} and pacs == values["egress"]
    cfg = yaml.safe_load((CHART / "values.yaml").read_text())["config"]
    pacs_port = int(re.search(r"port = (\d+)\n\n\[\[routes", cfg).group(1))  # type: ignore[union-attr]
    assert pacs_port in {p["port"] for rule in pacs for p in rule["ports"]}


def test_compose_services_ports_volumes(tmp_path: Path) -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = {k: v for k, v in compose["services"].items() if not v.get("profiles")}  # the default `up`
    assert set(services) == {"prognode", "orthanc", "ohif", "gateway"}
    assert set(compose["volumes"]) == {"prognode-data", "orthanc-data"}

    def ports(name: str) -> set[str]:
        return {str(p) for p in services[name].get("ports", [])}

    # published: the node's DICOM port (scanners), its web port on loopback, the viewer gateway on loopback by
    # default; Orthanc (DICOM and HTTP) and OHIF only on the compose network
    assert ports("prognode") == {"11112:11112", "127.0.0.1:8080:8080"}
    assert ports("orthanc") == set() and ports("ohif") == set()
    assert ports("gateway") == {"${PROGNODE_VIEWER_BIND:-127.0.0.1}:3000:80"}
    assert services["prognode"]["environment"]["PROGNODE_WEB_READ_TOKEN"] == "${PROGNODE_WEB_READ_TOKEN:-}"
    assert "prognode-data:/var/lib/prognode" in services["prognode"]["volumes"]
    assert "orthanc-data:/var/lib/orthanc/db" in services["orthanc"]["volumes"]
    assert services["prognode"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / services["prognode"]["build"]["context"]).resolve() == REPO
    # every bind-mounted file exists, but the gateway's htpasswd: made at deploy time, ignored by git, and
    # compose refuses to start without it (no empty folder in its place)
    deploy_time = []
    for svc in services.values():
        for vol in svc.get("volumes", []):
            if isinstance(vol, dict):
                assert vol["type"] == "bind" and vol["bind"]["create_host_path"] is False and vol["read_only"]
                deploy_time.append(vol["source"])
                continue
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (DEPLOY / src).exists(), src
    assert deploy_time == ["./nginx/htpasswd"]
    r = subprocess.run(["git", "check-ignore", "-q", "deploy/nginx/htpasswd"], cwd=REPO, timeout=30)
    assert r.returncode == 0, "deploy/nginx/htpasswd must be ignored by git"
    # the node's config validates and points at the orthanc service; orthanc knows the node's AE
    cfg = config_mod.load(DEPLOY / "config" / "prognode.toml", environ={})
    assert cfg.destination("pacs").host == "orthanc" and cfg.source("pacs").retrieve == "move"
    assert cfg.node.port == 11112 and cfg.web.port == 8080 and cfg.sweep.enabled
    import json

    orthanc = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    assert orthanc["DicomModalities"]["prognode"] == [cfg.node.ae_title, "prognode", cfg.node.port]
    assert orthanc["DicomPort"] == cfg.destination("pacs").port and orthanc["DicomWeb"]["Enable"]
    nginx = (DEPLOY / "nginx" / "default.conf").read_text()
    assert "http://orthanc:8042/dicom-web/" in nginx and "http://ohif:80/" in nginx
    # every location of the gateway is behind basic auth (set at server level, never switched off)
    assert "auth_basic_user_file /etc/nginx/htpasswd;" in nginx and "auth_basic off" not in nginx
    server = nginx[nginx.index("server {"):]
    assert server.index("auth_basic ") < server.index("location")


def test_orthanc_of_compose_accepts_only_the_node(tmp_path: Path) -> None:
    """deploy/orthanc/orthanc.json's DICOM rules in a real Orthanc: C-STORE only from the node's AE title and
    only to ORTHANC; C-ECHO from anyone."""
    import json

    from tests.conftest import need
    from tests.peers import echoscu, orthanc, storescu
    from tests.synthetic_ct import write_study

    need("Orthanc", "storescu", "echoscu")
    deployed = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    rules = {k: v for k, v in deployed.items() if k.startswith(("DicomAlwaysAllow", "DicomCheck"))}
    assert rules["DicomAlwaysAllowStore"] is False and rules["DicomCheckCalledAet"] is True
    import datetime as dt

    study = write_study(tmp_path / "dcm", 3, dt.date(2026, 3, 2), slices=1)
    aet = deployed["DicomModalities"]["prognode"][0]
    with orthanc(tmp_path / "orthanc", aet=deployed["DicomAet"], extra_config=rules,
                 modalities={"prognode": (aet, "127.0.0.1", 11112)}) as pacs:
        assert echoscu(pacs.dicom_port, called="ORTHANC", calling="ANYONE") == 0
        assert storescu(pacs.dicom_port, list(study.files), called="ORTHANC", calling="STRANGER",
                        check=False).returncode != 0
        assert storescu(pacs.dicom_port, list(study.files), called="WRONG", calling=aet,
                        check=False).returncode != 0
        assert pacs.get("/instances") == []
        storescu(pacs.dicom_port, list(study.files), called="ORTHANC", calling=aet)
        assert len(pacs.get("/instances")) == 1


def test_systemd_unit(tmp_path: Path) -> None:
    text = (DEPLOY / "systemd" / "prognode.service").read_text()
    sections: dict[str, dict[str, str]] = {}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = {}
        else:
            key, _, value = line.partition("=")
            sections[current][key] = value
    svc = sections["Service"]
    assert svc["User"] == "prognode" and svc["ProtectSystem"] == "strict"
    assert svc["Restart"] == "on-failure" and svc["KillSignal"] == "SIGTERM"
    assert "/var/lib/prognode" in svc["ReadWritePaths"].split()
    assert svc["NoNewPrivileges"] == "true" and svc["CapabilityBoundingSet"] == ""
    assert svc["ExecStart"].endswith("serve --config /etc/prognode/config.toml")
    assert sections["Install"]["WantedBy"] == "multi-user.target"
    if shutil.which("systemd-analyze") is None:
        return
    # verify a copy whose ExecStart points at an executable that exists here
    unit = tmp_path / "prognode.service"
    unit.write_text(text.replace("/opt/prognode/venv/bin/prognode", sys.executable))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [ln for ln in (r.stdout + r.stderr).splitlines()
                if "prognode.service" in ln and "Documentation" not in ln and "Failed to" not in ln]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


def test_dockerfile_references_exist() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM debian:bookworm", text, re.M)
    copies = re.findall(r"^COPY\s+(.+)$", text, re.M)
    assert copies
    for line in copies:
        *sources, _dest = line.split()
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile COPY {src}: missing"
    # CPU torch from the CPU index strictly before the lock file
    assert text.index("download.pytorch.org/whl/cpu") < text.index("-r requirements.lock")
    assert "torch==2.13.0" in (REPO / "requirements.lock").read_text()
    assert re.search(r"^EXPOSE 11112 8080$", text, re.M) and "USER prognode" in text


# Ray cluster (issue 13) --------------------------------------------------------------------------------


def test_compose_ray_profile() -> None:
    """Head + CPU workers under the "ray" profile, a GPU worker under "ray-gpu": usage statistics off, no
    dashboard, nothing published; the node reaches the head through Ray Client when its runner is ray."""
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    ray = {k: v for k, v in services.items() if v.get("profiles")}
    assert {k: v["profiles"] for k, v in ray.items()} == {"ray-head": ["ray"], "ray-cpu-worker": ["ray"],
                                                          "ray-gpu-worker": ["ray-gpu"]}
    for name, svc in ray.items():
        assert not svc.get("ports"), name
        assert "--disable-usage-stats" in svc["command"] and svc["environment"]["RAY_USAGE_STATS_ENABLED"] == "0"
        assert svc["entrypoint"][-1] == "/opt/prognode/venv/bin/ray"
    head = ray["ray-head"]["command"]
    assert "--head" in head and "--include-dashboard=false" in head and "--num-cpus=0" in head
    assert "--address=ray-head:6379" in ray["ray-cpu-worker"]["command"]
    assert "--num-gpus=1" in ray["ray-gpu-worker"]["command"]
    env = services["prognode"]["environment"]
    assert env["PROGNODE_RUNNER_KIND"] == "${PROGNODE_RUNNER_KIND:-local}"
    assert env["PROGNODE_RUNNER_ADDRESS"].endswith("ray://ray-head:10001}")
    cfg = config_mod.load(DEPLOY / "config" / "prognode.toml",
                          environ={"PROGNODE_RUNNER_KIND": "ray", "PROGNODE_RUNNER_ADDRESS": "ray://ray-head:10001"})
    assert (cfg.runner.kind, cfg.runner.address, cfg.runner.io) == ("ray", "ray://ray-head:10001", "object-store")


def test_helm_ray_cluster() -> None:
    """values.ray.enabled renders a KubeRay RayCluster (head without CPUs, CPU and GPU worker groups)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["ray"]["enabled"] is False
    template = (CHART / "templates" / "raycluster.yaml").read_text()
    assert yaml.safe_load(render(template, values)) is None
    values["ray"]["enabled"] = True
    rc = yaml.safe_load(render(template, values))
    assert rc["kind"] == "RayCluster" and rc["apiVersion"] == "ray.io/v1"
    assert rc["spec"]["rayVersion"] == importlib.metadata.version("ray")
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"] == {"num-cpus": "0", "include-dashboard": "false", "disable-usage-stats": "true"}
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"} and groups["gpu"]["rayStartParams"]["num-gpus"] == "1"
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    for pod in [head, *groups.values()]:
        (c,) = pod["template"]["spec"]["containers"]
        assert {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"} in c["env"]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of values files: maps merge, everything else (lists included) is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_helm_cluster_values(tmp_path: Path) -> None:
    """values-cluster.yaml: N receivers on PostgreSQL (URL from the Secret) and a ReadWriteMany volume;
    the default stays one pod on SQLite."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert (values["replicas"], values["strategy"], values["storage"]["accessMode"]) == (1, "Recreate", "ReadWriteOnce")
    cluster = _merge(values, yaml.safe_load((CHART / "values-cluster.yaml").read_text()))
    cluster["database"]["url"] = "postgresql+psycopg://prognode:pw@pg-postgresql:5432/prognode"
    docs = {}
    for t in sorted((CHART / "templates").glob("*.yaml")):
        doc = yaml.safe_load(render(t.read_text(), cluster))
        if doc is not None:  # a template rendered empty (the Ray cluster, off by default)
            docs[doc["kind"]] = doc
    dep = docs["Deployment"]
    assert dep["spec"]["replicas"] == 3 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env["PROGNODE_NODE_DATABASE"] == {"name": docs["Secret"]["metadata"]["name"], "key": "database-url"}
    url = base64.b64decode(docs["Secret"]["data"]["database-url"]).decode()
    cfg_file = tmp_path / "config.toml"
    cfg_file.write_text(docs["ConfigMap"]["data"]["config.toml"])
    cfg = config_mod.load(cfg_file, environ={"PROGNODE_NODE_DATABASE": url})
    assert cfg.database_url.startswith("postgresql+psycopg://")
    egress_ports = {p["port"] for rule in docs["NetworkPolicy"]["spec"]["egress"] for p in rule["ports"]}
    assert {53, 4242, 5432} <= egress_ports
    # the default Secret's empty URL keeps SQLite in the volume
    default_cfg = config_mod.load(cfg_file, environ={"PROGNODE_NODE_DATABASE": ""})
    assert default_cfg.database_url.startswith("sqlite:///")
    pg = yaml.safe_load((DEPLOY / "helm" / "postgresql-values.yaml").read_text())
    assert pg["auth"]["username"] == "prognode" and pg["auth"]["database"] == "prognode"


def test_compose_cluster_receivers_share_postgresql(tmp_path: Path) -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.cluster.yml").read_text())
    services = compose["services"]
    assert {"postgres", "receiver", "dicom-balancer", "orthanc"} <= set(services)
    # published: the balancer's DICOM port only; PostgreSQL, the receivers and Orthanc stay on the network
    published = {name: svc.get("ports", []) for name, svc in services.items() if svc.get("ports")}
    assert published == {"dicom-balancer": ["11112:11112"]}
    receiver = services["receiver"]
    assert "prognode-data:/var/lib/prognode" in receiver["volumes"]
    assert receiver["depends_on"]["postgres"] == {"condition": "service_healthy"}
    url = receiver["environment"]["PROGNODE_NODE_DATABASE"]
    assert url.startswith("postgresql+psycopg://prognode:") and url.endswith("@postgres:5432/prognode")
    cfg = config_mod.load(DEPLOY / "config" / "prognode-cluster.toml",
                          environ={"PROGNODE_NODE_DATABASE": "postgresql+psycopg://prognode:pw@postgres:5432/prognode"})
    assert cfg.database_url.endswith("@postgres:5432/prognode") and not cfg.sweep.enabled
    assert str(cfg.storage_dir) == "/var/lib/prognode" and cfg.node.port == 11112
    nginx = (DEPLOY / "nginx" / "dicom-balancer.conf").read_text()
    assert "stream {" in nginx and "server receiver:11112" in nginx and "listen 11112;" in nginx
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (DEPLOY / src).exists(), src
