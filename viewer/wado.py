"""WADO-RS (PS3.18 10.4): instances, metadata, frames, bulk data, rendered images, under /dicomweb.

Every instance is read through the archive's read paths, authenticated and its SHA-256 checked
when it is read from the store (those read lately are kept in memory as verified then,
`viewer.instance_cache_mb`): instances up to INLINE bytes in memory (`Archive.verified`), a batch of
them per worker call, larger ones through a private file in the data directory (`Archive.exported`)
sent a MiB at a time. A study of any size goes out in bounded memory; the next batch is read while
this one is sent, within a process-wide number of batches (RETRIEVE_BATCHES).
Instances go out as stored when the client accepts `transfer-syntax=*`, else in Explicit VR Little
Endian (a compressed one decoded with pydicom first, into another private file; 406 when no decoder
can, or for Big Endian). Metadata is DICOM JSON without the pixel data and other large values,
which are `BulkDataURI`s of the bulkdata route; frames are uncompressed pixels, one part each;
/rendered and /thumbnail are the viewer's own renderer (images.py), with its cache and memory
budget. Answers carry an ETag (from the instances' indexed SHA-256s) and Last-Modified.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import math
import os
import secrets
import tempfile
import threading
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from email.utils import formatdate
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from aiohttp import web
from pydicom.dataelem import RawDataElement
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRLittleEndian, UID

from archive import changes, query as archive_query
from archive.crypto import IntegrityError
from archive.db import RoundFailures
from archive.dicomfile import check_pixels, undeflated
from archive.query import STUDY_ROOT, Query

from . import dicomjson
from .base import ARCHIVE, CONFIG, IMAGES, run
from .dicomweb import CALLER, INSTANCE, SERIES, STUDY, audit, base_url, checked_uid, error, json_answer, study_in_reach
from .images import IMAGE_LIMIT, NotAnImage
from .images import _Cache as Cache         # a byte-bounded LRU, shared with the images' caches
from .views import _unreadable, _with_pixels

EVLE = str(ExplicitVRLittleEndian)
BIG_ENDIAN = "1.2.840.10008.1.2.2"
CHUNK = 1 << 20
log = logging.getLogger(__name__)
SEQUENCE_INLINE = 512 << 10        # a top-level sequence larger than this is left out of metadata
BULK_BYTES = 1024                  # top-level binary values larger than this are bulk data URIs in metadata
PIXEL_TAGS = {0x7FE00008: "OF", 0x7FE00009: "OD", 0x7FE00010: None}
MAX_FRAMES = 1000                  # frames one request may name
METADATA_PARALLEL = 8              # instances read at once for a study's or series' metadata
METADATA_CACHE = 64 << 20          # bytes of instances' metadata kept (keyed by content: never stale)


METADATA = web.AppKey("dicomweb_metadata", Cache)    # instances' metadata by SHA-256
STORED = web.AppKey("dicomweb_stored", Cache)        # verified Part 10 files read lately (viewer.instance_cache_mb)
BASE = f"m3base-{secrets.token_hex(16)}"   # where the base URL goes in kept metadata: no value can name it
INLINE = 4 << 20                   # an instance up to this size is retrieved in memory (larger: a private file)
BATCH = 1 << 20                    # bytes of instances read by one worker call for a retrieve
RETRIEVE_SLOTS = web.AppKey("dicomweb_retrieve_slots", asyncio.Semaphore)
PREFETCH_QUIET = 10.0              # seconds a study receives nothing before its metadata is made ahead
PREFETCH_POLL = 2.0
PREFETCH_MAX = 2000                # instances of one study made ahead (of a larger one: its first)
PREFETCH_BACK = 1000               # changes before the viewer's start whose studies are made ahead
RETRIEVE_CALLERS = web.AppKey("dicomweb_retrieve_callers", Counter)
RETRIEVE_PER_CALLER = 4            # of those, for one caller (a token, a user, a share link): two retrieves' worth
RETRIEVE_WAIT = 30.0               # seconds a retrieve waits for its first batch's turn; then 503 (Retry-After)
SEND_PIECE = 256 << 10             # bytes written at a time: each must be taken within viewer.body_timeout
READ_AHEAD = 1                     # batches one retrieve reads at once (in worker threads)
RETRIEVE_BATCHES = 16              # batches in memory for all retrieves at once (at most ~80 MB)


# -- what the path names --------------------------------------------------------------------------

def _instances(index, study: str, series: str | None, instance: str | None) -> list[archive_query.Match]:
    """The stored instances the path names (all of a study or series), through the C-FIND engine."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series or ""
    ds.SOPInstanceUID = instance or ""
    query, found, after = Query(STUDY_ROOT, ds), [], 0
    while page := archive_query.instances(index, query, after, 1000):
        found += page
        after = page[-1].pk
    return found


