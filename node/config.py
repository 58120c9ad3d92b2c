"""prognode configuration: ``config.toml`` parsed once into frozen, typed models.

Every default lives here, in the model field that owns it, and nowhere else.
Precedence, highest first: command line (``--set section.key=value`` or the
dedicated flags), environment (``PROGNODE_<SECTION>_<KEY>``), the TOML file, the
model defaults.  Relative paths are relative to the folder of the config file.
An unknown or badly typed key raises :class:`ConfigError` naming the key, e.g.
``destinations[0].port: Input should be a valid integer``.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "PROGNODE_"


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def _check_ae_title(value: str) -> str:
    if not value or len(value) > 16 or "\\" in value or not value.isprintable():
        raise ValueError(f"invalid AE title {value!r}: 1-16 printable characters, no backslash")
    return value


class TlsConfig(_Model):
    """DICOM TLS (PS3.15 Annex B.1) for the SCP or an SCU peer."""

    enabled: bool = False
    certificate: Path | None = None  # PEM certificate chain of this node
    private_key: Path | None = None  # PEM private key of this node
    ca_certificates: Path | None = None  # PEM bundle used to verify the peer
    require_client_certificate: bool = True  # SCP side: mutual TLS

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TlsConfig:
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("tls.enabled needs certificate and private_key")
        return self


class NodeConfig(_Model):
    ae_title: str = "PROGNODE"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    storage: Path = Path("var")
    database: str = ""  # SQLAlchemy URL; empty: sqlite file in storage
    allowed_calling_aets: tuple[str, ...] = ()  # empty: any
    allowed_hosts: tuple[str, ...] = ()  # IPs or CIDR networks; empty: any
    max_pdu: int = Field(262_144, ge=0)  # maximum PDU length announced and enforced on receipt; 0: unlimited
    max_associations: int = Field(16, ge=1)  # established associations at once (handshakes do not count)
    max_pending_associations: int = Field(32, ge=1)  # connections still in their handshake; the oldest goes when full
    max_associations_per_host: int = Field(0, ge=0)  # established associations per peer address; 0: no own limit
    max_associations_per_ae: int = Field(0, ge=0)  # established associations per calling AE title; 0: no own limit
    association_timeout: float = Field(10.0, gt=0)  # accept -> complete A-ASSOCIATE-RQ (TLS handshake included)
    network_timeout: float = Field(60.0, gt=0)  # idle time between messages before the association is aborted
    dimse_timeout: float = Field(30.0, gt=0)  # longest pause inside a PDU, or a send the peer does not read
    max_dataset_bytes: int = Field(1 << 30, ge=1024)  # longest data set (inflated if deflated); longer: 0xA700
    min_free_bytes: int = Field(512 * 1024 * 1024, ge=0)  # refuse instances below this free space
    fsync: bool = True
    tls: TlsConfig = TlsConfig()
    institution_name: str = ""  # written into Contributing Equipment when set
    device_serial_number: str = ""  # empty: derived from the host's machine id

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value)

    @field_validator("allowed_hosts")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            ipaddress.ip_network(item, strict=False)
        return value


class CompletionConfig(_Model):
    quiet_seconds: float = Field(20.0, gt=0)  # fallback when geometry cannot decide
    settle_seconds: float = Field(1.0, ge=0, le=2.0)  # quiet time after geometry says complete
    poll_seconds: float = Field(0.25, gt=0)
    study_quiet_seconds: float = Field(60.0, gt=0)  # study-level routes wait this long for more series


class JobsConfig(_Model):
    workers: int = Field(1, ge=1)
    max_attempts: int = Field(3, ge=1)
    retry_seconds: float = Field(30.0, ge=0)
    lease_seconds: float = Field(600.0, gt=0)  # a running job whose worker vanished is requeued after this
    device: Literal["auto", "cpu", "cuda"] = "auto"


class _RemoteAE(_Model):
    """A DICOM peer this node opens associations to (a destination or a source)."""

    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: TlsConfig = TlsConfig()

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value)


class DestinationConfig(_RemoteAE):
    """A PACS that gets the results (C-STORE), retried then dead-lettered."""

    retry_seconds: float = Field(30.0, ge=0)
    max_attempts: int = Field(10, ge=1)


class SourceConfig(_RemoteAE):
    """A PACS to query and retrieve from (C-FIND, then C-MOVE or C-GET)."""

    retrieve: Literal["move", "get"] = "move"
    move_destination: str = ""  # AE title the PACS sends C-MOVE results to; empty: this node's


class SeriesMatch(_Model):
    """One required series of a study-level route (e.g. the arterial phase)."""

    name: str
    when: dict[str, str]


class RouteConfig(_Model):
    name: str
    when: dict[str, str] = {}  # DICOM keyword = exact value or shell pattern
    pipelines: tuple[str, ...]
    send_to: tuple[str, ...] = ()
    level: Literal["series", "study"] = "series"
    requires: tuple[SeriesMatch, ...] = ()  # study level: all must be complete before the job starts

    def matches(self, attributes: Mapping[str, str]) -> bool:
        return match_attributes(self.when, attributes)


def match_attributes(when: Mapping[str, str], attributes: Mapping[str, str]) -> bool:
    """True when every ``keyword = pattern`` holds (exact or shell pattern, case-sensitive)."""
    for keyword, pattern in when.items():
        value = attributes.get(keyword)
        if value is None:
            return False
        if value != pattern and not fnmatch.fnmatchcase(value, pattern):
            return False
    return True


class SweepConfig(_Model):
    enabled: bool = False
    source: str = ""
    cron: str = "0 1 * * *"  # crontab: minute hour day month weekday
    lookback_days: int = Field(1, ge=0)
    max_concurrent: int = Field(2, ge=1)
    allowed_hours: tuple[int, int] = (0, 24)  # [start, end) local hours in which retrieval may run
    modality: str = "CT"
    pause_seconds: float = Field(0.0, ge=0)  # throttle between retrievals


class WebConfig(_Model):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    token: str = ""  # bearer token for write actions; empty: writes refused


class OutputConfig(_Model):
    """Identity of the objects prognode writes (Contributing Equipment, series numbers)."""

    manufacturer: str = "prognode"
    seg_series_number: int = Field(9101, ge=1)
    sr_series_number: int = Field(9102, ge=1)
    map_series_number: int = Field(9103, ge=1)


class LoggingConfig(_Model):
    level: str = "INFO"
    file: Path | None = None  # None: stderr only
    audit_file: Path = Path("var/audit.jsonl")


class Config(_Model):
    node: NodeConfig = NodeConfig()
    completion: CompletionConfig = CompletionConfig()
    jobs: JobsConfig = JobsConfig()
    destinations: tuple[DestinationConfig, ...] = ()
    sources: tuple[SourceConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    pipelines: dict[str, dict[str, Any]] = {}  # per-pipeline options, validated by each pipeline
    models: dict[str, Path] = {}  # local weight files by name; nothing is downloaded
    sweep: SweepConfig = SweepConfig()
    web: WebConfig = WebConfig()
    output: OutputConfig = OutputConfig()
    logging: LoggingConfig = LoggingConfig()
    base_dir: Path = Path(".")  # folder of the config file; set by load()

    @model_validator(mode="after")
    def _cross_references(self) -> Config:
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError("destinations: names must be unique")
        for i, route in enumerate(self.routes):
            for target in route.send_to:
                if target not in names:
                    raise ValueError(f"routes[{i}].send_to: unknown destination {target!r}")
        if self.sweep.enabled and self.sweep.source not in {s.name for s in self.sources}:
            raise ValueError(f"sweep.source: unknown source {self.sweep.source!r}")
        return self

    # Resolved paths -----------------------------------------------------------------
    def path(self, p: Path) -> Path:
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    @property
    def storage_dir(self) -> Path:
        return self.path(self.node.storage)

    @property
    def database_url(self) -> str:
        return self.node.database or f"sqlite:///{self.storage_dir / 'prognode.db'}"

    def destination(self, name: str) -> DestinationConfig:
        for d in self.destinations:
            if d.name == name:
                return d
        raise KeyError(name)

    def source(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)

    def model_path(self, name: str) -> Path:
        if name not in self.models:
            raise ConfigError(f"models.{name}: no local weight file configured")
        return self.path(self.models[name])


# Loading ------------------------------------------------------------------------------


def _format_loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _set_dotted(data: dict[str, Any], dotted: str, raw: str) -> None:
    """Set ``section.key`` (or ``section.sub.key``) from a string; JSON values are decoded."""
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    parts = dotted.split(".")
    cursor = data
    for part in parts[:-1]:
        nxt = cursor.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: cannot override inside a list or value")
        cursor = nxt
    cursor[parts[-1]] = value


_SECTIONS = ("node", "completion", "jobs", "sweep", "web", "output", "logging")


def _env_overrides(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """``PROGNODE_NODE_PORT=11113`` -> ``("node.port", "11113")``; nested tables use ``__``."""
    out = []
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        rest = key[len(ENV_PREFIX) :].lower()
        for section in _SECTIONS:
            if rest.startswith(section + "_"):
                field = rest[len(section) + 1 :].replace("__", ".")
                out.append((f"{section}.{field}", raw))
                break
    return out


def load(
    path: Path | str | None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Parse ``path`` once, apply environment then command-line overrides, validate.

    ``overrides`` are ``section.key=value`` strings from the command line.
    """
    data: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {p}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from e
        base = p.resolve().parent
    if "base_dir" in data:
        raise ConfigError("base_dir: set automatically from the config file's folder")
    for dotted, raw in _env_overrides(os.environ if environ is None else environ):
        _set_dotted(data, dotted, raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        _set_dotted(data, dotted.strip(), raw.strip())
    data["base_dir"] = base
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = _format_loc([x for x in err["loc"] if not str(x).startswith("function-")])
            lines.append(f"{loc or 'config'}: {err['msg']}")
        raise ConfigError("; ".join(lines)) from None
