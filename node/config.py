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
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from node.dicom_facts import ResultFormat
from node.lanes import Priority, check_hours

ENV_PREFIX = "PROGNODE_"


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def _check_ae_title(value: str) -> str:
    if not value or len(value) > 16 or "\\" in value or not value.isprintable():
        raise ValueError(f"invalid AE title {value!r}: 1-16 printable characters, no backslash")
    return value


class NodeTlsConfig(_Model):
    """The node's own DICOM TLS as an SCP (``[node.tls]``; PS3.15 B.1, TLS 1.2 or newer).

    ``certificate`` and ``private_key`` are required when enabled.  ``ca_bundle`` verifies the
    certificates callers present: with ``require_client_certificate`` (the default) a caller without a
    certificate from that bundle is refused (mutual TLS, the usual hospital set-up); set it to false for
    TLS without client certificates.  ``calling_aet_names`` ties calling AE titles to certificates:
    ``{ CT1 = ["ct1.hospital.example"] }`` admits calling AE ``CT1`` only with a client certificate whose
    subject CN or a subjectAltName (DNS, IP, URI, e-mail) is one of those names, and refuses AE titles that
    are not listed.
    """

    enabled: bool = False
    certificate: Path | None = None  # PEM certificate chain of this node
    private_key: Path | None = None  # PEM private key of this node
    # PEM bundle that verifies client certificates ("ca_certificates" is the older name of this key)
    ca_bundle: Path | None = Field(None, validation_alias=AliasChoices("ca_bundle", "ca_certificates"))
    require_client_certificate: bool = True  # mutual TLS; needs ca_bundle
    calling_aet_names: dict[str, tuple[str, ...]] = {}  # calling AE -> names its client certificate must carry

    @property
    def ca_certificates(self) -> Path | None:  # the older name, for code written against it
        return self.ca_bundle

    @field_validator("calling_aet_names")
    @classmethod
    def _bound_aets(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for ae, names in value.items():
            _check_ae_title(ae)
            if not names or any(not n.strip() for n in names):
                raise ValueError(f"{ae}: give at least one certificate name (CN or subjectAltName), none empty")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> NodeTlsConfig:
        if not self.enabled:
            return self
        for key in ("certificate", "private_key"):
            if getattr(self, key) is None:
                raise ValueError(f"{key}: required when enabled (the node's own PEM certificate and key)")
        if self.require_client_certificate and self.ca_bundle is None:
            raise ValueError("ca_bundle: required for mutual TLS (require_client_certificate = true, the "
                             "default); set require_client_certificate = false for TLS without client "
                             "certificates")
        if self.calling_aet_names and (self.ca_bundle is None or not self.require_client_certificate):
            raise ValueError("calling_aet_names: needs ca_bundle and require_client_certificate = true")
        return self


TlsConfig = NodeTlsConfig  # the older name


_OLD_PEER_TLS_KEYS = {"certificate": "client_certificate", "private_key": "client_private_key",
                      "require_client_certificate": None}


class PeerTlsConfig(_Model):
    """DICOM TLS to a peer this node calls (``tls`` of a destination or source; TLS 1.2 or newer).

    The peer's certificate is verified against ``ca_bundle`` only (``use_system_store = true`` adds, or
    without ``ca_bundle`` uses, the operating system's store) and must name ``server_hostname`` (default:
    the peer's ``host``; an IP address must then be in the certificate's subjectAltName).
    ``client_certificate`` and ``client_private_key`` are for peers that require mutual TLS.
    """

    enabled: bool = False
    # PEM bundle that verifies the peer's certificate ("ca_certificates" is accepted as its other name)
    ca_bundle: Path | None = Field(None, validation_alias=AliasChoices("ca_bundle", "ca_certificates"))
    use_system_store: bool = False  # trust the operating system's CA store too
    client_certificate: Path | None = None  # PEM chain presented for mutual TLS
    client_private_key: Path | None = None  # PEM key of client_certificate
    server_hostname: str = ""  # the name the peer's certificate must carry; empty: the peer's host

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for old, new in _OLD_PEER_TLS_KEYS.items():
                if old in data:
                    hint = f"use {new}" if new else "a peer's TLS has no such setting (it is [node.tls]'s)"
                    raise ValueError(f"{old}: not a peer TLS key; {hint}")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> PeerTlsConfig:
        if (self.client_certificate is None) != (self.client_private_key is None):
            raise ValueError("client_certificate: goes together with client_private_key (mutual TLS)")
        if self.enabled and self.ca_bundle is None and not self.use_system_store:
            raise ValueError("ca_bundle: required when enabled (the CA that signed the peer's certificate), "
                             "unless use_system_store = true")
        if self.server_hostname != self.server_hostname.strip():
            raise ValueError("server_hostname: no surrounding spaces")
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
    # disk watermarks (node.watermark): below min_free_bytes free space the node first purges what
    # [retention] allows, then answers C-STORE 0xA700; below associate_min_free_bytes (lower) it
    # rejects new associations (A-ASSOCIATE-RJ transient, local limit exceeded); 0: no such mark
    min_free_bytes: int = Field(512 * 1024 * 1024, ge=0)  # refuse instances below this free space
    associate_min_free_bytes: int | None = Field(None, ge=0)  # refuse associations below; None: min_free_bytes / 2
    fsync: bool = True
    tls: NodeTlsConfig = NodeTlsConfig()
    institution_name: str = ""  # written into Contributing Equipment when set
    device_serial_number: str = ""  # empty: derived from the host's machine id

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value)

    @model_validator(mode="after")
    def _watermarks(self) -> NodeConfig:
        if self.associate_min_free_bytes is not None and self.associate_min_free_bytes > self.min_free_bytes:
            raise ValueError("associate_min_free_bytes: must not exceed min_free_bytes (associations are "
                             "refused below the lower mark, instances below the higher one)")
        return self

    @property
    def associate_floor(self) -> int:
        """Free bytes below which new associations are rejected (``associate_min_free_bytes`` or half of
        ``min_free_bytes``)."""
        a = self.associate_min_free_bytes
        return self.min_free_bytes // 2 if a is None else a

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
    # local time of the node in which batch jobs start (node.lanes); "19:00-07:00" wraps past midnight
    # ("allowed_hours" is read as this key too)
    batch_hours: str = Field("00:00-24:00", validation_alias=AliasChoices("batch_hours", "allowed_hours"))

    @field_validator("batch_hours")
    @classmethod
    def _batch_hours(cls, value: str) -> str:
        return check_hours(value)