async def _named(request: web.Request) -> tuple[str, list[archive_query.Match]]:
    """(study UID, its instances the path names); 400 for a bad UID, 404 for nothing there."""
    study = study_in_reach(request)
    series, instance = checked_uid(request, "series"), checked_uid(request, "instance")
    found = await run(request, _instances, request.app[ARCHIVE].index, study, series, instance)
    if not found:
        raise error(web.HTTPNotFound, f"no such {'instance' if instance else 'series' if series else 'study'}")
    return study, found


def _validators(request: web.Request, found: list, variant: str) -> dict[str, str]:
    """ETag (what is sent: the instances' contents and this representation) and Last-Modified; 304
    when the client's If-None-Match names it."""
    digest = hashlib.sha256(variant.encode())
    for match in found:
        digest.update(f"{match.sop_instance_uid}:{match.sha256};".encode())
    etag = f'"{digest.hexdigest()[:40]}"'
    headers = {"ETag": etag, "Last-Modified": formatdate(max(m.received_at or 0 for m in found), usegmt=True),
               "Cache-Control": "private, no-cache", "Vary": "Accept, Accept-Encoding"}
    if etag in [t.strip() for t in request.headers.get("If-None-Match", "").split(",")]:
        raise web.HTTPNotModified(headers=headers)
    return headers


def _media(accept: str) -> list[tuple[str, dict[str, str]]]:
    """The Accept header's media ranges with their parameters, in order."""
    out = []
    for media_range in accept.split(","):
        media, *params = [p.strip() for p in media_range.split(";")]
        if media:
            out.append((media.lower(), {k.strip().lower(): v.strip().strip('"') for k, _, v in
                                        (p.partition("=") for p in params)}))
    return out


def _wanted_syntax(request: web.Request) -> str | None:
    """EVLE, or None for each instance's stored syntax (`transfer-syntax=*`); 406 for anything else."""
    ranges = _media(request.headers.get("Accept", ""))
    if not ranges:
        return EVLE
    for media, params in ranges:
        if media in ("*/*", "multipart/*"):
            return EVLE
        if (media == "multipart/related" and params.get("type", "application/dicom").lower() == "application/dicom") \
                or media == "application/dicom":
            syntax = params.get("transfer-syntax")
            if syntax == "*":
                return None
            if syntax in (None, EVLE):
                return EVLE
    raise error(web.HTTPNotAcceptable, 'this node sends multipart/related; type="application/dicom" in Explicit VR '
                "Little Endian (transfer-syntax=1.2.840.10008.1.2.1), or as stored (transfer-syntax=*)")


def _transcodable(syntax: str) -> bool:
    if syntax == BIG_ENDIAN:
        return False
    uid = UID(syntax)
    if not uid.is_compressed:
        return True
    from pydicom.pixels.decoders.base import get_decoder

    try:
        return get_decoder(uid).is_available
    except Exception:
        return False


def _explicit_little(archive, path: Path, stack: ExitStack) -> Path:
    """The instance at `path` in Explicit VR Little Endian, in a private file of the data directory."""
    fd, name = tempfile.mkstemp(suffix=".dcm", dir=archive.exports)
    os.close(fd)
    target = Path(name)
    stack.callback(target.unlink, missing_ok=True)
    with undeflated(path, archive.limits) as plain:
        ds = pydicom.dcmread(plain)
        if "PixelData" in ds:
            check_pixels(ds, archive.limits.max_pixel_bytes)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        else:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(target, enforce_file_format=True)
    return target


# -- instances ------------------------------------------------------------------------------------

class _Batch:
    """Instances ready to send, framed as multipart parts by the worker that read them: small ones in memory
    as pieces of about SEND_PIECE bytes (several parts in one, so that the event loop writes a few large
    pieces instead of three small writes an instance; one of SEND_PIECE / 4 or more is a piece of its own,
    not copied), or one large (or transcoded) one in a private file with its part header and trailer apart."""

    def __init__(self):
        self.pieces: list[bytes] = []                       # framed parts in memory, ready to write
        self.file: tuple[bytes, Path, bytes] | None = None  # (part header, the Part 10 file, trailer)
        self.size = 0                                       # bytes of instances (not of framing)
        self.count = 0                                      # instances
        self.stack = ExitStack()                            # removes the file


def _plan(found: list, syntax: str | None) -> list[tuple[int, int]]:
    """The batches (start, end) a retrieve reads, by the sizes the index holds: consecutive instances up to
    BATCH bytes; one larger than INLINE, or transcoded, alone (it goes through a private file)."""
    plan, start, size = [], 0, 0
    for number, match in enumerate(found):
        if match.size > INLINE or (syntax is not None and match.transfer_syntax != syntax):
            plan += [(start, number)] * (number > start) + [(number, number + 1)]
            start, size = number + 1, 0
            continue
        size += match.size
        if size >= BATCH:
            plan.append((start, number + 1))
            start, size = number + 1, 0
    return plan + [(start, len(found))] * (len(found) > start)


