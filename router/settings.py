"""The router's settings: [router] and its [[router.rules]]."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from archive.settings import Settings as ArchiveSettings
from archive.settings import SettingsError, check_port, setting
from scp.settings import RemoteNode

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

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
            raise SettingsError(f"{key}.name: required; letters, digits, '_' and '-'")
        if not self.plugin:
            raise SettingsError(f"{key}.plugin: required")
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