class PipelineResources(_Model):
    """What one job of a pipeline needs on a worker (a Ray task's or actor's resource request)."""

    cpus: float = Field(1.0, ge=0)
    gpus: float = Field(0.0, ge=0)
    memory_mb: int = Field(0, ge=0)  # 0: no memory request


class RunnerConfig(_Model):
    """Where jobs run: ``local`` (a process pool on this host) or ``ray`` (an existing Ray cluster).

    With ``ray``, ``jobs.workers`` is the number of jobs the node keeps in flight on the cluster; the
    node's database stays the source of truth (claim, lease, one finish per attempt)."""

    kind: Literal["local", "ray"] = "local"
    address: str = "auto"  # what ray.init(address=...) takes: "auto", "host:port" or "ray://host:port"
    namespace: str = "prognode"
    io: Literal["object-store", "shared-path"] = "object-store"  # how inputs reach a worker, outputs come back
    mode: Literal["task", "actor"] = "task"  # actor: long-lived per pipeline, keeps its model loaded
    actors_per_pipeline: int = Field(1, ge=1)
    detached_actors: bool = False  # true: actors outlive the node process (reused after a restart)
    resources: dict[str, PipelineResources] = {}  # per pipeline; default: the pipeline registry's declaration


class RemoteAE(_Model):
    """A DICOM peer this node opens associations to (a destination or a source)."""

    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: PeerTlsConfig = PeerTlsConfig()

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value)


_RemoteAE = RemoteAE  # the older name


class DestinationBase(_Model):
    """What every destination has, whatever its ``kind`` (:mod:`node.transports` sends to it, the
    one state machine of :mod:`node.export` retries it).

    A failed attempt is retried after ``retry_seconds``, doubled at each failure up to
    ``retry_max_seconds`` (each delay lengthened at random by up to ``retry_jitter`` of itself,
    never beyond ``retry_max_seconds``); once the delays add up to ``dead_letter_after_seconds``
    (or after ``max_attempts``, when set) the result is a dead letter; a failure the destination
    calls permanent (an HTTP 4xx but 408/429, a STOW-RS FailedSOPSequence reason that is not a lack
    of resources) is a dead letter at once.  While results wait or are dead letters because the
    destination is unreachable, it is probed (C-ECHO, or a QIDO-RS request) every ``probe_seconds``;
    when it answers, waiting results go at once and dead letters again."""

    name: str
    retry_seconds: float = Field(30.0, gt=0)  # delay after the first failed attempt
    retry_max_seconds: float = Field(3600.0, gt=0)  # cap of one delay
    retry_jitter: float = Field(0.2, ge=0, le=1)  # random lengthening of each delay, as a fraction of it
    dead_letter_after_seconds: float = Field(86400.0, ge=0)  # back-off horizon before a dead letter
    max_attempts: int = Field(0, ge=0)  # also a dead letter after this many attempts; 0: the horizon alone
    probe_seconds: float = Field(60.0, gt=0)  # probe interval (C-ECHO, QIDO-RS) while the destination is unreachable
    timeout_seconds: float = Field(30.0, gt=0)  # association, DIMSE and network timeouts (or each HTTP request's)
    # which result objects this destination gets: "seg", "sr", "sc" (Secondary Capture), "pdf"
    formats: tuple[ResultFormat, ...] = Field((ResultFormat.SEG, ResultFormat.SR), min_length=1)