def _batch(archive, found: list, start: int, end: int, syntax: str | None, header,
           kept: Cache | None) -> tuple[_Batch, int]:
    """The instances `found[start:end]`, read, verified and framed (`header(size, syntax)` gives a part's
    header); and the index after the last one read (`end`, or short of it).

    A failure on the batch's first instance is raised; on a later one the batch ends before it
    (a batch made from there raises it). A file goes alone."""
    batch, pending, waiting = _Batch(), [], 0

    def flush() -> None:
        nonlocal pending, waiting
        if pending:
            batch.pieces.append(b"".join(pending))
            pending, waiting = [], 0

    try:
        for number in range(start, end):
            match = found[number]
            try:
                transcode = syntax is not None and match.transfer_syntax != syntax
                data = None if transcode else archive.verified(match.blob_id, match.sha256, INLINE, kept)
                if data is not None:
                    _sized(match, len(data))
                    pending.append(header(len(data), match.transfer_syntax))
                    if len(data) >= SEND_PIECE // 4:    # large enough to be written alone: not copied
                        flush()
                        batch.pieces.append(data)
                    else:
                        pending.append(data)
                        waiting += len(data)
                    pending.append(b"\r\n")
                    batch.size += len(data)
                    batch.count += 1
                    if waiting >= SEND_PIECE:
                        flush()
                    continue
                if batch.count:                 # a file goes alone
                    return batch, number
                path = batch.stack.enter_context(archive.exported(match.blob_id, match.sha256))
                if transcode:
                    path = _explicit_little(archive, path, batch.stack)
                size = path.stat().st_size
                if not transcode:
                    _sized(match, size)
                batch.file = (header(size, syntax if transcode else match.transfer_syntax), path, b"\r\n")
                batch.size += size
                batch.count += 1
                return batch, number + 1
            except Exception:
                if batch.count:
                    return batch, number
                raise
        return batch, end
    except BaseException:
        batch.stack.close()
        raise
    finally:
        flush()


def _sized(match: archive_query.Match, size: int) -> None:
    """The answer's Content-Length was counted from the index: an instance of another size cannot be sent."""
    if size != match.size:
        raise IntegrityError(f"blob {match.blob_id}: {size} bytes, the index says {match.size}")


class _Slots:
    """The batches in memory one retrieve holds: within the process's RETRIEVE_BATCHES, and its caller's
    RETRIEVE_PER_CALLER (a few stalled readers of one token or share link cannot take them all)."""

    def __init__(self, app: web.Application, who: str):
        self.total, self.callers, self.who, self.held = app[RETRIEVE_SLOTS], app[RETRIEVE_CALLERS], who, 0

    def free(self) -> bool:
        return not self.total.locked() and self.callers[self.who] < RETRIEVE_PER_CALLER

    async def take(self) -> None:
        """One more, waited for (only while none is held: no deadlock), at most RETRIEVE_WAIT seconds."""
        async with asyncio.timeout(RETRIEVE_WAIT):
            while self.callers[self.who] >= RETRIEVE_PER_CALLER:
                await asyncio.sleep(0.05)
            await self.total.acquire()
        self._count(1)

    async def take_now(self) -> bool:
        """One more if one is free now (acquire() does not wait then)."""
        if not self.free():
            return False
        await self.total.acquire()
        self._count(1)
        return True

    def give(self, count: int = 1) -> None:
        for _ in range(count):
            self.total.release()
        self._count(-count)

    def _count(self, change: int) -> None:
        self.held += change
        self.callers[self.who] += change
        if self.callers[self.who] <= 0:
            del self.callers[self.who]


