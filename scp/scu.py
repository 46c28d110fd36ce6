"""C-ECHO and C-STORE as a client, for users without dcmtk (`m3dicom echo`, `m3dicom send`)."""
from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification

from .tls import no_delay

log = logging.getLogger(__name__)
_MAX_CONTEXTS = 128


class SendError(RuntimeError):
    """The peer could not be reached or refused the association."""


@dataclass(frozen=True)
class Peer:
    host: str
    port: int
    called_ae: str
    calling_ae: str
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None


@dataclass
class SendReport:
    sent: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _associate(ae: AE, peer: Peer):
    kwargs = {"ae_title": peer.called_ae, "evt_handlers": [(evt.EVT_CONN_OPEN, no_delay)]}
    if peer.tls is not None:
        kwargs["tls_args"] = (peer.tls, peer.server_hostname or peer.host)
    try:
        assoc = ae.associate(peer.host, peer.port, **kwargs)
    except (OSError, ssl.SSLError) as exc:
        raise SendError(f"cannot connect to {peer.host}:{peer.port}: {exc}") from None
    if not assoc.is_established:
        how = ("rejected (check the AE titles)" if assoc.is_rejected
               else _why_failed(peer.host, peer.port))
        raise SendError(f"cannot connect to {peer.called_ae}@{peer.host}:{peer.port}: association {how}")
    return assoc


def _why_failed(host: str, port: int) -> str:
    """pynetdicom reports a refused connection and a TLS failure alike: tell them apart."""
    try:
        socket.create_connection((host, port), timeout=3).close()
    except ConnectionRefusedError:
        return "failed: nothing listens on that port (connection refused)"
    except TimeoutError:
        return "failed: no answer from that address (a firewall?)"
    except OSError as exc:
        return f"failed: {exc.strerror or type(exc).__name__}"
    return "failed: the connection was closed (a TLS refusal? check the certificates, or a plain port)"


def echo(peer: Peer) -> int:
    """C-ECHO; returns the status (0x0000 is success)."""
    ae = AE(ae_title=peer.calling_ae)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, peer)
    try:
        status = assoc.send_c_echo()
        if not status:
            raise SendError("no C-ECHO response (timeout or abort)")
        return int(status.Status)
    finally:
        assoc.release()


def find_files(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            files.append(path)
    return files


def send(peer: Peer, paths: Iterable[Path], progress: Callable[[int], None] = lambda n: None) -> SendReport:
    """C-STORE every file in `paths` (see `find_files`); non-DICOM files are skipped and reported.

    Files are sent byte for byte as they are on disk (streamed, never decoded), in their
    own transfer syntax.
    """
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    report = SendReport()
    batches: list[list[tuple[Path, str, str]]] = [[]]
    contexts: list[set[tuple[str, str]]] = [set()]
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            sop_class, syntax = str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)
        except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
            report.skipped.append((path, f"not a DICOM file ({exc.__class__.__name__})"))
            progress(1)
            continue
        wanted = {(sop_class, syntax)}
        if len(contexts[-1] | wanted) > _MAX_CONTEXTS:
            batches.append([])
            contexts.append(set())
        batches[-1].append((path, sop_class, syntax))
        contexts[-1] |= wanted
    for batch, needed in zip(batches, contexts):
        if batch:
            _send_batch(peer, batch, needed, report, progress)
    return report


def _send_batch(peer: Peer, batch, needed, report: SendReport, progress) -> None:
    ae = AE(ae_title=peer.calling_ae)
    for sop_class, syntax in sorted(needed):
        ae.add_requested_context(sop_class, syntax)
    assoc = _associate(ae, peer)
    try:
        for path, _, _ in batch:
            try:
                status = assoc.send_c_store(path)
            except Exception as exc:  # a file that cannot be sent must not stop the rest
                report.failed.append((path, str(exc)))
                progress(1)
                if not assoc.is_established:
                    raise SendError(f"association lost while sending {path}") from None
                continue
            code = int(status.Status) if status else None
            if code is None:
                report.failed.append((path, "no response (timeout or abort)"))
            elif code in (0x0000, 0xB000, 0xB007, 0xB006):
                report.sent += 1
            else:
                comment = status.get("ErrorComment", "")
                report.failed.append((path, f"status 0x{code:04X} {comment}".strip()))
            progress(1)
    finally:
        if assoc.is_established:
            assoc.release()


def send_to_remote(remote, config, paths: Iterable[Path],
                   progress: Callable[[int], None] = lambda n: None) -> SendReport:
    """C-STORE files to a [remote.NAME] node (TLS and certificates as configured for it)."""
    from .tls import remote_tls

    tls = remote_tls(remote, config)
    peer = Peer(remote.host, remote.port, remote.ae_title, config.node.ae_title,
                tls[0] if tls else None, tls[1] if tls else None)
    return send(peer, paths, progress)
