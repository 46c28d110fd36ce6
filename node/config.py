"""The node's configuration: one frozen object, read from TOML, validated at start.

Each package declares its own settings (`archive/settings.py`, `scp/settings.py`,
`router/settings.py`, `viewer/settings.py`), each with its default, its type and a line of help;
this module puts them together under their TOML section names and checks what spans sections.
`docs/configuration.md` documents each of them; a test fails when one is missing there.
"""
from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from archive.settings import (AuditSection, CryptoSection, IndexSection, IngestSection, NodeSection, QuerySection,
                              S3Section, SettingsError, StorageSection, check_shared, setting)
from router.settings import MATCH_KEYS, DeidProfile, DicomwebNode, Rule, RouterSection
from scp.settings import ClientSection, CommitmentSection, DicomSection, RemoteNode
from viewer.settings import MetricsSection, ViewerSection, loopback

ConfigError = SettingsError          # a setting is unknown, has the wrong type or an invalid value

__all__ = ["AuditSection", "ClientSection", "CommitmentSection", "Config", "ConfigError", "CryptoSection",
           "DicomSection", "IndexSection", "IngestSection", "LogSection", "MATCH_KEYS", "MetricsSection", "NodeSection",
           "QuerySection", "RemoteNode", "RouterSection", "Rule", "S3Section", "StorageSection", "ViewerSection",
           "documented_settings", "from_dict", "load"]


@dataclass(frozen=True)
class LogSection:
    level: str = setting("INFO", "Log level of the node.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    format: str = setting("text", "\"text\": one line per record; \"json\": one JSON object per line.",
                          choices=("text", "json"))


@dataclass(frozen=True)
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    index: IndexSection = field(default_factory=IndexSection)
    dicom: DicomSection = field(default_factory=DicomSection)
    client: ClientSection = field(default_factory=ClientSection)
    storage: StorageSection = field(default_factory=StorageSection)
    crypto: CryptoSection = field(default_factory=CryptoSection)
    query: QuerySection = field(default_factory=QuerySection)
    commitment: CommitmentSection = field(default_factory=CommitmentSection)
    ingest: IngestSection = field(default_factory=IngestSection)
    router: RouterSection = field(default_factory=RouterSection)
    viewer: ViewerSection = field(default_factory=ViewerSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    audit: AuditSection = field(default_factory=AuditSection)
    log: LogSection = field(default_factory=LogSection)
    remote: dict = field(default_factory=dict)   # name -> RemoteNode
    deid: dict = field(default_factory=dict)     # name -> DeidProfile
    dicomweb: dict = field(default_factory=dict)  # name -> DicomwebNode

    def remote_by_ae(self, ae_title: str) -> RemoteNode | None:
        """The configured remote node with this AE title (C-MOVE destination, requester)."""
        return next((r for r in self.remote.values() if r.ae_title == ae_title), None)

    @property
    def data_dir(self) -> Path:
        return self.node.data_dir


SECTIONS: dict[str, type] = {f.name: get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)
                             if f.name not in ("remote", "deid", "dicomweb")}
# [remote.NAME], [deid.NAME], [dicomweb.NAME] tables
NAMED_SECTIONS: dict[str, type] = {"remote": RemoteNode, "deid": DeidProfile, "dicomweb": DicomwebNode}
KEYED_SECTIONS = (RemoteNode, Rule, DeidProfile, DicomwebNode)          # told their own key (remote.X, router.rules[i])
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
        titles = [r.ae_title for r in named.values() if kind == "remote"]
        duplicate = next((t for t in titles if titles.count(t) > 1), None)
        if duplicate:
            both = [n for n, r in named.items() if r.ae_title == duplicate]
            raise ConfigError(f"{kind}: AE title {duplicate!r} is used by two nodes ([{kind}.{both[0]}] and "
                              f"[{kind}.{both[1]}])")
        sections[kind] = named
    check_shared(sections["index"], sections["storage"])
    _check_metrics(sections["metrics"], sections["viewer"], sections["dicom"])
    for i, rule in enumerate(sections["router"].rules):
        unknown_remote = next((n for n in rule.forward_to if n not in sections["remote"]), None)
        if unknown_remote:
            raise ConfigError(f"router.rules[{i}].forward_to: no [remote.{unknown_remote}] node")
        if rule.deid and rule.deid not in sections["deid"]:
            raise ConfigError(f"router.rules[{i}].deid: no [deid.{rule.deid}] profile")
        unknown_remote = next((n for n in rule.deid_to if not n.startswith("s3://") and n not in sections["remote"]
                               and n not in sections["dicomweb"]), None)
        if unknown_remote:
            raise ConfigError(f"router.rules[{i}].deid_to: no [remote.{unknown_remote}] node or "
                              f"[dicomweb.{unknown_remote}] server")
    both = sorted(set(sections["remote"]) & set(sections["dicomweb"]))
    if both:
        raise ConfigError(f"[remote.{both[0]}] and [dicomweb.{both[0]}]: one name, two destinations")
    return Config(**sections)


def _check_metrics(metrics: MetricsSection, viewer: ViewerSection, dicom) -> None:
    """The operator's endpoints on a port of their own, and beyond loopback only with a token."""
    if not metrics.port:
        return
    taken = {"viewer.port": viewer.port if viewer.enabled else 0, "dicom.port": dicom.port,
             "dicom.plain_port": dicom.plain_port}
    clash = next((name for name, port in taken.items() if port == metrics.port), None)
    if clash:
        raise ConfigError(f"metrics.port: {metrics.port} is {clash} too; the operator's endpoints need a port of "
                          "their own")
    if metrics.token_file is None and not loopback(metrics.host):
        raise ConfigError(f"metrics.host: {metrics.host!r} is reachable from other machines: set metrics.token_file "
                          "(the token Prometheus sends), or listen on 127.0.0.1")


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
