"""The node's configuration: one frozen object, read from TOML, validated at start.

Every setting is declared once here with its default, its type and a line of help.
`docs/configuration.md` documents each of them; a test fails when one is missing there.
"""
from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints


class ConfigError(ValueError):
    """A setting is unknown, has the wrong type or an invalid value."""


def setting(default: Any, help: str, *, path: bool = False, choices: tuple = (), item: type | None = None) -> Any:
    """A setting; `item`: a list of tables (`[[section.key]]`), each read as that dataclass."""
    meta = {"help": help, "path": path, "choices": choices, "item": item}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash


def _check_ae(key: str, value: str) -> None:
    if not _AE_RE.match(value) or not value.strip():
        raise ConfigError(f"{key}: {value!r} is not a valid AE title "
                          "(1-16 printable ASCII characters, no backslash, not only spaces)")


def _check_port(key: str, value: int, allow_zero: bool) -> None:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise ConfigError(f"{key}: {value} is not a port number ({low}-65535)")


@dataclass(frozen=True)
class NodeSection:
    ae_title: str = setting("M3DICOM", "AE title of the node: the called AE title peers must use.")
    data_dir: Path = setting(Path("var"), "Directory for the index, the encrypted blobs and the "
                             "key-encryption key. Created (mode 0700) on first start.", path=True)

    def validate(self) -> None:
        _check_ae("node.ae_title", self.ae_title)