async def retrieve(request: web.Request) -> web.StreamResponse:
    """The instances as multipart/related, streamed: read and verified a batch at a time (small instances
    in memory, a large one through a private file), the next batch made while this one is sent. The
    batches in memory are bounded for the whole process and per caller (_Slots); a client that reads
    nothing of a piece for viewer.body_timeout seconds is cut off; an instance found damaged once the
    answer has begun ends it (the connection is closed: no second status line inside the body)."""
    syntax = _wanted_syntax(request)
    study, found = await _named(request)
    if syntax is not None and (bad := {m.transfer_syntax for m in found if m.transfer_syntax != EVLE
                                       and not _transcodable(m.transfer_syntax)}):
        raise error(web.HTTPNotAcceptable, f"instances stored in {', '.join(sorted(bad))} cannot be sent in Explicit "
                    "VR Little Endian here: ask for them as stored (transfer-syntax=*)")
    headers = _validators(request, found, f"dicom:{syntax}")
    archive, kept, boundary = request.app[ARCHIVE], request.app[STORED], secrets.token_hex(16)
    slots, patience = _Slots(request.app, request[CALLER].who), request.app[CONFIG].viewer.body_timeout
    response = web.StreamResponse(headers={
        **headers, "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    loop = asyncio.get_running_loop()

    def part_header(size: int, syntax_sent: str) -> bytes:
        return (f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={syntax_sent}\r\n"
                f"Content-Length: {size}\r\n\r\n").encode()

    closing = f"--{boundary}--\r\n".encode()
    if syntax is None or all(m.transfer_syntax == syntax for m in found):     # sent as stored: sizes known
        response.content_length = sum(len(part_header(m.size, m.transfer_syntax)) + m.size + 2
                                      for m in found) + len(closing)

    def make(start: int, end: int, first: bool = False) -> None:
        """Read the batch `found[start:end]` in a worker (up to READ_AHEAD of them at once, sent in order)."""
        future = loop.run_in_executor(None, _batch, archive, found, start, end, syntax, part_header, kept)
        (reading.appendleft if first else reading.append)((start, end, future))

    async def send(data: bytes | memoryview) -> None:
        """A piece at a time, each taken by the client within `patience` seconds."""
        for start in range(0, len(data), SEND_PIECE):
            async with asyncio.timeout(patience):
                await response.write(data[start:start + SEND_PIECE])

    if request.method == "HEAD":                # the headers alone: nothing read, no body (a body here would be
        await response.prepare(request)         # taken for the next answer on a kept-alive connection)
        await response.write_eof()
        return response
    try:
        await slots.take()
    except TimeoutError:
        raise error(web.HTTPServiceUnavailable, "the node is sending as much as it may: try again in a moment",
                    **{"Retry-After": "5"}) from None
    plan, reading = deque(_plan(found, syntax)), deque()
    sent, written, whole, outcome = 0, 0, False, "ok"
    make(*plan.popleft())
    try:
        while plan and len(reading) < READ_AHEAD and await slots.take_now():
            make(*plan.popleft())
        while reading:
            start, end, upcoming = reading[0]
            try:
                batch, following = await upcoming
            except Exception as exc:
                if not response.prepared:
                    raise _unreadable(found[0].sop_instance_uid, exc) from None
                match = found[start]                    # the answer has begun: it ends here, short
                log.error("WADO of study %s: SOP Instance %s (blob %s) cannot be read: %s; the answer is cut "
                          "short after %d bytes", study, match.sop_instance_uid, match.blob_id, exc, written)
                outcome = "failed"
                request.transport and request.transport.abort()
                return response
            reading.popleft()
            short = following < end
            with batch.stack:
                if short:                               # the rest of it next, with this batch's slot (it raises,
                    make(following, end, first=True)    # or is a file)
                while plan and len(reading) < READ_AHEAD and await slots.take_now():     # made meanwhile
                    make(*plan.popleft())
                if not response.prepared:
                    await response.prepare(request)
                while batch.pieces:
                    piece = batch.pieces.pop(0)
                    with memoryview(piece) as view:
                        await send(view)
                    written += len(piece)
                if batch.file:
                    header, path, trailer = batch.file
                    await send(header)
                    with open(path, "rb") as fh:
                        while chunk := await run(request, fh.read, CHUNK):
                            await send(chunk)
                            written += len(chunk)
                    await send(trailer)
                sent += batch.size
            del batch
            if not short:
                slots.give()
            if not reading and plan:
                await slots.take()
                make(*plan.popleft())
        await send(closing)
        await response.write_eof()
        whole = True
    except ConnectionError:                     # the client went away: what it took is audited below
        log.info("WADO of study %s: the client went away after %d bytes", study, written)
    except TimeoutError:
        log.warning("WADO of study %s: the client read nothing for %.0f s (viewer.body_timeout): cut off after %d "
                    "bytes", study, patience, written)
        request.transport and request.transport.abort()
    finally:
        for _, _, upcoming in reading:          # the answer ended early: the batches read ahead are dropped once made
            upcoming.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result()[0].stack.close())
        slots.give(slots.held)
        if written or whole:                    # every byte that left is audited, a retrieve broken off too
            await audit(request, f"WADO {len(found)} instances, {written if not whole else sent} bytes"
                        + ("" if whole else " (broken off)"), study, outcome)
    return response


# -- metadata -------------------------------------------------------------------------------------

def _opened(plain: Path | io.BytesIO) -> BinaryIO:
    """What `Archive.readable` gave, to read from its start (a file in memory stays open)."""
    if isinstance(plain, Path):
        return open(plain, "rb")
    plain.seek(0)
    return nullcontext(plain)


def _rewound(plain: Path | io.BytesIO) -> Path | io.BytesIO:
    if not isinstance(plain, Path):
        plain.seek(0)
    return plain


def _read_header(plain: Path | io.BytesIO) -> tuple[Dataset, dict[int, str]]:
    """The data set without its large values, and those values' (tag: VR): they become bulk data URIs."""
    with _opened(plain) as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=True, defer_size=BULK_BYTES)
        head = fh.read(8)                     # pydicom stopped at the pixel data's tag, if there is one
    little = ds.file_meta.TransferSyntaxUID.is_little_endian
    bulk: dict[int, str] = {}
    if len(head) >= 4:
        tag = int.from_bytes(head[0:2], "little" if little else "big") << 16 | \
            int.from_bytes(head[2:4], "little" if little else "big")
        if tag in PIXEL_TAGS:
            compressed = ds.file_meta.TransferSyntaxUID.is_compressed
            bulk[tag] = PIXEL_TAGS[tag] or ("OB" if compressed or int(ds.get("BitsAllocated", 16) or 16) <= 8
                                            else "OW")
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        vr = raw.VR if isinstance(raw, RawDataElement) else ds[tag].VR
        vr = vr or dictionary_VR(tag).split(" ")[0]
        if isinstance(raw, RawDataElement) and vr == "SQ" and (
                raw.length if raw.value is None else len(raw.value)) > SEQUENCE_INLINE:
            del ds[tag]               # a sequence is never bulk data (PS3.18 F.2.7); one this large is left out:
            continue                  # its items, read, take ~120 times its bytes (a 4 MB one: 480 MB)
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length:    # deferred: large
            if vr == "SQ":            # an SR's content tree: read now, in place (OHIF found no ContentSequence
                ds[tag]               # in a large SR)
                continue
            bulk[int(tag)] = vr
            del ds[tag]
    return ds, bulk


