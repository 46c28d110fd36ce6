"""Development PKI: a CA, a server certificate and client certificates for DICOM TLS.

For trying the node and for the tests; a hospital deployment uses its own PKI.
Private keys are written with mode 0600 and are never committed (see .gitignore).
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
_VALID_DAYS = 825


class PKIError(RuntimeError):
    """The development PKI cannot be written as asked."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "m3dicom development"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _issue(subject: str, ca_key, ca_cert, *, server_names: tuple[str, ...] = (),
           client: bool = False) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    # the node's certificate also authenticates it as a client (C-MOVE, results to a PACS)
    usage = ([ExtendedKeyUsageOID.CLIENT_AUTH] if client
             else [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=_VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                            content_commitment=False, data_encipherment=False,
                                            key_agreement=True, key_cert_sign=False, crl_sign=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if server_names:
        builder = builder.add_extension(_san(server_names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def init(directory: Path, server_names: tuple[str, ...] = (), force: bool = False) -> list[Path]:
    """Write ca.pem/ca.key, server.pem/server.key, client.pem/client.key into `directory`."""
    directory = Path(directory)
    names = ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")
    existing = [n for n in names if (directory / n).exists()]
    if existing and not force:
        raise PKIError(f"{directory / existing[0]} already exists; use --force to replace "
                       "the development certificates")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    ca_cert = (x509.CertificateBuilder()
               .subject_name(_name("m3dicom development CA")).issuer_name(_name("m3dicom development CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=3650))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, key_encipherment=False,
                                            content_commitment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=True, crl_sign=True,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA384()))
    _write_private(directory / "ca.key", ca_key)
    _write_cert(directory / "ca.pem", ca_cert)
    all_names = tuple(DEFAULT_SERVER_NAMES) + tuple(server_names)
    key, cert = _issue("m3dicom server", ca_key, ca_cert, server_names=all_names)
    _write_private(directory / "server.key", key)
    _write_cert(directory / "server.pem", cert)
    issue_client(directory, "client", force=True)
    return [directory / n for n in names]


def issue_client(directory: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Issue NAME.pem / NAME.key from the CA in `directory` for client authentication."""
    directory = Path(directory)
    if not name.replace("-", "").replace("_", "").isalnum() or len(name) > 64:
        raise PKIError(f"client name {name!r}: use letters, digits, '-' and '_' (at most 64)")
    if name in ("ca", "server"):
        raise PKIError(f"client name {name!r} is reserved")
    try:
        ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    except FileNotFoundError:
        raise PKIError(f"no development CA in {directory}; run `m3dicom certs init --dir {directory}` "
                       "first") from None
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    if not force and (cert_path.exists() or key_path.exists()):
        raise PKIError(f"{cert_path} already exists; use --force to replace it")
    key, cert = _issue(name, ca_key, ca_cert, client=True)
    _write_private(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path
