"""The web viewer's settings: [viewer]."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from archive.settings import Settings as ArchiveSettings
from archive.settings import SettingsError, check_port, setting
from router.settings import RouterSection
from scp.settings import DicomSection


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
    instance_cache_mb: int = setting(128, "Memory for stored instances DICOMweb read lately (decrypted and verified, "
                                      "up to 4 MiB each; 0: none), so that a series' metadata and then its "
                                      "frames or instances read the store once.")
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
    header_timeout: float = setting(60.0, "Seconds a client has to send a request's headers, from its connection or "
                                    "its previous answer (an idle kept-alive connection is closed after it too).")
    body_timeout: float = setting(60.0, "Seconds a request body (an upload, STOW-RS, a form) may go without a byte; "
                                  "past it: 408 and the connection closed, nothing stored of it. Also how long a "
                                  "WADO-RS client may leave a piece of its answer untaken before it is cut off.")
    min_body_rate: int = setting(1024, "Bytes per second a request body must arrive at, over each minute; slower "
                                 "(a client trickling bytes to hold a connection and a spool directory): 408, "
                                 "closed. 0 = no rate.")
    public_url: str = setting("", "The viewer's address as clinicians reach it (share links use it); empty: "
                              "https://host:port.")
    cors_origins: list = setting([], "Origins (https://host[:port]) of web apps hosted elsewhere (an OHIF of "
                                 "their own) that may call /dicomweb with an API token; empty: none (CORS off).")
    ohif: bool = setting(True, "Serve the OHIF viewer at /ohif/ (installed by `make install` in viewer/vendor/ohif) "
                         "and link studies to it.")
    prefetch: bool = setting(True, "Make a study's DICOMweb metadata ahead, once it has received nothing for 10 s "
                             "(one thread of low priority, at most 2,000 instances a study, three quarters of the "
                             "64 MiB metadata cache): OHIF's first opening of it does not wait for every instance "
                             "to be read.")

    def validate(self) -> None:
        check_port("viewer.port", self.port, allow_zero=False)
        for name in ("session_idle_minutes", "session_hours"):
            if not 0 < getattr(self, name) <= 24 * 30 * 60:
                raise SettingsError(f"viewer.{name}: must be positive")
        if not 0 < self.share_link_days <= 90:
            raise SettingsError("viewer.share_link_days: must be between 0 and 90")
        if not 1 <= self.max_file_mb <= self.max_upload_mb <= 1 << 20:
            raise SettingsError("viewer.max_file_mb / max_upload_mb: 1 <= max_file_mb <= max_upload_mb")
        if not 16 <= self.image_cache_mb <= 1 << 16:
            raise SettingsError("viewer.image_cache_mb: must be between 16 and 65536")
        if not 0 <= self.instance_cache_mb <= 1 << 16:
            raise SettingsError("viewer.instance_cache_mb: must be between 0 and 65536")
        if not 0 <= self.login_waiting <= 100:
            raise SettingsError(f"viewer.login_waiting: {self.login_waiting} is not in 0-100")
        if not 64 <= self.decode_memory_mb <= 1 << 20:
            raise SettingsError("viewer.decode_memory_mb: must be between 64 and 1048576")
        if not 1 <= self.max_upload_files <= 1_000_000:
            raise SettingsError("viewer.max_upload_files: must be between 1 and 1000000")
        if not 1 <= self.max_event_streams <= self.max_event_streams_per_address <= 100_000:
            raise SettingsError("viewer.max_event_streams / max_event_streams_per_address: "
                                "1 <= max_event_streams <= max_event_streams_per_address")
        for name in ("header_timeout", "body_timeout"):
            if not 0 < getattr(self, name) <= 86400:
                raise SettingsError(f"viewer.{name}: {getattr(self, name)} is not in 0-86400 seconds (and not 0)")
        if not 0 <= self.min_body_rate <= 1 << 30:
            raise SettingsError(f"viewer.min_body_rate: {self.min_body_rate} is not in 0-1073741824 bytes/s")
        for i, origin in enumerate(self.cors_origins):
            if not isinstance(origin, str) or not re.match(r"^https?://[^\s/]+$", origin):
                raise SettingsError(f"viewer.cors_origins[{i}]: {origin!r} is not an origin (https://host[:port], "
                                    "no path)")
        if self.public_url and not re.match(r"^https?://[^\s/]+(:\d+)?(/.*)?$", self.public_url):
            raise SettingsError(f"viewer.public_url: {self.public_url!r} is not an http(s) address")


def loopback(host: str) -> bool:
    """Whether `host` (an address or "localhost") is reached from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class MetricsSection:
    host: str = setting("127.0.0.1", "Address of the operator's endpoints: /metrics (Prometheus), /healthz and "
                        "/readyz, plain HTTP on their own port, never the viewer's. Beyond loopback it needs "
                        "metrics.token_file, or the node refuses to start.")
    port: int = setting(9762, "Port of /metrics, /healthz and /readyz; 0 turns them off (and the counting with "
                        "them).")
    token_file: Path | None = setting(None, "A file (0600) holding the bearer token Prometheus must send for "
                                      "/metrics (`Authorization: Bearer ...`); empty: none asked on loopback.",
                                      path=True)

    def validate(self) -> None:
        check_port("metrics.port", self.port, allow_zero=True)


class Settings(ArchiveSettings, Protocol):
    """What the viewer reads: the archive's settings, its own, [dicom]'s certificate (its default)
    and the plug-ins [router] loads."""
    viewer: ViewerSection
    dicom: DicomSection
    router: RouterSection