def _metadata(archive, match: archive_query.Match, cache: Cache, kept: Cache | None = None) -> bytes:
    """The instance's metadata as DICOM JSON, encoded, its bulk data URIs starting with BASE (kept so, by
    content: a series' answer joins them, and `_based` puts the base URL of the request in). `kept`: the
    stored instances read lately (a client that asks for metadata asks for the frames next); none when
    made ahead."""
    found = cache.get(match.sha256)
    if found is not None:
        return found
    with archive.readable(match.blob_id, match.sha256, INLINE, kept) as plain:
        ds, bulk = _read_header(plain)
    out = dicomjson.to_json_dict(ds)
    url = (f"{BASE}/studies/{ds.get('StudyInstanceUID', '')}/series/{ds.get('SeriesInstanceUID', '')}"
           f"/instances/{match.sop_instance_uid}")
    for tag, vr in bulk.items():
        out[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": f"{url}/bulkdata/{tag:08X}"}
    encoded = json.dumps(dict(sorted(out.items())), allow_nan=False).encode()
    cache.put(match.sha256, encoded, 256 + len(encoded))
    return encoded


def _based(encoded: bytes, base: str) -> bytes:
    """The metadata with the base URL of this request's answers (viewer.public_url, or its Host)."""
    return encoded.replace(BASE.encode(), json.dumps(base)[1:-1].encode())


async def metadata(request: web.Request) -> web.Response:
    study, found = await _named(request)
    headers = _validators(request, found, "metadata")
    archive, cache, kept = request.app[ARCHIVE], request.app[METADATA], request.app[STORED]
    out = [cache.get(match.sha256) for match in found]      # known ones without a thread each
    missing = [n for n, item in enumerate(out) if item is None]
    try:
        for start in range(0, len(missing), METADATA_PARALLEL):
            numbers = missing[start:start + METADATA_PARALLEL]
            read = await asyncio.gather(*(run(request, _metadata, archive, found[n], cache, kept) for n in numbers))
            for n, item in zip(numbers, read):
                out[n] = item
    except Exception as exc:
        raise _unreadable(found[0].sop_instance_uid if len(found) == 1 else study, exc) from None
    await audit(request, f"WADO metadata of {len(found)} instances", study)
    return json_answer(request, _based(b"[" + b",".join(out) + b"]", base_url(request)), **headers)


class Prefetch:
    """The metadata of a study that has just received instances, made ahead (OHIF asks for a series'
    metadata before it draws anything): once the study has received nothing for PREFETCH_QUIET seconds,
    one thread of low priority reads its instances (at most PREFETCH_MAX) into the metadata cache, never
    filling more than three quarters of it (what viewers asked for is not pushed out); at the viewer's start,
    the studies of the last PREFETCH_BACK changes. `viewer.prefetch`."""

    def __init__(self, archive, cache: Cache):
        self.archive, self.cache = archive, cache
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="metadata-prefetch")
        self._failed = RoundFailures(log, "making studies' metadata ahead")
        self._niced = False

    async def run(self) -> None:
        loop, index = asyncio.get_running_loop(), self.archive.index
        # from the studies of the last PREFETCH_BACK changes: those that came while the viewer started, and
        # after a restart the latest ones
        last, pending = max(0, await loop.run_in_executor(self.pool, changes.latest, index) - PREFETCH_BACK), {}
        try:
            while True:
                await asyncio.sleep(PREFETCH_POLL)
                try:
                    upto = await loop.run_in_executor(self.pool, changes.latest, index)
                    stored = await loop.run_in_executor(self.pool, index.studies_stored, last, upto, 500)
                    last = stored[-1][0] if len(stored) == 500 else upto
                    pending.update((uid, loop.time()) for _, uid in stored)
                    for uid in [uid for uid, at in pending.items() if loop.time() - at >= PREFETCH_QUIET]:
                        del pending[uid]
                        await loop.run_in_executor(self.pool, self.warm, uid)
                except Exception as exc:
                    self._failed(exc)
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def warm(self, study: str) -> int:
        """Make the study's metadata (in this thread); how many instances' were made."""
        if not self._niced:
            self._niced = True
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)     # Linux: this thread only
            except OSError:
                pass
        made = 0
        for match in _instances(self.archive.index, study, None, None)[:PREFETCH_MAX]:
            if self.cache.size > self.cache.limit * 3 // 4:
                break
            try:
                if self.cache.get(match.sha256) is None:
                    _metadata(self.archive, match, self.cache)
                    made += 1
            except Exception as exc:                # its reader will be told; here it is only not made ahead
                log.debug("metadata of %s not made ahead: %s", match.sop_instance_uid, type(exc).__name__)
        log.debug("metadata of study %s made ahead: %d instances", study, made)
        return made


