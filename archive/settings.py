"""Settings: how each package declares its own, and the archive's (node, storage, crypto, query, ingest).

Every setting is declared once, in the package that reads it, with its default, its type and a
line of help (`setting`). `node/config.py` reads the TOML file into one object made of these
sections and hands each package the object; a package reads only its own sections and those of
the packages below it (the `Settings` protocols say which). `docs/configuration.md` documents
each setting; a test fails when one is missing there.
"""
from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol


class SettingsError(ValueError):
    """A setting is unknown, has the wrong type or an invalid value."""


def setting(default: Any, help: str, *, path: bool = False, choices: tuple = (), item: type | None = None,
            factory: Callable[[], Any] | None = None) -> Any:
    """A setting; `item`: a list of tables (`[[section.key]]`), each read as that dataclass; `factory`: makes
    the default where it depends on the machine (`default` is then only what the documentation shows)."""
    meta = {"help": help, "path": path, "choices": choices, "item": item}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash


def check_ae(key: str, value: str) -> None:
    if not _AE_RE.match(value) or not value.strip():
        raise SettingsError(f"{key}: {value!r} is not a valid AE title "
                            "(1-16 printable ASCII characters, no backslash, not only spaces)")


def check_port(key: str, value: int, allow_zero: bool) -> None:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise SettingsError(f"{key}: {value} is not a port number ({low}-65535)")


_NODE_NAME_RE = re.compile(r"^[\x21-\x5b\x5d-\x7e]{1,64}$")  # printable ASCII without space or backslash


def default_node_name() -> str:
    """The machine's host name: what `node.name` is unless set."""
    return socket.gethostname()


def check_node_name(key: str, value: str) -> None:
    if not _NODE_NAME_RE.match(value):
        raise SettingsError(f"{key}: {value!r} is not a valid node name (1-64 printable ASCII characters, "
                            "no spaces, no backslash); set [node] name")


@dataclass(frozen=True)
class NodeSection:
    ae_title: str = setting("M3DICOM", "AE title of the node: the called AE title peers must use.")
    data_dir: Path = setting(Path("var"), "Directory for the index, the encrypted blobs and the "
                             "key-encryption key. Created (mode 0700) on first start.", path=True)
    name: str = setting("", "This node's name among the nodes that share an index (the host name unless set; 1-64 "
                        "printable characters, no spaces): the index records which node holds each blob received "
                        "here until it is offloaded, and this node's offloader follows the change log as "
                        "offload:NAME. Two nodes with one name and different data directories cannot run at once.",
                        factory=default_node_name)

    def validate(self) -> None:
        check_ae("node.ae_title", self.ae_title)
        check_node_name("node.name", self.name)


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
            raise SettingsError(f"{key}.bucket: {self.bucket!r} is not an S3 bucket name")
        if not _PREFIX_RE.match(self.prefix):
            raise SettingsError(f"{key}.prefix: {self.prefix!r} must be empty or end with '/' "
                                "(letters, digits, '_', '-', '.')")
        if not 5 << 20 <= self.part_size <= 5 << 30:
            raise SettingsError(f"{key}.part_size: {self.part_size} is not in 5 MiB - 5 GiB")
        if not 1 <= self.concurrency <= 64:
            raise SettingsError(f"{key}.concurrency: {self.concurrency} is not in 1-64")
        if not 0 < self.timeout <= 600:
            raise SettingsError(f"{key}.timeout: must be between 0 and 600 seconds")
        if not 1 <= self.retry_max_delay <= 86400:
            raise SettingsError(f"{key}.retry_max_delay: must be between 1 and 86400 seconds")


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
    remote_wait_seconds: float = setting(30.0, "With a shared index ([index] url): how long a read (C-GET, C-MOVE, "
                                         "the viewer, a job) waits for an instance that another node received and "
                                         "has not offloaded to S3 yet, polling S3 and that node's offload state; "
                                         "then that read fails with the reason (C-GET/C-MOVE: a failed "
                                         "sub-operation; the viewer: 503). 0 = do not wait.")
    s3: S3Section = field(default_factory=S3Section)

    def validate(self) -> None:
        if not 0 <= self.remote_wait_seconds <= 3600:
            raise SettingsError(f"storage.remote_wait_seconds: {self.remote_wait_seconds} is not in 0-3600 seconds")
        if not 4096 <= self.segment_size <= 64 * 1048576:
            raise SettingsError(f"storage.segment_size: {self.segment_size} is not in 4096-67108864")
        if self.cache_max_bytes < 0:
            raise SettingsError("storage.cache_max_bytes: must be 0 or more")
        if not 0 <= self.min_free_bytes <= 1 << 50:
            raise SettingsError(f"storage.min_free_bytes: {self.min_free_bytes} is not in 0 - 1 PiB")
        if self.cache_max_age_days < 0:
            raise SettingsError("storage.cache_max_age_days: must be 0 or more")
        if self.backend == "s3" and not self.s3.bucket:
            raise SettingsError("storage.s3.bucket: required when storage.backend = \"s3\"")