class DestinationConfig(RemoteAE, DestinationBase):
    """A PACS that gets the results by C-STORE (``kind = "dimse"``, the default when ``kind`` is absent)."""

    kind: Literal["dimse"] = "dimse"


class DicomwebPeer(_Model):
    """A DICOMweb service this node calls (``kind = "dicomweb"``): a destination (STOW-RS) or a source
    (QIDO-RS, WADO-RS); :func:`node.transports.dicomweb.peer_session` builds its session, for either.

    ``url`` is the service root (``{url}/studies``).  Credentials come from files, never from the config
    itself: ``token_file`` (a Bearer token) or ``username`` with ``password_file`` (Basic), or none.  An
    ``https`` URL is verified with ``tls``, the same peer TLS table as a DIMSE peer's (``ca_bundle`` or
    ``use_system_store``, a client certificate for mutual TLS, ``server_hostname``); ``tls.enabled`` is
    implied by ``https`` and refused with ``http``."""

    kind: Literal["dicomweb"]
    url: str
    token_file: Path | None = None  # a file holding the Bearer token
    username: str = ""  # Basic authentication, with password_file
    password_file: Path | None = None  # a file holding the password of username
    tls: PeerTlsConfig = PeerTlsConfig()

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^\s/?#@]+(/[^\s?#]*)?", value):
            raise ValueError(f"{value!r}: an http:// or https:// service root (no query, no spaces, no credentials in it)")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _consistent(self) -> DicomwebPeer:
        if self.token_file is not None and (self.username or self.password_file is not None):
            raise ValueError("token_file: either a Bearer token_file or username + password_file, not both")
        if bool(self.username) != (self.password_file is not None):
            raise ValueError("username: goes together with password_file (Basic authentication)")
        https = self.url.startswith("https://")
        if not https and self.tls.enabled:
            raise ValueError("tls: enabled with an http:// url; TLS needs an https:// url")
        if https and self.tls.ca_bundle is None and not self.tls.use_system_store:
            raise ValueError("tls: ca_bundle is required for an https url (the CA that signed the server's "
                             "certificate), unless use_system_store = true")
        return self

    @property
    def uses_tls(self) -> bool:
        return self.url.startswith("https://")


class DicomwebDestinationConfig(DicomwebPeer, DestinationBase):
    """A PACS or archive that gets the results by STOW-RS (``kind = "dicomweb"``): STOW-RS posts to
    ``{url}/studies``, the probe is a QIDO-RS request (:class:`DicomwebPeer` for the rest)."""

    max_request_bytes: int = Field(64 << 20, ge=1 << 20)  # instances posted together by STOW-RS, up to this size


DESTINATION_KINDS = ("dimse", "dicomweb")  # the kinds of [[destinations]] and [[sources]]; "dimse" when kind is absent


def _peer_kind(value: Any) -> str:
    kind = value.get("kind", "dimse") if isinstance(value, Mapping) else getattr(value, "kind", "dimse")
    return str(kind)


_KIND = Discriminator(_peer_kind, custom_error_type="peer_kind",
                      custom_error_message="kind: 'dimse' (the default) or 'dicomweb'")

AnyDestination = Annotated[
    Annotated[DestinationConfig, Tag("dimse")] | Annotated[DicomwebDestinationConfig, Tag("dicomweb")], _KIND]


class SourceConfig(RemoteAE):
    """A PACS to query and retrieve from over DIMSE (C-FIND, then C-MOVE or C-GET; ``kind = "dimse"``, the default).

    C-MOVE asks the PACS to send the instances to ``move_destination`` (default: this node's AE title, which
    the PACS must know with the node's host and port); the running node's SCP receives them."""

    kind: Literal["dimse"] = "dimse"
    retrieve: Literal["move", "get"] = "move"
    move_destination: str = ""  # AE title the PACS sends C-MOVE results to; empty: this node's