async def prefetching(app: web.Application):
    task = None
    if app[CONFIG].viewer.prefetch:
        task = asyncio.create_task(Prefetch(app[ARCHIVE], app[METADATA]).run())
    yield
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# -- frames and bulk data --------------------------------------------------------------------------

def _frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(n) for n in text.split(",")]
    except ValueError:
        raise error(web.HTTPBadRequest, "frames: a comma-separated list of frame numbers (from 1)") from None
    if not numbers or len(numbers) > MAX_FRAMES or min(numbers) < 1:
        raise error(web.HTTPBadRequest, f"frames: 1 to {MAX_FRAMES} frame numbers, each at least 1")
    if len(set(numbers)) != len(numbers):     # 1,1,1,... x1000 made one small instance a 0.5 GB answer in memory
        raise error(web.HTTPBadRequest, "frames: each frame at most once")
    return numbers


class _NoSuchFrame(LookupError):
    pass


class _Unsupported(ValueError):
    pass


FRAME_TAGS = ["NumberOfFrames", "BitsAllocated", "SamplesPerPixel", "Rows", "Columns", "PlanarConfiguration",
              "PixelData", "FloatPixelData", "DoubleFloatPixelData"]   # what `_frames` reads of a data set


def _frames(archive, match: archive_query.Match, numbers: list[int] | None, kept: Cache | None = None) -> list[bytes]:
    """The frames' pixels, uncompressed, little endian (None: all of them); a native frame is read
    from its place in the file, a compressed one decoded by itself."""
    with archive.readable(match.blob_id, match.sha256, INLINE, kept) as plain:
        ds = pydicom.dcmread(plain, defer_size=BULK_BYTES, specific_tags=FRAME_TAGS)
        if "PixelData" not in ds:
            raise NotAnImage("this instance has no pixel data")
        check_pixels(ds, archive.limits.max_pixel_bytes)
        count = int(ds.get("NumberOfFrames", 1) or 1)
        numbers = list(range(1, count + 1)) if numbers is None else numbers
        if max(numbers) > count:
            raise _NoSuchFrame(f"this instance has {count} frame(s)")
        syntax = ds.file_meta.TransferSyntaxUID
        if syntax.is_compressed:
            return [np.ascontiguousarray(pixel_array(_rewound(plain), index=n - 1)).tobytes() for n in numbers]
        bits = int(ds.BitsAllocated)
        if bits % 8:
            raise _Unsupported(f"frames of {bits}-bit pixels are not sent; retrieve the instance")
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        shape = (samples, int(ds.Rows), int(ds.Columns))
        planar = samples > 1 and int(ds.get("PlanarConfiguration", 0) or 0) == 1
        size = shape[0] * shape[1] * shape[2] * bits // 8
        raw = ds.get_item(0x7FE00010, keep_deferred=True)
        out = []
        with _opened(plain) as fh:
            for n in numbers:
                if raw.value is not None:          # small enough to be read with the header
                    frame = bytes(raw.value[(n - 1) * size:n * size])
                else:
                    fh.seek(raw.value_tell + (n - 1) * size)
                    frame = fh.read(size)
                if not syntax.is_little_endian and bits > 8:
                    frame = np.frombuffer(frame, f">u{bits // 8}").astype(f"<u{bits // 8}").tobytes()
                if planar:                         # colour planes one after the other: interleaved, as pydicom gives
                    frame = np.frombuffer(frame, f"<u{bits // 8}").reshape(shape).transpose(1, 2, 0).tobytes()
                out.append(frame)
        return out


def _bulk(archive, match: archive_query.Match, tag: int, kept: Cache | None = None) -> bytes:
    """A top-level element's value (not the pixel data: `_frames`)."""
    with archive.readable(match.blob_id, match.sha256, INLINE, kept) as plain:
        ds = pydicom.dcmread(plain, stop_before_pixels=True)
        if tag not in ds:
            raise _NoSuchFrame("no such bulk data")
        value = ds[tag].value
        return value if isinstance(value, bytes) else str(value).encode()


