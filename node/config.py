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


def setting(default: Any, help: str, *, path: bool = False, choices: tuple = ()) -> Any:
    meta = {"help": help, "path": path, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
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
    max_pdu_size: int = setting(1048576, "Maximum PDU length advertised to peers, bytes "
                                "(1 MiB doubles large-instance throughput).")
    tls_handshake_timeout: float = setting(10.0, "Seconds a TLS peer has to finish its handshake.")
    acse_timeout: float = setting(30.0, "Seconds to wait for association negotiation messages.")
    dimse_timeout: float = setting(60.0, "Seconds to wait for DIMSE messages.")
    network_timeout: float = setting(60.0, "Seconds an idle association is kept before it is aborted.")

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
        if not 4096 <= self.max_pdu_size <= 16 * 1048576:
            raise ConfigError(f"dicom.max_pdu_size: {self.max_pdu_size} is not in 4096-16777216")
        for name in ("tls_handshake_timeout", "acse_timeout", "dimse_timeout", "network_timeout"):
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


@dataclass(frozen=True)
class StorageSection:
    duplicates: str = setting("keep-first", "A SOP Instance UID received again with different bytes: "
                              "\"keep-first\" keeps the stored copy and answers Success, "
                              "\"replace\" stores the new one. Identical bytes are always a no-op.",
                              choices=("keep-first", "replace"))
    segment_size: int = setting(1048576, "Plaintext bytes per authenticated encryption segment "
                                "of a blob (memory used per instance being written or read).")

    def validate(self) -> None:
        if not 4096 <= self.segment_size <= 64 * 1048576:
            raise ConfigError(f"storage.segment_size: {self.segment_size} is not in 4096-67108864")


@dataclass(frozen=True)
class LogSection:
    level: str = setting("INFO", "Log level of the node.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass(frozen=True)
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    dicom: DicomSection = field(default_factory=DicomSection)
    client: ClientSection = field(default_factory=ClientSection)
    storage: StorageSection = field(default_factory=StorageSection)
    log: LogSection = field(default_factory=LogSection)

    @property
    def data_dir(self) -> Path:
        return self.node.data_dir


SECTIONS: dict[str, type] = {f.name: get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


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
    if kind is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a path string, got {value!r}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path
    if kind is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported setting type {kind!r}")  # pragma: no cover


def from_dict(data: dict, base: Path) -> Config:
    """Build a validated Config; relative paths are resolved against `base`."""
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown section [{sorted(unknown)[0]}] (known: {', '.join(SECTIONS)})")
    sections = {}
    for name, cls in SECTIONS.items():
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{name}: expected a table [{name}]")
        hints = get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        extra = set(raw) - set(fields)
        if extra:
            raise ConfigError(f"unknown setting {name}.{sorted(extra)[0]}")
        values = {}
        for key, f in fields.items():
            if key in raw:
                values[key] = _coerce(f"{name}.{key}", raw[key], hints[key], f, base)
            elif f.metadata.get("path"):
                values[key] = base / f.default
        section = cls(**values)
        if hasattr(section, "validate"):
            section.validate()
        sections[name] = section
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
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{name}.{f.name}", default, f.metadata["help"]))
    return rows