@dataclass(frozen=True)
class DicomSection:
    host: str = setting("127.0.0.1", "Address the DICOM ports listen on (\"0.0.0.0\" or \"::\" for all).")
    port: int = setting(2762, "DICOM TLS port (PS3.15 recommends 2762).")
    plain_port: int = setting(0, "Unencrypted DICOM port; 0 (default) opens none.")
    certificate: Path = setting(Path("certs/server.pem"), "Server certificate (PEM) for the TLS port.", path=True)
    private_key: Path = setting(Path("certs/server.key"), "Private key (PEM) of the server certificate.", path=True)
    ca_certificates: Path = setting(Path("certs/ca.pem"), "CA certificates (PEM) that client certificates "
                                    "must chain to.", path=True)
    require_client_certificate: bool = setting(True, "Mutual TLS: refuse TLS peers without a valid "
                                               "client certificate.")
    allowed_calling_aets: list = setting([], "Calling AE titles allowed to associate; empty = any AE "
                                         "that passes TLS.")
    require_called_aet: bool = setting(True, "Refuse associations whose called AE title is not node.ae_title.")
    receivers: int = setting(1, "Receiving processes sharing the DICOM ports (pynetdicom uses one core "
                             "per process); 0 = one per CPU core, at most 4.")
    max_associations: int = setting(16, "Maximum simultaneous associations per receiving process; "
                                    "more are rejected.")
    max_associations_per_source: int = setting(0, "Associations from one address (IPv6: one /64) per receiving "
                                               "process; more are rejected (A-ASSOCIATE-RJ, local limit "
                                               "exceeded). 0 (default): half of dicom.max_associations.")
    plain_max_associations: int = setting(0, "Associations the plain port may hold per receiving process, the "
                                          "rest kept for TLS peers; 0 (default): three quarters of "
                                          "dicom.max_associations.")
    max_pdu_size: int = setting(1048576, "Maximum PDU length advertised to peers, bytes "
                                "(1 MiB doubles large-instance throughput).")
    tls_handshake_timeout: float = setting(5.0, "Seconds a TLS peer has to finish its handshake.")
    artim_timeout: float = setting(10.0, "Seconds a new connection has to send its whole A-ASSOCIATE-RQ after "
                                   "its TLS handshake (the ARTIM timer, PS3.8 9.1.5); then it is closed.")
    max_pending_connections: int = setting(64, "Connections per receiving process not yet associated (TLS "
                                           "handshake or A-ASSOCIATE-RQ in progress); when all are taken, a "
                                           "newcomer takes the place of the oldest of the address holding most.")
    max_pending_per_source: int = setting(32, "Connections not yet associated from one address (IPv6: one /64) "
                                          "per receiving process; more are closed at once.")
    max_associate_rq_size: int = setting(262144, "Longest A-ASSOCIATE-RQ (and other non-data PDU) accepted, "
                                         "bytes; a longer one is answered with an A-ABORT.")
    max_identifier_size: int = setting(4194304, "Largest data set held in memory for a request other than "
                                       "C-STORE (C-FIND/C-MOVE/C-GET identifier, N-ACTION), bytes; a larger "
                                       "one aborts the association.")
    acse_timeout: float = setting(30.0, "Seconds to wait for association negotiation messages.")
    dimse_timeout: float = setting(60.0, "Seconds to wait for DIMSE messages.")
    network_timeout: float = setting(60.0, "Seconds an idle association is kept before it is aborted.")
    max_store_seconds: float = setting(3600.0, "Seconds one C-STORE's data set may take to arrive (4 GiB at about "
                                       "10 Mbit/s); past it the association is aborted. 0 = no limit.")
    min_store_rate: int = setting(1024, "Bytes per second a C-STORE's data set must arrive at, over each minute; "
                                  "slower (a peer trickling to hold its spool file) aborts the association. "
                                  "0 = no limit.")

    def validate(self) -> None:
        _check_port("dicom.port", self.port, allow_zero=False)
        _check_port("dicom.plain_port", self.plain_port, allow_zero=True)
        if self.plain_port and self.plain_port == self.port:
            raise ConfigError("dicom.plain_port: must differ from dicom.port")
        for i, aet in enumerate(self.allowed_calling_aets):
            if not isinstance(aet, str):
                raise ConfigError(f"dicom.allowed_calling_aets[{i}]: expected a string, got {aet!r}")
            _check_ae(f"dicom.allowed_calling_aets[{i}]", aet)
        if not 0 <= self.receivers <= 64:
            raise ConfigError(f"dicom.receivers: {self.receivers} is not in 0-64")
        if not 1 <= self.max_associations <= 1000:
            raise ConfigError(f"dicom.max_associations: {self.max_associations} is not in 1-1000")
        for name in ("max_associations_per_source", "plain_max_associations"):
            if not 0 <= getattr(self, name) <= self.max_associations:
                raise ConfigError(f"dicom.{name}: {getattr(self, name)} is not in 0-{self.max_associations} "
                                  "(dicom.max_associations)")
        if not 4096 <= self.max_pdu_size <= 16 * 1048576:
            raise ConfigError(f"dicom.max_pdu_size: {self.max_pdu_size} is not in 4096-16777216")
        if not 0 <= self.max_store_seconds <= 7 * 86400:
            raise ConfigError(f"dicom.max_store_seconds: {self.max_store_seconds} is not in 0-604800 (0: no limit)")
        if not 0 <= self.min_store_rate <= 1 << 30:
            raise ConfigError(f"dicom.min_store_rate: {self.min_store_rate} is not in 0-1073741824 bytes/s")
        if not 1 <= self.max_pending_connections <= 10000:
            raise ConfigError(f"dicom.max_pending_connections: {self.max_pending_connections} is not in 1-10000")
        if not 1 <= self.max_pending_per_source <= self.max_pending_connections:
            raise ConfigError(f"dicom.max_pending_per_source: {self.max_pending_per_source} is not in "
                              f"1-{self.max_pending_connections} (dicom.max_pending_connections)")
        if not 4096 <= self.max_associate_rq_size <= 16 * 1048576:
            raise ConfigError(f"dicom.max_associate_rq_size: {self.max_associate_rq_size} is not in 4096-16777216")
        if not 65536 <= self.max_identifier_size <= 1 << 30:
            raise ConfigError(f"dicom.max_identifier_size: {self.max_identifier_size} is not in 65536-1073741824")
        for name in ("tls_handshake_timeout", "artim_timeout", "acse_timeout", "dimse_timeout", "network_timeout"):
            if not 0 < getattr(self, name) <= 3600:
                raise ConfigError(f"dicom.{name}: must be between 0 and 3600 seconds")