def _octet_parts(request: web.Request, parts: list[bytes], headers: dict, syntax: str = EVLE) -> web.Response:
    boundary = secrets.token_hex(16)
    body = bytearray()
    for part in parts:
        body += (f"--{boundary}\r\nContent-Type: application/octet-stream; transfer-syntax={syntax}\r\n"
                 f"Content-Length: {len(part)}\r\n\r\n").encode() + part + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return web.Response(body=body, headers={                  # (no copy of it: frames can be large)
        **headers, "Content-Type": f'multipart/related; type="application/octet-stream"; boundary={boundary}'})


def _octets_accepted(request: web.Request) -> bool:
    """Whether the client takes frames as stored (`transfer-syntax=*`); 406 if it takes no octet stream."""
    ranges = _media(request.headers.get("Accept", ""))
    as_stored = any(m == "multipart/related" and p.get("type", "application/octet-stream").lower()
                    == "application/octet-stream" and p.get("transfer-syntax") == "*" for m, p in ranges)
    if ranges and not any(m in ("*/*", "multipart/*", "application/octet-stream") or
                          (m == "multipart/related" and p.get("type", "application/octet-stream").lower()
                           in ("application/octet-stream", "*/*")) for m, p in ranges):
        raise error(web.HTTPNotAcceptable, 'frames and bulk data are sent as multipart/related; '
                    'type="application/octet-stream" (uncompressed, or as stored with transfer-syntax=*)')
    return as_stored


async def frames(request: web.Request) -> web.Response:
    as_stored = _octets_accepted(request)
    numbers = _frame_numbers(request.match_info["frames"])
    study, found = await _named(request)
    syntax = UID(found[0].transfer_syntax)
    if as_stored and syntax.is_compressed:              # the stored codestreams, decoded by the client
        headers = _validators(request, found, f"frames:{numbers}:{syntax}")
        try:
            parts = await run(request, _stored_frames, request.app[ARCHIVE], found[0], numbers, request.app[STORED])
        except _NoSuchFrame as exc:
            raise error(web.HTTPNotFound, str(exc)) from None
        except Exception as exc:
            raise _unreadable(found[0].sop_instance_uid, exc) from None
        await audit(request, f"WADO frames of {found[0].sop_instance_uid} as stored: {sum(map(len, parts))} bytes",
                    study)
        return _octet_parts(request, parts, headers, str(syntax))
    headers = _validators(request, found, f"frames:{numbers}")
    return await _send_octets(request, study, found[0], headers, numbers)


def _stored_frames(archive, match: archive_query.Match, numbers: list[int], kept: Cache | None = None) -> list[bytes]:
    """Compressed frames as stored (each frame's codestream), read within the archive's limits."""
    from pydicom.encaps import get_frame

    with archive.readable(match.blob_id, match.sha256, INLINE, kept) as plain:
        ds = pydicom.dcmread(plain)
        count = int(ds.get("NumberOfFrames", 1) or 1)
        if max(numbers) > count:
            raise _NoSuchFrame(f"this instance has {count} frame(s)")
        return [get_frame(ds.PixelData, n - 1, number_of_frames=count) for n in numbers]


async def bulkdata(request: web.Request) -> web.Response:
    _octets_accepted(request)
    text = request.match_info["tag"]
    if len(text) != 8 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise error(web.HTTPBadRequest, "bulk data: a tag as 8 hex digits")
    tag = int(text, 16)
    study, found = await _named(request)
    headers = _validators(request, found, f"bulk:{tag}")
    return await _send_octets(request, study, found[0], headers, None, None if tag in PIXEL_TAGS else tag)


async def _decoded_frames(request: web.Request, match, numbers: list[int] | None) -> list[bytes] | None:
    """The frames from the viewer's decoded images (images.py: decoded once, kept, within its memory budget),
    when those are the stored pixels (not colour of more than 8 bits, which the viewer keeps as 8); None:
    read them from the file instead."""
    uid, images = match.sop_instance_uid, request.app[IMAGES]

    def work(decoded) -> list[bytes] | None:
        pixels = decoded.pixels
        if pixels.nbytes != images.header(uid).pixel_bytes:
            return None
        wanted = numbers or list(range(1, pixels.shape[0] + 1))
        if max(wanted) > pixels.shape[0]:
            raise _NoSuchFrame(f"this instance has {pixels.shape[0]} frame(s)")
        return [np.ascontiguousarray(pixels[n - 1]).tobytes() for n in wanted]

    try:
        return await _with_pixels(request, uid, work)
    except NotAnImage:                        # not shown by the viewer (too large for it, say): from the file
        return None


