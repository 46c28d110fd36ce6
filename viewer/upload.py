"""Uploads from the browser: DICOM files or zips, through the same ingest path as a C-STORE.

The request is streamed to a private spool in the data directory, part by part, and the
limits are enforced while it arrives (the whole request, each file, each zip member, a zip's
compression ratio, and the number of files: parts and zip members together,
`viewer.max_upload_files`): nothing is held whole in memory, and an upload over a limit is
refused at once with nothing stored, and audited once. Only then is each file ingested; each gets its own outcome
(stored, already there, refused and why), whatever is wrong with the others: a damaged file,
a zip member with a bad CRC, a data set that breaks the reader. Every refusal is audited: the
first AUDITED_REFUSALS of an upload one by one, the rest in one record.
"""
from __future__ import annotations

import json
import logging
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from archive import facts

from . import accounts
from .base import ARCHIVE, CONFIG, SESSION, SlowBody, paced, run, too_slow

log = logging.getLogger(__name__)
CHUNK = 1 << 20
MAX_RATIO = 200          # a zip member inflating more than this is refused (a zip bomb)
AUDITED_REFUSALS = 100   # refused files of one upload audited one by one; the rest in one record
DIRECTORY_ENTRY_BYTES = 512   # a zip's central directory may take this much per file it may hold (names
                              # included): zipfile reads the directory whole (about 0.5 KB of memory an entry)


class TooLarge(Exception):
    pass


class Damaged(Exception):
    """A zip member that cannot be read out of its zip (its reason says why)."""


def _refuse(status: int, why: str) -> web.HTTPException:
    return {413: web.HTTPRequestEntityTooLarge, 400: web.HTTPBadRequest}[status](
        **({"max_size": 0, "actual_size": 0} if status == 413 else {}),
        text=json.dumps({"error": why}), content_type="application/json")


async def handle(request: web.Request) -> web.Response:
    session = request[SESSION]
    if session.is_share:
        raise web.HTTPForbidden(text='{"error": "a share link opens one study, read-only"}',
                                content_type="application/json")
    viewer = request.app[CONFIG].viewer
    limit, file_limit, count_limit = viewer.max_upload_mb << 20, viewer.max_file_mb << 20, viewer.max_upload_files
    if request.content_length is not None and request.content_length > limit:
        await _audit(request, [("refused", None, f"{request.content_length} bytes announced")])
        raise _refuse(413, f"the upload is larger than {viewer.max_upload_mb} MB")
    if not request.content_type.startswith("multipart/"):
        await _audit(request, [("refused", None, f"not multipart ({request.content_type[:60]})")])
        raise _refuse(400, "send the files as multipart/form-data")
    spool = request.app[CONFIG].data_dir / "spool" / "uploads"
    spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=spool))
    try:
        received = await _receive(request, work, limit, file_limit, count_limit)
        if not received:
            await _audit(request, [("refused", None, "no files in the upload")])
            raise _refuse(400, "no files in the upload: choose DICOM files or a zip")
        files = await run(request, _unpack, received, work, file_limit, limit, count_limit)
        results = await run(request, _ingest, request.app[ARCHIVE], files, session.who)
    except TooLarge as exc:
        await _audit(request, [("refused", None, str(exc))])
        raise _refuse(413, str(exc)) from None
    except SlowBody as exc:
        await _audit(request, [("refused", None, str(exc))])
        raise too_slow(exc) from None
    except (ValueError, HttpProcessingError) as exc:   # not multipart as it claims (aiohttp's parser says why)
        await _audit(request, [("refused", None, f"not a readable multipart body: {type(exc).__name__}")])
        raise _refuse(400, "the upload is not a readable multipart/form-data body: send the files again") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stored = sum(r["outcome"] == "stored" for r in results)
    studies = await run(request, _studies, request.app[ARCHIVE].index, results)
    refusals = [("refused", r.get("study_uid"), f"{r['name']}: {r['reason']}") for r in results
                if r["outcome"] == "refused"]
    if len(refusals) > AUDITED_REFUSALS:
        refusals[AUDITED_REFUSALS:] = [("refused", None, f"{len(refusals) - AUDITED_REFUSALS} more files refused "
                                        "(the upload's answer lists each with its reason)")]
    await _audit(request, [*refusals, ("ok", studies[0]["study_uid"] if len(studies) == 1 else None,
                                       f"{stored} stored of {len(results)}")])
    return web.json_response({"files": results, "studies": studies})


