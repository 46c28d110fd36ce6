"""The router's settings: [router] and its [[router.rules]]."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from archive.settings import Settings as ArchiveSettings
from archive.settings import SettingsError, check_port, setting
from scp.settings import RemoteNode

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_S3_PLACE_RE = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/((?:[A-Za-z0-9_.-]+/)*)$")
_PRIVATE_RE = re.compile(r"^([0-9A-Fa-f]{4}),([^,]{1,64}),([0-9A-Fa-f]{2})$")
_MAX_REGIONS = 32


def check_s3_place(key: str, place: str) -> tuple[str, str]:
    """(bucket, prefix) of "s3://bucket/prefix/"; the prefix is empty or ends with '/'."""
    found = _S3_PLACE_RE.match(place)
    if not found:
        raise SettingsError(f"{key}: {place!r} is not \"s3://bucket/\" or \"s3://bucket/prefix/\" (a prefix ends "
                            "with '/'; letters, digits, '_', '-', '.')")
    return found.group(1), found.group(2)


def safe_private_tags(entries: list) -> frozenset[tuple[int, str, int]]:
    """The allow-list of private attributes, as (group, creator, element's low byte)."""
    found = set()
    for entry in entries:
        match = _PRIVATE_RE.match(entry) if isinstance(entry, str) else None
        if not match or int(match.group(1), 16) % 2 == 0:
            raise ValueError(f"{entry!r} is not \"GGGG,PRIVATE CREATOR,EE\" with an odd group")
        found.add((int(match.group(1), 16), match.group(2).strip(), int(match.group(3), 16)))
    return frozenset(found)


_LOOPBACK_HTTP = re.compile(r"^http://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?(/|$)")


@dataclass(frozen=True)
class DicomwebNode:
    """A DICOMweb server that de-identified copies may be sent to by STOW-RS ([dicomweb.NAME])."""
    url: str = setting("", "Base URL of its DICOMweb service, e.g. \"https://research.example/dicomweb\" (STOW-RS "
                       "posts to URL/studies); http:// only on loopback (required).")
    token_file: Path | None = setting(None, "A file (mode 0600) holding the bearer token sent as "
                                      "\"Authorization: Bearer ...\"; empty: no token.", path=True)
    ca_certificates: Path | None = setting(None, "CA certificates (PEM) its server certificate must chain to; "
                                           "default: the system's.", path=True)
    timeout: float = setting(60.0, "Seconds one STOW-RS request may take.")
    batch_bytes: int = setting(64 << 20, "Copies sent in one STOW-RS request, at most this many bytes together "
                               "(one larger copy goes alone).")

    def validate(self, key: str = "dicomweb") -> None:
        if not (self.url.startswith("https://") or _LOOPBACK_HTTP.match(self.url)):
            raise SettingsError(f"{key}.url: {self.url!r} is not an https:// URL (http:// only on loopback)")
        if not 1 <= self.timeout <= 3600:
            raise SettingsError(f"{key}.timeout: must be between 1 and 3600 seconds")
        if not 1 << 20 <= self.batch_bytes <= 1 << 30:
            raise SettingsError(f"{key}.batch_bytes: must be between 1 MiB and 1 GiB")


@dataclass(frozen=True)
class DeidProfile:
    """A de-identification project ([deid.NAME]): the options of PS3.15 Annex E it chooses, its secret."""
    options: list = setting([], "Options of PS3.15 Annex E on top of the Basic Profile: "
                            "retain_longitudinal_modified_dates (dates shifted by one amount per patient), "
                            "retain_longitudinal_full_dates, retain_patient_characteristics, "
                            "retain_device_identity, retain_institution_identity, retain_safe_private (with "
                            "safe_private), clean_descriptors, clean_structured_content.")
    secret_file: Path | None = setting(None, "The project's secret (32 random bytes, mode 0600) that pseudonyms, "
                                       "UIDs and date shifts are derived from; default: node.data_dir/deid/NAME.key, "
                                       "made by `m3dicom deid secret NAME`.", path=True)
    safe_private: list = setting([], "Private attributes kept with retain_safe_private: \"GGGG,PRIVATE CREATOR,EE\" "
                                 "(odd group, the creator's name, the element's last two hex digits).")
    burned_in: str = setting("drop", "Images that may show burned-in text (BurnedInAnnotation YES, Secondary "
                             "Capture, ultrasound): \"drop\" them, or \"blackout\" the blackout regions and keep "
                             "them. The node's own analysis results are kept.", choices=("drop", "blackout"))
    blackout: list = setting([], "Regions painted black with burned_in = \"blackout\": [x, y, width, height] "
                             "in pixels.")
    pseudonym_prefix: str = setting("ANON-", "Start of every pseudonym (Patient ID and Patient's Name).")
    max_shift_days: int = setting(3650, "Dates move back by 1 to this many days, one amount per patient.")
    s3_sse: str = setting("AES256", "Server-side encryption of the copies put in S3.",
                          choices=("AES256", "aws:kms"))
    s3_kms_key_id: str = setting("", "KMS key of the copies with s3_sse = \"aws:kms\" (empty: the bucket's).")

    def validate(self, key: str = "deid") -> None:
        from .deid.table import OPTIONS

        for option in self.options:
            if option not in OPTIONS:
                raise SettingsError(f"{key}.options: unknown option {option!r} (known: {', '.join(OPTIONS)})")
        if {"retain_longitudinal_modified_dates", "retain_longitudinal_full_dates"} <= set(self.options):
            raise SettingsError(f"{key}.options: retain_longitudinal_modified_dates (dates shifted) and "
                                "retain_longitudinal_full_dates (dates kept) exclude each other: choose one")
        try:
            safe = safe_private_tags(self.safe_private)
        except ValueError as exc:
            raise SettingsError(f"{key}.safe_private: {exc}") from None
        if safe and "retain_safe_private" not in self.options:
            raise SettingsError(f"{key}.safe_private: needs the option retain_safe_private")
        if self.burned_in == "blackout" and not self.blackout:
            raise SettingsError(f"{key}.blackout: burned_in = \"blackout\" needs regions [x, y, width, height]")
        if len(self.blackout) > _MAX_REGIONS or not all(
                isinstance(r, list) and len(r) == 4 and all(isinstance(v, int) and 0 <= v <= 65535 for v in r)
                for r in self.blackout):
            raise SettingsError(f"{key}.blackout: up to {_MAX_REGIONS} regions [x, y, width, height] of whole "
                                "pixels")
        if not re.fullmatch(r"[A-Z0-9_-]{0,16}", self.pseudonym_prefix):
            raise SettingsError(f"{key}.pseudonym_prefix: up to 16 capital letters, digits, '_' or '-'")
        if not 1 <= self.max_shift_days <= 36500:
            raise SettingsError(f"{key}.max_shift_days: must be between 1 and 36500")

MATCH_KEYS = ("Modality", "SOPClassUID", "BodyPartExamined", "CallingAETitle", "StudyDescription",
              "SeriesDescription")


@dataclass(frozen=True)
class Rule:
    """One routing rule ([[router.rules]]): which studies go to which plug-in."""
    name: str = setting("", "Name of the rule (required, unique); jobs it creates carry it.")
    match: dict = setting({}, "Conditions a series must all meet: a DICOM keyword (" + ", ".join(MATCH_KEYS) +
                          ") = a value matched exactly, \"/regex/\" (full match), or a list of those; "
                          "empty matches every study.")
    plugin: str = setting("", "Plug-in the matching series go to (required, unless the rule makes de-identified "
                          "copies: deid).")
    params: dict = setting({}, "Parameters for the plug-in, as its schema names them.")
    forward_to: list = setting([], "[remote.NAME] nodes the results are sent to by C-STORE.")
    deid: str = setting("", "Instead of a plug-in: the [deid.NAME] profile whose de-identified copies of the "
                        "matching studies go to deid_to.")
    deid_to: list = setting([], "Where the de-identified copies go: [remote.NAME] nodes (C-STORE), [dicomweb.NAME] "
                            "servers (STOW-RS) and \"s3://bucket/prefix/\" places (the node's S3 endpoint and "
                            "credentials).")
    quiet_seconds: float = setting(5.0, "Seconds without a new instance of the study before it counts as "
                                   "complete and the rule is evaluated.")

    def validate(self, key: str) -> None:
        if not self.name or not _NAME_RE.match(self.name):
            raise SettingsError(f"{key}.name: required; letters, digits, '_' and '-'")
        if not self.plugin and not self.deid:
            raise SettingsError(f"{key}.plugin: required (or deid: a [deid.NAME] profile, with deid_to)")
        if self.plugin and self.deid:
            raise SettingsError(f"{key}: give a plugin or a deid profile, not both")
        if self.deid and not self.deid_to:
            raise SettingsError(f"{key}.deid_to: where the de-identified copies go (required with deid)")
        for destination in self.deid_to:
            if not isinstance(destination, str):
                raise SettingsError(f"{key}.deid_to: expected names of [remote.NAME] nodes or s3:// places")
            if destination.startswith("s3://"):
                check_s3_place(f"{key}.deid_to", destination)
        for keyword, value in self.match.items():
            if keyword not in MATCH_KEYS:
                raise SettingsError(f"{key}.match.{keyword}: not a key rules can match on ({', '.join(MATCH_KEYS)})")
            for pattern in value if isinstance(value, list) else [value]:
                if not isinstance(pattern, str):
                    raise SettingsError(f"{key}.match.{keyword}: expected strings, got {pattern!r}")
                if len(pattern) > 1 and pattern.startswith("/") and pattern.endswith("/"):
                    try:
                        re.compile(pattern[1:-1])
                    except re.error as exc:
                        raise SettingsError(f"{key}.match.{keyword}: bad regular expression {pattern!r}: {exc}") from None
        if not all(isinstance(n, str) for n in self.forward_to):
            raise SettingsError(f"{key}.forward_to: expected names of [remote.NAME] nodes")
        if not 0 <= self.quiet_seconds <= 86400:
            raise SettingsError(f"{key}.quiet_seconds: must be between 0 and 86400")


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
    lease_seconds: float = setting(60.0, "Seconds a router's lease on a running job lasts; renewed every quarter of "
                                   "that while the job runs. When a node dies, another node's router takes its jobs "
                                   "over once their leases end (a restarted router takes its own back at once).")
    forward_retry_max_delay: float = setting(600.0, "Longest wait between two attempts to forward results, seconds.")
    rules: list = setting([], "Routing rules ([[router.rules]]), evaluated in order; every rule that matches "
                          "a series creates a job.", item=Rule)

    def validate(self) -> None:
        if not 1 <= self.workers <= 64:
            raise SettingsError(f"router.workers: {self.workers} is not in 1-64")
        check_port("router.dashboard_port", self.dashboard_port, allow_zero=True)
        if not 1 <= self.max_attempts <= 100:
            raise SettingsError(f"router.max_attempts: {self.max_attempts} is not in 1-100")
        if not 1 <= self.job_timeout <= 7 * 86400:
            raise SettingsError("router.job_timeout: must be between 1 second and 7 days")
        if not 1 <= self.lease_seconds <= 3600:
            raise SettingsError("router.lease_seconds: must be between 1 and 3600 seconds")
        if not 1 <= self.forward_retry_max_delay <= 86400:
            raise SettingsError("router.forward_retry_max_delay: must be between 1 and 86400 seconds")
        if self.scheduler and not re.match(r"^(tcp|tls|inproc|ucx)://", self.scheduler):
            raise SettingsError(f"router.scheduler: {self.scheduler!r} is not a Dask address (tcp://host:port)")
        for i, plugin in enumerate(self.plugins):
            if not isinstance(plugin, str) or not re.match(r"^[\w.]+:[\w.]+$", plugin):
                raise SettingsError(f"router.plugins[{i}]: expected \"module:attribute\", got {plugin!r}")
        names = [r.name for r in self.rules]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise SettingsError(f"router.rules: two rules are named {duplicate!r}")


class Settings(ArchiveSettings, Protocol):
    """What the router reads: the archive's settings, its own, and the nodes results go to."""
    router: RouterSection
    remote: dict[str, RemoteNode]
    deid: dict[str, DeidProfile]
    dicomweb: dict[str, DicomwebNode]