@dataclass(frozen=True)
class ClientSection:
    ae_title: str = setting("M3SCU", "Calling AE title of `m3dicom echo` and `m3dicom send`.")
    certificate: Path = setting(Path("certs/client.pem"), "Client certificate (PEM) presented by "
                                "`m3dicom echo` / `send` over TLS.", path=True)
    private_key: Path = setting(Path("certs/client.key"), "Private key (PEM) of the client certificate.",
                                path=True)

    def validate(self) -> None:
        _check_ae("client.ae_title", self.ae_title)


_PREFIX_RE = re.compile(r"^([A-Za-z0-9_.-]+/)*$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class S3Section:
    bucket: str = setting("", "Bucket the node offloads to (required with storage.backend = \"s3\").")
    endpoint_url: str = setting("", "S3 endpoint URL; empty = AWS. Set it for any S3-compatible endpoint.")
    region: str = setting("us-east-1", "Region of the bucket.")
    prefix: str = setting("m3dicom/", "Key prefix of this node's objects (one node per prefix); keys are "
                          "the prefix and random blob ids, never a UID or patient value.")
    part_size: int = setting(8 << 20, "Multipart upload part size in bytes; larger objects go up in parts "
                             "(at least 5 MiB, S3's minimum).")
    concurrency: int = setting(4, "Objects uploaded at the same time (each large one also sends 4 parts "
                               "at a time).")
    timeout: float = setting(30.0, "Connect and read timeout of one S3 request, seconds.")
    retry_max_delay: float = setting(300.0, "Longest wait between two attempts of a failed upload, seconds "
                                     "(exponential backoff with jitter from 2 s).")

    def validate(self) -> None:
        key = "storage.s3"
        if self.bucket and not _BUCKET_RE.match(self.bucket):
            raise ConfigError(f"{key}.bucket: {self.bucket!r} is not an S3 bucket name")
        if not _PREFIX_RE.match(self.prefix):
            raise ConfigError(f"{key}.prefix: {self.prefix!r} must be empty or end with '/' "
                              "(letters, digits, '_', '-', '.')")
        if not 5 << 20 <= self.part_size <= 5 << 30:
            raise ConfigError(f"{key}.part_size: {self.part_size} is not in 5 MiB - 5 GiB")
        if not 1 <= self.concurrency <= 64:
            raise ConfigError(f"{key}.concurrency: {self.concurrency} is not in 1-64")
        if not 0 < self.timeout <= 600:
            raise ConfigError(f"{key}.timeout: must be between 0 and 600 seconds")
        if not 1 <= self.retry_max_delay <= 86400:
            raise ConfigError(f"{key}.retry_max_delay: must be between 1 and 86400 seconds")


@dataclass(frozen=True)
class StorageSection:
    backend: str = setting("local", "Where blobs live: \"local\" (the data directory only) or \"s3\" "
                           "(kept locally first, then offloaded to [storage.s3]; the local copies become "
                           "a cache).", choices=("local", "s3"))
    duplicates: str = setting("keep-first", "A SOP Instance UID received again with different bytes: "
                              "\"keep-first\" keeps the stored copy and answers Success, "
                              "\"replace\" stores the new one. Identical bytes are always a no-op.",
                              choices=("keep-first", "replace"))
    segment_size: int = setting(1048576, "Plaintext bytes per authenticated encryption segment "
                                "of a blob (memory used per instance being written or read).")
    cache_max_bytes: int = setting(0, "With backend \"s3\": local copies of offloaded blobs kept at most, "
                                   "bytes (oldest evicted first); 0 = keep everything.")
    cache_max_age_days: float = setting(0.0, "With backend \"s3\": days a local copy is kept after its "
                                        "upload; 0 = no age limit.")
    min_free_bytes: int = setting(1 << 30, "Free space kept on the data directory's disk: below it a C-STORE (or "
                                  "upload) is refused at once with 0xA700 before anything is spooled, and one being "
                                  "received is dropped, so that the disk never fills up. 0 = no reserve.")
    s3: S3Section = field(default_factory=S3Section)

    def validate(self) -> None:
        if not 4096 <= self.segment_size <= 64 * 1048576:
            raise ConfigError(f"storage.segment_size: {self.segment_size} is not in 4096-67108864")
        if self.cache_max_bytes < 0:
            raise ConfigError("storage.cache_max_bytes: must be 0 or more")
        if not 0 <= self.min_free_bytes <= 1 << 50:
            raise ConfigError(f"storage.min_free_bytes: {self.min_free_bytes} is not in 0 - 1 PiB")
        if self.cache_max_age_days < 0:
            raise ConfigError("storage.cache_max_age_days: must be 0 or more")
        if self.backend == "s3" and not self.s3.bucket:
            raise ConfigError("storage.s3.bucket: required when storage.backend = \"s3\"")


@dataclass(frozen=True)
class CryptoSection:
    kms_key_id: str = setting("", "AWS KMS key (id, ARN or alias) that wraps the data keys of objects in S3; "
                              "empty = the local key file wraps them too.")
    kms_endpoint_url: str = setting("", "KMS endpoint URL; empty = AWS.")
    kms_region: str = setting("", "Region of the KMS key; empty = storage.s3.region.")


@dataclass(frozen=True)
class QuerySection:
    max_results: int = setting(1000, "C-FIND matches answered at most; a query with more ends with "
                               "status 0xA700 and a comment asking to narrow it.")
    case_insensitive_names: bool = setting(True, "Match person names (PatientName, ReferringPhysicianName) "
                                           "without regard to case.")
    timeout: float = setting(20.0, "Seconds of index work one C-FIND may take; past it the query ends "
                             "with status 0xA700 and a comment asking to narrow it.")
    max_retrieve_instances: int = setting(20000, "Instances one C-MOVE or C-GET may send; one naming more is "
                                          "refused with 0xA702 before any is sent.")

    def validate(self) -> None:
        if not 1 <= self.max_results <= 65535:
            raise ConfigError(f"query.max_results: {self.max_results} is not in 1-65535")
        if not 0 < self.timeout <= 3600:
            raise ConfigError(f"query.timeout: {self.timeout} is not in 0-3600 seconds")
        if not 1 <= self.max_retrieve_instances <= 65535:
            raise ConfigError(f"query.max_retrieve_instances: {self.max_retrieve_instances} is not in 1-65535")


@dataclass(frozen=True)
class CommitmentSection:
    max_pending_per_peer: int = setting(8, "Storage commitment requests from one calling AE title not yet "
                                        "reported, at most; one more is refused with 0x0213 (resource "
                                        "limitation).")
    report_retry_hours: float = setting(24.0, "Hours after a storage commitment request that its report is still "
                                        "tried on a new association to the requester's [remote.NAME] node; "
                                        "then it is given up, with one log line.")

    def validate(self) -> None:
        if not 1 <= self.max_pending_per_peer <= 1000:
            raise ConfigError(f"commitment.max_pending_per_peer: {self.max_pending_per_peer} is not in 1-1000")
        if not 0 < self.report_retry_hours <= 720:
            raise ConfigError(f"commitment.report_retry_hours: {self.report_retry_hours} is not in 0-720 hours")


@dataclass(frozen=True)
class IngestSection:
    max_inflated_bytes: int = setting(1 << 30, "A deflated data set (Deflated Explicit VR Little Endian) may "
                                      "inflate to at most this many bytes; past it the instance is refused "
                                      "(C-STORE 0xC000) and nothing is stored.")
    max_inflate_ratio: int = setting(100, "Once a deflated data set has inflated past 64 MiB it may be at most "
                                     "this many times its deflated size (a deflate bomb stops there, 0xC000).")
    max_sequence_depth: int = setting(32, "Sequence items nested inside each other at most (real data sets "
                                      "rarely go past 6); deeper is refused with 0xC000.")
    max_pixel_bytes: int = setting(1 << 30, "Largest decoded pixel data the viewer and plug-ins decode (declared "
                                   "Rows x Columns x Frames x Samples x bytes per sample, and each compressed "
                                   "frame's own header); larger is shown / failed with a reason, never decoded.")
    on_conflict: str = setting("refuse", "An instance whose study belongs to another patient, or whose series "
                               "to another study: \"refuse\" (0xC000, recorded in the conflicts table) or "
                               "\"quarantine\" (stored durably outside the hierarchy, answered Success).",
                               choices=("refuse", "quarantine"))
    max_instance_bytes: int = setting(4 << 30, "Largest data set one C-STORE may bring, bytes: 4 GiB holds the "
                                      "largest native pixel data an element can (its length is 32 bits) and "
                                      "enhanced multi-frame CT/MR and slide images; past it the spool file is "
                                      "dropped as it grows and 0xA700 answered.")

    def validate(self) -> None:
        if not 1 << 20 <= self.max_inflated_bytes <= 1 << 40:
            raise ConfigError(f"ingest.max_inflated_bytes: {self.max_inflated_bytes} is not in 1 MiB - 1 TiB")
        if not 2 <= self.max_inflate_ratio <= 100000:
            raise ConfigError(f"ingest.max_inflate_ratio: {self.max_inflate_ratio} is not in 2-100000")
        if not 1 <= self.max_sequence_depth <= 64:
            raise ConfigError(f"ingest.max_sequence_depth: {self.max_sequence_depth} is not in 1-64")
        if not 1 << 20 <= self.max_pixel_bytes <= 1 << 40:
            raise ConfigError(f"ingest.max_pixel_bytes: {self.max_pixel_bytes} is not in 1 MiB - 1 TiB")
        if not 1 << 20 <= self.max_instance_bytes <= 1 << 40:
            raise ConfigError(f"ingest.max_instance_bytes: {self.max_instance_bytes} is not in 1 MiB - 1 TiB")


@dataclass(frozen=True)
class RemoteNode:
    """A named DICOM node the node sends to ([remote.NAME]): C-MOVE destinations, results."""
    ae_title: str = setting("", "AE title of the remote node (required).")
    host: str = setting("", "Host name or address of the remote node (required).")
    port: int = setting(104, "DICOM port of the remote node.")
    tls: bool = setting(True, "Connect with TLS; the node's identity is [dicom] certificate / "
                        "private_key unless overridden below.")
    certificate: Path | None = setting(None, "Client certificate (PEM) presented to this node; "
                                       "default: dicom.certificate.", path=True)
    private_key: Path | None = setting(None, "Private key (PEM) of that certificate; default: "
                                       "dicom.private_key.", path=True)
    ca_certificates: Path | None = setting(None, "CA certificates (PEM) the remote's server certificate "
                                           "must chain to; default: dicom.ca_certificates.", path=True)
    server_name: str = setting("", "Name checked against the remote's certificate; default: host.")

    def validate(self, key: str = "remote") -> None:
        _check_ae(f"{key}.ae_title", self.ae_title)
        if not self.host:
            raise ConfigError(f"{key}.host: required")
        _check_port(f"{key}.port", self.port, allow_zero=False)


MATCH_KEYS = ("Modality", "SOPClassUID", "BodyPartExamined", "CallingAETitle", "StudyDescription",
              "SeriesDescription")


@dataclass(frozen=True)
class Rule:
    """One routing rule ([[router.rules]]): which studies go to which plug-in."""
    name: str = setting("", "Name of the rule (required, unique); jobs it creates carry it.")
    match: dict = setting({}, "Conditions a series must all meet: a DICOM keyword (" + ", ".join(MATCH_KEYS) +
                          ") = a value matched exactly, \"/regex/\" (full match), or a list of those; "
                          "empty matches every study.")
    plugin: str = setting("", "Plug-in the matching series go to (required).")
    params: dict = setting({}, "Parameters for the plug-in, as its schema names them.")
    forward_to: list = setting([], "[remote.NAME] nodes the results are sent to by C-STORE.")
    quiet_seconds: float = setting(5.0, "Seconds without a new instance of the study before it counts as "
                                   "complete and the rule is evaluated.")

    def validate(self, key: str) -> None:
        if not self.name or not _NAME_RE.match(self.name):
            raise ConfigError(f"{key}.name: required; letters, digits, '_' and '-'")
        if not self.plugin:
            raise ConfigError(f"{key}.plugin: required")
        for keyword, value in self.match.items():
            if keyword not in MATCH_KEYS:
                raise ConfigError(f"{key}.match.{keyword}: not a key rules can match on ({', '.join(MATCH_KEYS)})")
            for pattern in value if isinstance(value, list) else [value]:
                if not isinstance(pattern, str):
                    raise ConfigError(f"{key}.match.{keyword}: expected strings, got {pattern!r}")
                if len(pattern) > 1 and pattern.startswith("/") and pattern.endswith("/"):
                    try:
                        re.compile(pattern[1:-1])
                    except re.error as exc:
                        raise ConfigError(f"{key}.match.{keyword}: bad regular expression {pattern!r}: {exc}") from None
        if not all(isinstance(n, str) for n in self.forward_to):
            raise ConfigError(f"{key}.forward_to: expected names of [remote.NAME] nodes")
        if not 0 <= self.quiet_seconds <= 86400:
            raise ConfigError(f"{key}.quiet_seconds: must be between 0 and 86400")


@dataclass(frozen=True)
class RouterSection:
    enabled: bool = setting(True, "Run the router: rules, jobs, and the Dask executor (a process of its own).")
    scheduler: str = setting("", "Address of an external Dask scheduler (\"tcp://host:8786\"); empty = an "
                             "embedded LocalCluster started with the first job.")
    workers: int = setting(1, "Worker processes of the embedded LocalCluster (one thread each).")
    dashboard_port: int = setting(0, "Port of the embedded cluster's Dask dashboard, on 127.0.0.1 only (it has "
                                  "no login: reach it through an SSH tunnel); 0 (default): no dashboard.")
    plugins: list = setting([], "Plug-ins besides those installed (entry points `m3dicom.plugins`), as "
                            "\"module:attribute\" importable by the node and its workers.")
    max_attempts: int = setting(3, "Attempts of a job before it stays failed (errors of each are kept).")
    job_timeout: float = setting(1800.0, "Seconds an attempt may run before it is stopped and counted as failed.")
    forward_retry_max_delay: float = setting(600.0, "Longest wait between two attempts to forward results, seconds.")
    rules: list = setting([], "Routing rules ([[router.rules]]), evaluated in order; every rule that matches "
                          "a series creates a job.", item=Rule)

    def validate(self) -> None:
        if not 1 <= self.workers <= 64:
            raise ConfigError(f"router.workers: {self.workers} is not in 1-64")
        _check_port("router.dashboard_port", self.dashboard_port, allow_zero=True)
        if not 1 <= self.max_attempts <= 100:
            raise ConfigError(f"router.max_attempts: {self.max_attempts} is not in 1-100")
        if not 1 <= self.job_timeout <= 7 * 86400:
            raise ConfigError("router.job_timeout: must be between 1 second and 7 days")
        if not 1 <= self.forward_retry_max_delay <= 86400:
            raise ConfigError("router.forward_retry_max_delay: must be between 1 and 86400 seconds")
        if self.scheduler and not re.match(r"^(tcp|tls|inproc|ucx)://", self.scheduler):
            raise ConfigError(f"router.scheduler: {self.scheduler!r} is not a Dask address (tcp://host:port)")
        for i, plugin in enumerate(self.plugins):
            if not isinstance(plugin, str) or not re.match(r"^[\w.]+:[\w.]+$", plugin):
                raise ConfigError(f"router.plugins[{i}]: expected \"module:attribute\", got {plugin!r}")
        names = [r.name for r in self.rules]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise ConfigError(f"router.rules: two rules are named {duplicate!r}")


@dataclass(frozen=True)
class ViewerSection:
    enabled: bool = setting(True, "Run the web viewer with the node (a process of its own); `m3dicom viewer` runs "
                            "it alone.")
    host: str = setting("127.0.0.1", "Address the viewer listens on. Beyond loopback it needs TLS and at least "
                        "one user, or it refuses to start.")
    port: int = setting(8443, "Port of the viewer (HTTPS).")
    tls: bool = setting(True, "Serve HTTPS with the node's certificate (or the one below).")
    certificate: Path | None = setting(None, "Certificate (PEM) of the viewer; default: dicom.certificate.", path=True)
    private_key: Path | None = setting(None, "Its private key (PEM); default: dicom.private_key.", path=True)
    session_idle_minutes: float = setting(30.0, "A session unused this long ends.")
    session_hours: float = setting(12.0, "A session ends this long after its login, used or not.")
    share_link_days: float = setting(7.0, "Default lifetime of a share link (at most 90 days).")
    max_upload_mb: int = setting(2048, "Largest upload (all files of one request together), MB.")
    max_file_mb: int = setting(1024, "Largest single file of an upload (or inside a zip), MB.")
    image_cache_mb: int = setting(512, "Memory for decoded images and rendered tiles.")
    decode_memory_mb: int = setting(2560, "Memory the images being decoded and rendered may hold together (each "
                                    "reserves twice its decoded size, and more for a compressed one, first); "
                                    "beyond it they wait their turn, and one that needs more is not shown.")
    max_upload_files: int = setting(20000, "Files in one upload (its parts and the members of its zips together); "
                                    "more: 413, nothing stored.")
    max_event_streams: int = setting(6, "Notification streams (/api/events) one session may hold open; more: 429.")
    max_event_streams_per_address: int = setting(32, "Notification streams open from one address (IPv6: one /64), "
                                                 "all sessions together; more: 429.")
    login_waiting: int = setting(4, "Login attempts for one account, or from one address, that wait their turn "
                                 "while another is checked; more at once are answered 429 unchecked.")
    public_url: str = setting("", "The viewer's address as clinicians reach it (share links use it); empty: "
                              "https://host:port.")

    def validate(self) -> None:
        _check_port("viewer.port", self.port, allow_zero=False)
        for name in ("session_idle_minutes", "session_hours"):
            if not 0 < getattr(self, name) <= 24 * 30 * 60:
                raise ConfigError(f"viewer.{name}: must be positive")
        if not 0 < self.share_link_days <= 90:
            raise ConfigError("viewer.share_link_days: must be between 0 and 90")
        if not 1 <= self.max_file_mb <= self.max_upload_mb <= 1 << 20:
            raise ConfigError("viewer.max_file_mb / max_upload_mb: 1 <= max_file_mb <= max_upload_mb")
        if not 16 <= self.image_cache_mb <= 1 << 16:
            raise ConfigError("viewer.image_cache_mb: must be between 16 and 65536")
        if not 0 <= self.login_waiting <= 100:
            raise ConfigError(f"viewer.login_waiting: {self.login_waiting} is not in 0-100")
        if not 64 <= self.decode_memory_mb <= 1 << 20:
            raise ConfigError("viewer.decode_memory_mb: must be between 64 and 1048576")
        if not 1 <= self.max_upload_files <= 1_000_000:
            raise ConfigError("viewer.max_upload_files: must be between 1 and 1000000")
        if not 1 <= self.max_event_streams <= self.max_event_streams_per_address <= 100_000:
            raise ConfigError("viewer.max_event_streams / max_event_streams_per_address: "
                              "1 <= max_event_streams <= max_event_streams_per_address")
        if self.public_url and not re.match(r"^https?://[^\s/]+(:\d+)?(/.*)?$", self.public_url):
            raise ConfigError(f"viewer.public_url: {self.public_url!r} is not an http(s) address")


@dataclass(frozen=True)
class LogSection:
    level: str = setting("INFO", "Log level of the node.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass(frozen=True)
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    dicom: DicomSection = field(default_factory=DicomSection)
    client: ClientSection = field(default_factory=ClientSection)
    storage: StorageSection = field(default_factory=StorageSection)
    crypto: CryptoSection = field(default_factory=CryptoSection)
    query: QuerySection = field(default_factory=QuerySection)
    commitment: CommitmentSection = field(default_factory=CommitmentSection)
    ingest: IngestSection = field(default_factory=IngestSection)
    router: RouterSection = field(default_factory=RouterSection)
    viewer: ViewerSection = field(default_factory=ViewerSection)
    log: LogSection = field(default_factory=LogSection)
    remote: dict = field(default_factory=dict)   # name -> RemoteNode

    def remote_by_ae(self, ae_title: str) -> RemoteNode | None:
        """The configured remote node with this AE title (C-MOVE destination, requester)."""
        return next((r for r in self.remote.values() if r.ae_title == ae_title), None)

    @property
    def data_dir(self) -> Path:
        return self.node.data_dir


SECTIONS: dict[str, type] = {f.name: get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)
                             if f.name != "remote"}
NAMED_SECTIONS: dict[str, type] = {"remote": RemoteNode}   # [remote.NAME] tables
KEYED_SECTIONS = (RemoteNode, Rule)                         # told their own key (remote.X, router.rules[i])
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _coerce(key: str, value: Any, kind: Any, f: dataclasses.Field, base: Path) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
        return value
    if kind is Path or kind == (Path | None):
        if kind != Path and value == "":                         # an optional path left empty: the default
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a path string, got {value!r}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path
    if kind is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = f.metadata.get("item")
        if item is not None:                                     # [[key]]: a list of tables
            return [_section(f"{key}[{i}]", item, raw, base) for i, raw in enumerate(value)]
        return value
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported setting type {kind!r}")  # pragma: no cover


def _section(name: str, cls: type, raw: Any, base: Path):
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a table [{name}]")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    extra = set(raw) - set(fields)
    if extra:
        raise ConfigError(f"unknown setting {name}.{sorted(extra)[0]}")
    values = {}
    for key, f in fields.items():
        if dataclasses.is_dataclass(hints[key]):                 # a nested table, e.g. [storage.s3]
            values[key] = _section(f"{name}.{key}", hints[key], raw.get(key, {}), base)
        elif key in raw:
            values[key] = _coerce(f"{name}.{key}", raw[key], hints[key], f, base)
        elif f.metadata.get("path") and f.default is not None:
            values[key] = base / f.default
    section = cls(**values)
    if hasattr(section, "validate"):
        section.validate(name) if cls in KEYED_SECTIONS else section.validate()
    return section


def from_dict(data: dict, base: Path) -> Config:
    """Build a validated Config; relative paths are resolved against `base`."""
    unknown = set(data) - set(SECTIONS) - set(NAMED_SECTIONS)
    if unknown:
        raise ConfigError(f"unknown section [{sorted(unknown)[0]}] "
                          f"(known: {', '.join([*SECTIONS, *NAMED_SECTIONS])})")
    sections = {name: _section(name, cls, data.get(name, {}), base) for name, cls in SECTIONS.items()}
    for kind, cls in NAMED_SECTIONS.items():
        tables = data.get(kind, {})
        if not isinstance(tables, dict):
            raise ConfigError(f"{kind}: expected tables [{kind}.NAME]")
        named = {}
        for name, raw in tables.items():
            if not _NAME_RE.match(name):
                raise ConfigError(f"{kind}.{name}: names are letters, digits, '_' and '-'")
            named[name] = _section(f"{kind}.{name}", cls, raw, base)
        titles = [r.ae_title for r in named.values()]
        duplicate = next((t for t in titles if titles.count(t) > 1), None)
        if duplicate:
            raise ConfigError(f"{kind}: AE title {duplicate!r} is used by two nodes")
        sections[kind] = named
    for i, rule in enumerate(sections["router"].rules):
        unknown_remote = next((n for n in rule.forward_to if n not in sections["remote"]), None)
        if unknown_remote:
            raise ConfigError(f"router.rules[{i}].forward_to: no [remote.{unknown_remote}] node")
    return Config(**sections)


def load(path: Path | None) -> Config:
    """Read the TOML file at `path` (or the defaults, relative to the current directory)."""
    if path is None:
        return from_dict({}, Path.cwd())
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_dict(data, path.resolve().parent)


def documented_settings() -> list[tuple[str, Any, str]]:
    """(dotted name, default, help) for every setting, in declaration order."""
    rows = []

    def walk(name: str, cls: type) -> None:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(f"{name}.{f.name}", hints[f.name])
                continue
            if f.metadata.get("item"):
                walk(f"{name}.{f.name}[]", f.metadata["item"])
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{name}.{f.name}", default, f.metadata["help"]))

    for name, cls in [*SECTIONS.items(), *((f"{kind}.NAME", cls) for kind, cls in NAMED_SECTIONS.items())]:
        walk(name, cls)
    return rows