@dataclass(frozen=True)
class IndexSection:
    url: str = setting("", "Where the index lives. Empty: the SQLite file index.sqlite3 in node.data_dir (one node). "
                       "\"postgresql://USER@HOST:PORT/DATABASE\": PostgreSQL, shared by several nodes, through a "
                       "connection pool; the password is never written here: libpq reads it from PGPASSWORD, the "
                       "pass file PGPASSFILE names (~/.pgpass by default) or a service file (PGSERVICE).")

    def validate(self) -> None:
        from .db import IndexUrlError, check_url

        try:
            check_url(self.url)
        except IndexUrlError as exc:
            raise SettingsError(str(exc)) from None


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
            raise SettingsError(f"query.max_results: {self.max_results} is not in 1-65535")
        if not 0 < self.timeout <= 3600:
            raise SettingsError(f"query.timeout: {self.timeout} is not in 0-3600 seconds")
        if not 1 <= self.max_retrieve_instances <= 65535:
            raise SettingsError(f"query.max_retrieve_instances: {self.max_retrieve_instances} is not in 1-65535")


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
            raise SettingsError(f"ingest.max_inflated_bytes: {self.max_inflated_bytes} is not in 1 MiB - 1 TiB")
        if not 2 <= self.max_inflate_ratio <= 100000:
            raise SettingsError(f"ingest.max_inflate_ratio: {self.max_inflate_ratio} is not in 2-100000")
        if not 1 <= self.max_sequence_depth <= 64:
            raise SettingsError(f"ingest.max_sequence_depth: {self.max_sequence_depth} is not in 1-64")
        if not 1 << 20 <= self.max_pixel_bytes <= 1 << 40:
            raise SettingsError(f"ingest.max_pixel_bytes: {self.max_pixel_bytes} is not in 1 MiB - 1 TiB")
        if not 1 << 20 <= self.max_instance_bytes <= 1 << 40:
            raise SettingsError(f"ingest.max_instance_bytes: {self.max_instance_bytes} is not in 1 MiB - 1 TiB")


def check_shared(index: IndexSection, storage: StorageSection) -> None:
    """Nodes that share an index share the blobs through S3: each keeps only its own data directory."""
    if index.url and storage.backend != "s3":
        raise SettingsError(f"index.url is set (an index shared by several nodes) but storage.backend is "
                            f"{storage.backend!r}: a shared index needs storage.backend = \"s3\" (with [storage.s3]), "
                            "so that every node can read what another received")


_REPOSITORY_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?)$")


@dataclass(frozen=True)
class AuditSection:
    repository: str = setting("", "IHE ATNA audit repository, \"host:port\" (syslog over TLS, RFC 5425; 6514 is its "
                              "port): every association, query, retrieve, login and start or stop of the node is "
                              "sent there as a DICOM audit message (PS3.15 A.5). Empty: none are made.")
    ca_certificates: Path | None = setting(None, "CA certificates (PEM) the repository's certificate must chain to; "
                                           "default: dicom.ca_certificates.", path=True)
    certificate: Path | None = setting(None, "The node's certificate (PEM) for the repository; default: "
                                       "dicom.certificate.", path=True)
    private_key: Path | None = setting(None, "Its private key; default: dicom.private_key.", path=True)
    source_id: str = setting("", "AuditSourceID of the messages; empty: node.ae_title.")
    site_id: str = setting("", "AuditEnterpriseSiteID of the messages (the hospital); empty: none.")

    def validate(self) -> None:
        if self.repository:
            host, _, port = self.repository.rpartition(":")
            if (not _REPOSITORY_HOST.match(host) or not (port.isascii() and port.isdigit())
                    or not 1 <= int(port) <= 65535):
                raise SettingsError(f"audit.repository: {self.repository!r} is not host:port (an IPv6 address in "
                                    "brackets: [::1]:6514)")


class Settings(Protocol):
    """What the archive reads: the node's data directory, index, crypto, query and ingest settings."""
    node: NodeSection
    index: IndexSection
    storage: StorageSection
    crypto: CryptoSection
    query: QuerySection
    ingest: IngestSection
    audit: AuditSection

    @property
    def data_dir(self) -> Path: ...