class DicomwebSourceConfig(DicomwebPeer):
    """A DICOMweb service to query (QIDO-RS) and retrieve from (WADO-RS) (``kind = "dicomweb"``;
    :class:`DicomwebPeer` for ``url``, credentials and ``tls``)."""

    name: str
    timeout_seconds: float = Field(60.0, gt=0)  # connect and read timeout of one HTTP request


AnySource = Annotated[
    Annotated[SourceConfig, Tag("dimse")] | Annotated[DicomwebSourceConfig, Tag("dicomweb")], _KIND]


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
    # lane of its jobs (node.lanes); unset: normal, or [sweep].priority for a series a sweep retrieved
    priority: Priority | None = None

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
    priority: Priority = Priority.BATCH  # lane of jobs on retrieved series whose route sets no priority


class RetentionConfig(_Model):
    """What the node deletes, and when (node.retention).

    Received instances of a study and each job's work folder go ``days`` after they were last used,
    once every job of the study is done and every export of it sent: never the inputs of a pending,
    running, failed (retryable) or dead job, never a study still receiving, never what a pending or
    dead-letter export still needs.  The age-based run starts at ``cron`` and stops at the end of
    ``hours`` (local time; the rest goes at the next run).  With ``enabled``, the disk watermark
    ([node] min_free_bytes) also purges what these rules allow, oldest first and of any age, until
    ``min_free_bytes + headroom_bytes`` are free again; without it nothing is ever deleted.
    """

    enabled: bool = False
    days: float = Field(30.0, ge=0)  # age of a study (its last instance) or work folder (its job's end)
    cron: str = "30 1 * * *"  # crontab (local time): minute hour day month weekday
    hours: str = "00:00-24:00"  # the run stops outside this window (local time), "01:00-05:00" e.g.
    headroom_bytes: int = Field(1024 * 1024 * 1024, ge=0)  # a watermark purge frees up to min_free_bytes + this
    check_seconds: float = Field(5.0, gt=0)  # free-space checks of the watermark (statvfs at most this often)

    @field_validator("hours")
    @classmethod
    def _hours(cls, value: str) -> str:
        return check_hours(value)