async def _send_octets(request: web.Request, study: str, match, headers: dict, numbers: list[int] | None,
                       tag: int | None = None) -> web.Response:
    """Frames (`numbers`; None: all, as the pixel data's bulk data) or the value of the bulk data `tag`."""
    archive = request.app[ARCHIVE]
    try:
        # compressed pixels: the viewer's decoded image (decoded once, kept); native ones are read from their place
        compressed = UID(match.transfer_syntax).is_compressed
        parts = await _decoded_frames(request, match, numbers) if tag is None and compressed else None
        if parts is None:
            kept = request.app[STORED]
            parts = await run(request, _frames, archive, match, numbers, kept) if tag is None else \
                [await run(request, _bulk, archive, match, tag, kept)]
        if tag is None and numbers is None:
            parts = [b"".join(parts)]
    except (_NoSuchFrame, NotAnImage) as exc:
        raise error(web.HTTPNotFound, str(exc)) from None
    except _Unsupported as exc:
        raise error(web.HTTPNotAcceptable, str(exc)) from None
    except web.HTTPException:
        raise
    except Exception as exc:
        raise _unreadable(match.sop_instance_uid, exc) from None
    await audit(request, f"WADO {request.path.rsplit('/', 2)[-2]} of {match.sop_instance_uid}: "
                         f"{sum(map(len, parts))} bytes", study)
    return _octet_parts(request, parts, headers)


# -- rendered ---------------------------------------------------------------------------------------

def _pair(request: web.Request, name: str, kind=float, count: int = 2) -> tuple | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        values = [kind(v) for v in raw.split(",")[:count]]
    except ValueError:
        values = []
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise error(web.HTTPBadRequest, f"{name}: {count} comma-separated numbers")
    return tuple(values)


async def rendered(request: web.Request) -> web.Response:
    """/rendered (any viewport, window) and /thumbnail (128 x 128 at most), JPEG unless PNG is asked for."""
    thumbnail = request.path.endswith("/thumbnail")
    accept = [m for m, _ in _media(request.headers.get("Accept", ""))]
    fmt = "png" if accept and "image/png" in accept and "image/jpeg" not in accept[:accept.index("image/png")] \
        else "jpeg"
    if accept and not {"image/jpeg", "image/png", "image/*", "*/*"} & set(accept):
        raise error(web.HTTPNotAcceptable, "rendered images are image/jpeg or image/png")
    frame = _frame_numbers(request.match_info["frames"])[0] if "frames" in request.match_info else 1
    viewport = _pair(request, "viewport", int) or ((128, 128) if thumbnail else None)
    window = _pair(request, "window", float, 2) if "window" in request.query else None
    if viewport and not all(1 <= v <= IMAGE_LIMIT for v in viewport):
        raise error(web.HTTPBadRequest, f"viewport: 1-{IMAGE_LIMIT} pixels each way")
    study, found = await _named(request)
    match = found[len(found) // 2] if len(found) > 1 else found[0]       # a study's or series' thumbnail
    headers = _validators(request, [match], f"rendered:{fmt}:{frame}:{viewport}:{window}")
    images = request.app[IMAGES]

    def work(decoded):
        size = None
        if viewport:                              # the whole image, as large as fits in the viewport
            rows, columns = decoded.info["rows"], decoded.info["columns"]
            scale = min(viewport[0] / columns, viewport[1] / rows)
            size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
        return images.render(match.sop_instance_uid, frame=frame - 1, size=size, window=window, fmt=fmt,
                             decoded=decoded)

    picture = viewport[0] * viewport[1] if viewport else IMAGE_LIMIT * IMAGE_LIMIT
    try:
        data = await _with_pixels(request, match.sop_instance_uid, work, picture)
    except NotAnImage as exc:
        raise error(web.HTTPNotAcceptable, f"this instance cannot be rendered: {exc}") from None
    except ValueError as exc:
        raise error(web.HTTPBadRequest, str(exc)) from None
    await audit(request, f"WADO rendered {match.sop_instance_uid}: {len(data)} bytes", study)
    return web.Response(body=data, content_type=f"image/{fmt}", headers=headers)


def routes(app: web.Application) -> None:
    study, series, instance = STUDY, STUDY + SERIES, STUDY + SERIES + INSTANCE
    app[METADATA] = Cache(METADATA_CACHE)
    app[STORED] = Cache(app[CONFIG].viewer.instance_cache_mb << 20) if app[CONFIG].viewer.instance_cache_mb else None
    app[RETRIEVE_SLOTS] = asyncio.Semaphore(RETRIEVE_BATCHES)
    app[RETRIEVE_CALLERS] = Counter()
    app.cleanup_ctx.append(prefetching)
    r = app.router
    for path in (study, series, instance):
        r.add_get(path, retrieve)
        r.add_get(path + "/metadata", metadata)
        r.add_get(path + "/thumbnail", rendered)
    r.add_get(instance + "/rendered", rendered)
    r.add_get(instance + "/frames/{frames}", frames)
    r.add_get(instance + "/frames/{frames}/rendered", rendered)
    r.add_get(instance + "/bulkdata/{tag}", bulkdata)