def _studies(index, results: list[dict]) -> list[dict]:
    """The studies the upload touched, once each, with what they hold and what this upload did to
    them (files stored, already there, refused): those it stored into first, then in upload order."""
    touched: dict[str, dict[str, int]] = {}
    for r in results:
        if r.get("study_uid"):
            counts = touched.setdefault(r["study_uid"], {"stored": 0, "duplicate": 0, "refused": 0})
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    if not touched:
        return []
    found = facts.listed_studies(index, list(touched))
    order = sorted(touched, key=lambda uid: touched[uid]["stored"] == 0)       # stable: upload order otherwise
    return [{"study_uid": uid, "patient_name": found[uid]["PatientName"], "patient_id": found[uid]["PatientID"],
             "date": found[uid]["StudyDate"], "time": found[uid]["StudyTime"],
             "description": found[uid]["StudyDescription"], "modalities": found[uid]["ModalitiesInStudy"],
             "images": found[uid]["images"], **touched[uid]} for uid in order if uid in found]


async def _audit(request, records: list[tuple[str, str | None, str | None]]) -> None:
    """(outcome, study UID, detail) records of this upload, in one transaction."""
    index = request.app[ARCHIVE].index
    await run(request, lambda: accounts.audit_many(index, request[SESSION].who, "upload", records,
                                                   address=request.remote))


def _too_many(count_limit: int) -> TooLarge:
    return TooLarge(f"the upload holds more than {count_limit} files (viewer.max_upload_files): "
                    "send it in several parts")


async def _receive(request: web.Request, work: Path, limit: int, file_limit: int,
                   count_limit: int) -> list[tuple[str, Path]]:
    async with paced(request) as pace:
        return await _files(request, work, limit, file_limit, count_limit, pace)


async def _files(request: web.Request, work: Path, limit: int, file_limit: int, count_limit: int,
                 pace) -> list[tuple[str, Path]]:
    reader = await request.multipart()
    received, total = [], 0
    async for part in reader:
        if not isinstance(part, BodyPartReader) or part.filename is None:   # a nested multipart: not a file
            continue
        if len(received) >= count_limit:          # one more file: nothing more is read
            raise _too_many(count_limit)
        name = _name(part.filename)
        path = work / f"{len(received):05d}.part"
        size = 0
        with open(path, "wb") as out:
            while chunk := await part.read_chunk(CHUNK):
                pace.got(len(chunk))
                size += len(chunk)
                total += len(chunk)
                if size > file_limit:
                    raise TooLarge(f"{name} is larger than {file_limit >> 20} MB")
                if total > limit:
                    raise TooLarge(f"the upload is larger than {limit >> 20} MB")
                out.write(chunk)
        if not part.filename and size == 0:        # a file field left empty: what a browser sends for none
            path.unlink()
            continue
        received.append((name, path))
    return received


def _name(filename: str) -> str:
    """A file's name as the answer shows it: its last path part, printable, at most 200 characters."""
    name = Path(filename.replace("\\", "/")).name
    return "".join(c if c.isprintable() else "?" for c in name)[:200] or "file"


# One file of the upload: (its name, its path in the spool, or None with why it was refused already)
Entry = tuple[str, Path | None, str | None]


def _unpack(received: list[tuple[str, Path]], work: Path, file_limit: int, limit: int,
            count_limit: int) -> list[Entry]:
    """Zips opened (members checked before they are written), other files as they are. A zip
    that cannot be opened, or a member that cannot be read out of it, is refused by itself.
    Files are counted as they will be ingested: a zip as its members."""
    files: list[Entry] = []
    total = sum(p.stat().st_size for _, p in received)
    count = len(received)
    for name, path in received:
        try:
            is_zip = zipfile.is_zipfile(path)
        except Exception:                  # zipfile's own checks, on bytes made to confuse them
            is_zip = False
        if not is_zip:
            files.append((name, path, None))
            continue
        if _directory_size(path) > (count_limit - count + 1) * DIRECTORY_ENTRY_BYTES:
            raise TooLarge(f"{name}: its directory is too large for the {count_limit} files an upload may hold "
                           "(viewer.max_upload_files): send it in several parts")
        try:
            archive = zipfile.ZipFile(path)
        except Exception as exc:
            files.append((name, None, f"a damaged zip ({_why(exc)}): nothing in it was read"))
            continue
        with archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            count += len(members) - 1
            if count > count_limit:
                raise _too_many(count_limit)
            total = _check_zip(name, archive, file_limit, limit, total)
            for number, member in enumerate(members):
                member_name = f"{name}/{_printable(member.filename)}"[:300]
                target = work / f"zip-{path.stem}-{number:05d}.dcm"
                try:
                    _extract(archive, member, target, name, file_limit)
                except Damaged as exc:
                    target.unlink(missing_ok=True)
                    files.append((member_name, None, str(exc)))
                    continue
                files.append((member_name, target, None))
        path.unlink()
    return files