class WebConfig(_Model):
    """Dashboard, REST API, ``/metrics`` (node/web).  Who may do what (node.web.auth):

    * ``token`` (write token): write actions (resend) and every read;
    * ``read_token``: reads of the dashboard and ``/api`` (PHI: patient IDs, series descriptions, UIDs);
    * nobody else: with neither token set the dashboard and ``/api`` answer 403, never anonymously;
      ``/healthz`` and ``/metrics`` are open and carry no PHI.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    token: str = ""  # write token (Bearer; reads too); empty: writes refused
    read_token: str = ""  # read-only token; empty: only the write token reads
    session_hours: float = Field(12.0, gt=0, le=24 * 30)  # lifetime of the dashboard's sign-in cookie
    secure_cookies: bool = False  # mark the cookie Secure over plain HTTP too (behind a TLS proxy)
    tls_certificate: Path | None = None  # PEM chain: serve HTTPS (the cookie is then always Secure)
    tls_private_key: Path | None = None  # PEM key of tls_certificate
    # STOW-RS receiver (POST /dicom-web/studies, node.stow): longest request body, spooled to disk
    stow_max_request_bytes: int = Field(2 << 30, ge=1 << 20)
    # the site's viewer for a study, "{study_uid}" replaced, e.g. "https://ohif.example.org/viewer?StudyInstanceUIDs={study_uid}";
    # empty: the dashboard shows no viewer link
    viewer_url: str = ""

    @field_validator("token", "read_token")
    @classmethod
    def _token_chars(cls, value: str) -> str:
        if value != value.strip() or not value.isprintable() or " " in value:
            raise ValueError("a token is printable characters without spaces")
        return value

    @model_validator(mode="after")
    def _distinct_tokens(self) -> WebConfig:
        if self.read_token and self.read_token == self.token:
            raise ValueError("read_token equals token: a reader could write; use two different tokens")
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ValueError("tls_certificate and tls_private_key go together")
        if self.viewer_url and "{study_uid}" not in self.viewer_url:
            raise ValueError("viewer_url: a template with {study_uid} (the study to open)")
        return self


class _NotifyBase(_Model):
    """A ``[[notify]]`` target (node.notify): told (``events``) when a job's results are filed in every
    destination (or, with no destination, when the job is done), when a job is dead and when a job's
    results are retracted.  ``include_phi``: the patient's name, ID, birth date and the accession
    number go out too; otherwise UIDs only."""

    name: str
    include_phi: bool = False
    timeout_seconds: float = Field(10.0, gt=0)  # connect, send and answer of one attempt
    retry_seconds: float = Field(5.0, gt=0)  # delay after the first failed attempt, doubled at each failure
    retry_max_seconds: float = Field(600.0, gt=0)  # cap of one delay
    max_attempts: int = Field(10, ge=1)  # then the notification is dead (logged and audited)
    events: tuple[Literal["filed", "dead", "retracted"], ...] = ("filed", "dead", "retracted")


class WebhookNotify(_NotifyBase):
    """An HTTP(S) POST of a JSON body; ``token_file`` holds a Bearer token."""

    kind: Literal["webhook"] = "webhook"
    url: str
    token_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("a webhook url starts with http:// or https://")
        return value


class Hl7Notify(_NotifyBase):
    """HL7 v2.5 ORU^R01 over MLLP to a RIS; the ACK (MSA-1 AA) is checked."""

    kind: Literal["hl7"] = "hl7"
    host: str
    port: int = Field(ge=1, le=65535)
    sending_application: str = "PROGNODE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""


NotifyConfig = Annotated[WebhookNotify | Hl7Notify, Field(discriminator="kind")]


class OutputConfig(_Model):
    """Identity of the objects prognode writes (Contributing Equipment, series numbers)."""

    manufacturer: str = "prognode"
    seg_series_number: int = Field(9101, ge=1)
    sr_series_number: int = Field(9102, ge=1)
    map_series_number: int = Field(9103, ge=1)
    sc_series_number: int = Field(9104, ge=1)  # Secondary Capture key images (formats "sc")
    pdf_series_number: int = Field(9105, ge=1)  # Encapsulated PDF report (formats "pdf")


class LoggingConfig(_Model):
    level: str = "INFO"
    file: Path | None = None  # None: stderr only
    audit_file: Path = Path("var/audit.jsonl")


class Config(_Model):
    node: NodeConfig = NodeConfig()
    completion: CompletionConfig = CompletionConfig()
    jobs: JobsConfig = JobsConfig()
    runner: RunnerConfig = RunnerConfig()
    destinations: tuple[AnyDestination, ...] = ()
    sources: tuple[AnySource, ...] = ()  # kind = "dimse" (default) or "dicomweb"
    routes: tuple[RouteConfig, ...] = ()
    pipelines: dict[str, dict[str, Any]] = {}  # per-pipeline options, validated by each pipeline
    models: dict[str, Path] = {}  # local weight files by name; nothing is downloaded
    sweep: SweepConfig = SweepConfig()
    retention: RetentionConfig = RetentionConfig()
    web: WebConfig = WebConfig()
    output: OutputConfig = OutputConfig()
    logging: LoggingConfig = LoggingConfig()
    notify: tuple[NotifyConfig, ...] = ()  # [[notify]]: webhooks and HL7 ORU targets (node.notify)
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
        notify = [n.name for n in self.notify]
        if len(set(notify)) != len(notify):
            raise ValueError("notify: names must be unique")
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

    def destination(self, name: str) -> DestinationConfig | DicomwebDestinationConfig:
        for d in self.destinations:
            if d.name == name:
                return d
        raise KeyError(name)

    def source(self, name: str) -> SourceConfig | DicomwebSourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)

    def model_path(self, name: str) -> Path:
        if name not in self.models:
            raise ConfigError(f"models.{name}: no local weight file configured")
        return self.path(self.models[name])


# Loading ------------------------------------------------------------------------------


def _plain_loc(loc: Sequence[int | str]) -> list[int | str]:
    """``loc`` without pydantic's validator names and the kind tag of a union item
    (``destinations.0.dicomweb.url`` -> ``destinations.0.url``)."""
    out: list[int | str] = []
    for part in loc:
        if str(part).startswith("function-"):
            continue
        if out and isinstance(out[-1], int) and part in DESTINATION_KINDS:
            continue
        out.append(part)
    return out


def _format_loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_KEY_FIRST = re.compile(r"^([a-z_][a-z0-9_]*): (.*)$", re.DOTALL)


def _error_line(loc: str, msg: str) -> str:
    """``loc: msg``; a model check's ``Value error, key: why`` becomes ``loc.key: why``."""
    msg = msg.removeprefix("Value error, ")
    m = _KEY_FIRST.match(msg)
    if m is not None:
        loc, msg = (f"{loc}.{m.group(1)}" if loc else m.group(1)), m.group(2)
    return f"{loc or 'config'}: {msg}"


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


_SECTIONS = ("node", "completion", "jobs", "runner", "sweep", "retention", "web", "output", "logging")


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
            loc = _format_loc(_plain_loc(err["loc"]))
            lines.append(_error_line(loc, str(err["msg"])))
        raise ConfigError("; ".join(lines)) from None
