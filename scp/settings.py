"""The DICOM services' settings: [dicom], [client], [commitment] and the [remote.NAME] nodes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from archive.settings import Settings as ArchiveSettings
from archive.settings import SettingsError, check_ae, check_port, setting


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
    receivers: int = setting(0, "Receiving processes sharing the DICOM ports (pynetdicom uses one core "
                             "per process); 0 (default) = one per CPU core, at most 4.")
    max_associations: int = setting(16, "Maximum simultaneous associations of the node (all its receiving "
                                    "processes together); more are rejected.")
    max_associations_per_source: int = setting(0, "Associations from one address (IPv6: one /64), all receiving "
                                               "processes together; more are rejected (A-ASSOCIATE-RJ, local "
                                               "limit exceeded). 0 (default): half of dicom.max_associations.")
    plain_max_associations: int = setting(0, "Associations the plain port may hold, all receiving processes "
                                          "together, the rest kept for TLS peers; 0 (default): three quarters "
                                          "of dicom.max_associations.")
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
    fast_path: bool = setting(True, "C-STORE and C-FIND through the node's own wire code (scp/fastpath.py), "
                              "written for pynetdicom 3.0.4: the node refuses to start on another version "
                              "unless this is false (pynetdicom's generic path, slower).")

    def validate(self) -> None:
        check_port("dicom.port", self.port, allow_zero=False)
        check_port("dicom.plain_port", self.plain_port, allow_zero=True)
        if self.plain_port and self.plain_port == self.port:
            raise SettingsError("dicom.plain_port: must differ from dicom.port")
        for i, aet in enumerate(self.allowed_calling_aets):
            if not isinstance(aet, str):
                raise SettingsError(f"dicom.allowed_calling_aets[{i}]: expected a string, got {aet!r}")
            check_ae(f"dicom.allowed_calling_aets[{i}]", aet)
        if not 0 <= self.receivers <= 64:
            raise SettingsError(f"dicom.receivers: {self.receivers} is not in 0-64")
        if not 1 <= self.max_associations <= 1000:
            raise SettingsError(f"dicom.max_associations: {self.max_associations} is not in 1-1000")
        for name in ("max_associations_per_source", "plain_max_associations"):
            if not 0 <= getattr(self, name) <= self.max_associations:
                raise SettingsError(f"dicom.{name}: {getattr(self, name)} is not in 0-{self.max_associations} "
                                    "(dicom.max_associations)")
        if not 4096 <= self.max_pdu_size <= 16 * 1048576:
            raise SettingsError(f"dicom.max_pdu_size: {self.max_pdu_size} is not in 4096-16777216")
        if not 0 <= self.max_store_seconds <= 7 * 86400:
            raise SettingsError(f"dicom.max_store_seconds: {self.max_store_seconds} is not in 0-604800 (0: no limit)")
        if not 0 <= self.min_store_rate <= 1 << 30:
            raise SettingsError(f"dicom.min_store_rate: {self.min_store_rate} is not in 0-1073741824 bytes/s")
        if not 1 <= self.max_pending_connections <= 10000:
            raise SettingsError(f"dicom.max_pending_connections: {self.max_pending_connections} is not in 1-10000")
        if not 1 <= self.max_pending_per_source <= self.max_pending_connections:
            raise SettingsError(f"dicom.max_pending_per_source: {self.max_pending_per_source} is not in "
                                f"1-{self.max_pending_connections} (dicom.max_pending_connections)")
        if not 4096 <= self.max_associate_rq_size <= 16 * 1048576:
            raise SettingsError(f"dicom.max_associate_rq_size: {self.max_associate_rq_size} is not in 4096-16777216")
        if not 65536 <= self.max_identifier_size <= 1 << 30:
            raise SettingsError(f"dicom.max_identifier_size: {self.max_identifier_size} is not in 65536-1073741824")
        for name in ("tls_handshake_timeout", "artim_timeout", "acse_timeout", "dimse_timeout", "network_timeout"):
            if not 0 < getattr(self, name) <= 3600:
                raise SettingsError(f"dicom.{name}: must be between 0 and 3600 seconds")


@dataclass(frozen=True)
class ClientSection:
    ae_title: str = setting("M3SCU", "Calling AE title of `m3dicom echo` and `m3dicom send`.")
    certificate: Path = setting(Path("certs/client.pem"), "Client certificate (PEM) presented by "
                                "`m3dicom echo` / `send` over TLS.", path=True)
    private_key: Path = setting(Path("certs/client.key"), "Private key (PEM) of the client certificate.",
                                path=True)

    def validate(self) -> None:
        check_ae("client.ae_title", self.ae_title)


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
            raise SettingsError(f"commitment.max_pending_per_peer: {self.max_pending_per_peer} is not in 1-1000")
        if not 0 < self.report_retry_hours <= 720:
            raise SettingsError(f"commitment.report_retry_hours: {self.report_retry_hours} is not in 0-720 hours")


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
        check_ae(f"{key}.ae_title", self.ae_title)
        if not self.host:
            raise SettingsError(f"{key}.host: required")
        check_port(f"{key}.port", self.port, allow_zero=False)


class Settings(ArchiveSettings, Protocol):
    """What the DICOM services read: the archive's settings and their own."""
    dicom: DicomSection
    client: ClientSection
    commitment: CommitmentSection
    remote: dict[str, RemoteNode]

    def remote_by_ae(self, ae_title: str) -> RemoteNode | None: ...
