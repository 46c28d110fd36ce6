"""Uploads from the browser: DICOM files or zips, through the same ingest path as a C-STORE.

The request is streamed to a private spool in the data directory, part by part, and the
limits are enforced while it arrives (the whole request, each file, each zip member, and a
zip's compression ratio): nothing is held whole in memory, and an upload over a limit is
refused with nothing stored. Only then is each file ingested; each gets its own outcome
(stored, already there, refused and why).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path

from aiohttp import web

from . import accounts
from .app import ARCHIVE, CONFIG, SESSION, run

CHUNK = 1 << 20
MAX_RATIO = 200          # a zip member inflating more than this is refused (a zip bomb)
MAX_MEMBERS = 20000


class TooLarge(Exception):
    pass


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
    limit, file_limit = viewer.max_upload_mb << 20, viewer.max_file_mb << 20
    if request.content_length is not None and request.content_length > limit:
        await _audit(request, "refused", f"{request.content_length} bytes announced")
        raise _refuse(413, f"the upload is larger than {viewer.max_upload_mb} MB")
    if not request.content_type.startswith("multipart/"):
        raise _refuse(400, "send the files as multipart/form-data")
    spool = request.app[CONFIG].data_dir / "spool" / "uploads"
    spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=spool))
    try:
        received = await _receive(request, work, limit, file_limit)
        files = await run(request, _unpack, received, work, file_limit, limit)
        results = await run(request, _ingest, request.app[ARCHIVE], files, session.who)
    except TooLarge as exc:
        await _audit(request, "refused", str(exc))
        raise _refuse(413, str(exc)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stored = sum(r["outcome"] == "stored" for r in results)
    studies = sorted({r["study_uid"] for r in results if r.get("study_uid")})
    await _audit(request, "ok", f"{stored} stored of {len(results)}", studies[0] if len(studies) == 1 else None)
    return web.json_response({"files": results, "studies": studies})


async def _audit(request, outcome: str, detail: str, study_uid: str | None = None) -> None:
    index = request.app[ARCHIVE].index
    await run(request, lambda: accounts.audit(index, request[SESSION].who, "upload", outcome, study_uid=study_uid,
                                              detail=detail, address=request.remote))


async def _receive(request: web.Request, work: Path, limit: int, file_limit: int) -> list[tuple[str, Path]]:
    reader = await request.multipart()
    received, total = [], 0
    async for part in reader:
        if part.filename is None:
            continue
        name = Path(part.filename.replace("\\", "/")).name[:200] or "file"
        path = work / f"{len(received):05d}.part"
        size = 0
        with open(path, "wb") as out:
            while chunk := await part.read_chunk(CHUNK):
                size += len(chunk)
                total += len(chunk)
                if size > file_limit:
                    raise TooLarge(f"{name} is larger than {file_limit >> 20} MB")
                if total > limit:
                    raise TooLarge(f"the upload is larger than {limit >> 20} MB")
                out.write(chunk)
        received.append((name, path))
    if not received:
        raise web.HTTPBadRequest(text='{"error": "no files in the upload"}', content_type="application/json")
    return received


def _unpack(received: list[tuple[str, Path]], work: Path, file_limit: int, limit: int) -> list[tuple[str, Path]]:
    """Zips opened (members checked before they are written), other files as they are."""
    files, total = [], sum(p.stat().st_size for _, p in received)
    for name, path in received:
        if not zipfile.is_zipfile(path):
            files.append((name, path))
            continue
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if len(members) > MAX_MEMBERS:
                raise TooLarge(f"{name} holds more than {MAX_MEMBERS} files")
            for member in members:
                if member.file_size > file_limit:
                    raise TooLarge(f"{name}: {member.filename} is larger than {file_limit >> 20} MB")
                if member.compress_size and member.file_size / member.compress_size > MAX_RATIO:
                    raise TooLarge(f"{name}: {member.filename} inflates {member.file_size // member.compress_size}"
                                   " times: refused")
                total += member.file_size
                if total > limit:
                    raise TooLarge(f"{name} unpacks to more than {limit >> 20} MB")
            for number, member in enumerate(members):
                target = work / f"zip-{path.stem}-{number:05d}.dcm"
                written = 0
                with archive.open(member) as source, open(target, "wb") as out:
                    while chunk := source.read(CHUNK):
                        written += len(chunk)
                        if written > member.file_size or written > file_limit:
                            raise TooLarge(f"{name}: {member.filename} is larger than it says")
                        out.write(chunk)
                files.append((f"{name}/{member.filename}"[:300], target))
        path.unlink()
    return files


def _ingest(archive, files: list[tuple[str, Path]], who: str) -> list[dict]:
    from archive import Outcome

    results = []
    for name, path in files:
        result = archive.ingest_file(path, calling_ae=f"upload:{who}"[:64])
        outcome = {Outcome.STORED: "stored", Outcome.REPLACED: "stored", Outcome.ALREADY_STORED: "duplicate",
                   Outcome.DUPLICATE_KEPT_FIRST: "duplicate"}.get(result.outcome, "refused")
        results.append({"name": name, "outcome": outcome, "reason": result.reason or result.outcome.value,
                        "study_uid": result.study_uid, "sop_instance_uid": result.sop_instance_uid})
    return results