def _directory_size(path: Path) -> int:
    """The size of the zip's central directory, as its end record says (ZIP64 too), before zipfile
    reads it whole; 0 when there is no end record to read, or it claims more than the file holds
    (a damaged zip: zipfile then says what is wrong, and it is refused by itself)."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(max(0, size - (22 + 0xFFFF)))
        tail = fh.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            return 0
        entries, directory = struct.unpack_from("<HI", tail, at + 10)
        if (entries == 0xFFFF or directory == 0xFFFFFFFF) and at >= 20 and tail[at - 20:at - 16] == b"PK\x06\x07":
            (record,) = struct.unpack_from("<Q", tail, at - 12)          # the ZIP64 end record's offset
            if record + 56 <= size:
                fh.seek(record)
                head = fh.read(56)
                if head[:4] == b"PK\x06\x06":
                    (directory,) = struct.unpack_from("<Q", head, 40)
        return directory if directory <= size else 0


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


def _why(exc: Exception) -> str:
    return (str(exc) or type(exc).__name__)[:120]


def _check_zip(name: str, archive: zipfile.ZipFile, file_limit: int, limit: int, total: int) -> int:
    """The zip's members against the limits, by what its directory says (before anything is read)."""
    members = [m for m in archive.infolist() if not m.is_dir()]
    for member in members:
        label = _printable(member.filename)[:200]
        if member.file_size > file_limit:
            raise TooLarge(f"{name}: {label} is larger than {file_limit >> 20} MB")
        if member.compress_size and member.file_size / member.compress_size > MAX_RATIO:
            raise TooLarge(f"{name}: {label} inflates {member.file_size // member.compress_size} times: refused")
        total += member.file_size
        if total > limit:
            raise TooLarge(f"{name} unpacks to more than {limit >> 20} MB")
    return total


def _extract(archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, name: str, file_limit: int) -> None:
    """One member written to `target`, never past its declared size (TooLarge) nor the file limit.
    Damaged when zipfile cannot read it (bad CRC, unknown compression, encrypted, cut short, offsets
    outside the file); an error writing `target` is the node's own and is raised as it is."""
    def damaged(exc: Exception) -> Damaged:
        return Damaged(f"cannot be read out of the zip ({_why(exc)})")

    written = 0
    with open(target, "wb") as out:
        try:
            source = archive.open(member)
        except Exception as exc:
            raise damaged(exc) from None
        with source:
            while True:
                try:
                    chunk = source.read(CHUNK)
                except Exception as exc:
                    raise damaged(exc) from None
                if not chunk:
                    return
                written += len(chunk)
                if written > member.file_size or written > file_limit:
                    raise TooLarge(f"{name}: {_printable(member.filename)[:200]} is larger than it says")
                out.write(chunk)


def _ingest(archive, files: list[Entry], who: str) -> list[dict]:
    """Each file ingested by itself: whatever one of them raises is its own outcome, never the upload's."""
    from archive import Outcome

    results = []
    for number, (name, path, refused) in enumerate(files):
        if path is None:
            results.append({"name": name, "outcome": "refused", "reason": refused, "study_uid": None,
                            "sop_instance_uid": None})
            continue
        try:
            result = archive.ingest_file(path, calling_ae=f"upload:{who}"[:64])
        except RecursionError:
            reason = "not a readable DICOM file: its data set is nested too deeply"
            log.warning("upload: file %d of %d refused: nested too deeply", number + 1, len(files))
        except Exception as exc:           # the reader met bytes it did not expect: this file's outcome
            reason = f"not a readable DICOM file (its header is damaged or cut short: {type(exc).__name__})"
            log.warning("upload: file %d of %d refused: %s while reading it", number + 1, len(files),
                        type(exc).__name__)
        else:
            outcome = {Outcome.STORED: "stored", Outcome.REPLACED: "stored", Outcome.ALREADY_STORED: "duplicate",
                       Outcome.DUPLICATE_KEPT_FIRST: "duplicate"}.get(result.outcome, "refused")
            results.append({"name": name, "outcome": outcome, "reason": result.reason or result.outcome.value,
                            "study_uid": result.study_uid, "sop_instance_uid": result.sop_instance_uid})
            continue
        results.append({"name": name, "outcome": "refused", "reason": reason, "study_uid": None,
                        "sop_instance_uid": None})
    return results
