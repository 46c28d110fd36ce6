"""DICOMweb (PS3.18) under /dicomweb: who may call it, QIDO-RS and STOW-RS (WADO-RS: wado.py).

Callers: a program with an API token (`Authorization: Bearer ...`, tokens.py: "read" or "write"), or
the viewer's own session cookie (the same session check as its pages; a POST also passes its CSRF
rule), or a share link's session, which sees its one study only: QIDO from it returns that study
and nothing else, and every other study answers 404, as one that does not exist. A bad, expired or
revoked token, or none, gets one 401 (`WWW-Authenticate: Bearer`) that says no more.

QIDO-RS is the C-FIND engine (archive/query.py): the query string becomes a C-FIND identifier
(keywords or tags, UID lists with commas, wildcards, date and time ranges), run as a Study Root
query at the path's level; matches come back as DICOM JSON (PS3.18 F.2), 204 when there are none.
STOW-RS streams each part of a multipart/related body to the spool (within viewer.body_timeout and
min_body_rate), then ingests it as an upload does (the same path as a C-STORE): each part is stored or
fails by itself, with its reason (a part that is itself a multipart: not DICOM). Every call is audited
(who, which study, what came back); refused tokens once per address and minute, with a count.
"""
from __future__ import annotations

import functools
import json
import logging
import re
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from aiohttp import MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from sqlalchemy import exc as sa_exc

from archive import query as archive_query
from archive.dicomfile import InvalidInstance, inspect
from archive.query import ATTRIBUTES, LEVELS, STUDY_ROOT, Query, QueryError

from . import accounts, atna, roles, tokens
from .base import ARCHIVE, CLOCK, CONFIG, COOKIE, REFUSALS, SESSION, SlowBody, paced, run, too_slow, valid_uid
from .logins import source_of

log = logging.getLogger(__name__)
ROOT = "/dicomweb"
DICOM_JSON = "application/dicom+json"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Caller:
    who: str                     # a user's name, "share:ID" or "token:NAME" (the audit's actor)
    write: bool                  # may store (a write token, a user's session)
    study_uid: str | None        # a share link's session: this study only
    token: bool                  # came with a token (no cookie: nothing for CSRF to guard)


CALLER = web.RequestKey("dicomweb_caller", Caller)


def is_dicomweb(request: web.Request) -> bool:
    return request.path == ROOT or request.path.startswith(ROOT + "/")


def by_token(request: web.Request) -> bool:
    """A call authenticated by a token: it carries no cookie, so the CSRF rule has nothing to guard."""
    caller = request.get(CALLER)
    return caller is not None and caller.token


def error(status: type[web.HTTPException], why: str, **headers) -> web.HTTPException:
    sizes = {"max_size": 0, "actual_size": 0} if status is web.HTTPRequestEntityTooLarge else {}
    return status(text=json.dumps({"error": why}), content_type="application/json", headers=headers or None, **sizes)


def _unauthorized(detail: str = "") -> web.HTTPException:
    challenge = 'Bearer realm="m3dicom"' + (', error="invalid_token"' if detail else "")
    return error(web.HTTPUnauthorized, "authentication required: an API token (Authorization: Bearer) or a session",
                 **{"WWW-Authenticate": challenge})


CORS_HEADERS = "Authorization, Accept, Content-Type, If-None-Match"
CORS_EXPOSED = "ETag, Last-Modified, Warning, Content-Location, Content-Length"


def _allowed_origin(request: web.Request) -> str | None:
    """The request's Origin when viewer.cors_origins allows it (a web app hosted elsewhere), else None."""
    origin = request.headers.get("Origin", "").rstrip("/")
    return origin if origin and origin in request.app[CONFIG].viewer.cors_origins else None


async def cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: an allowed origin may read /dicomweb's answers (errors and streams too). No
    credentials: such an app sends an API token; the viewer's cookie stays its own site's (SameSite)."""
    if is_dicomweb(request) and (origin := _allowed_origin(request)):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED
        response.headers["Vary"] = ", ".join(filter(None, (response.headers.get("Vary"), "Origin")))


def _preflight(request: web.Request) -> web.Response:
    if _allowed_origin(request) is None:
        raise error(web.HTTPForbidden, "this origin may not call this API (viewer.cors_origins)")
    return web.Response(status=204, headers={"Access-Control-Allow-Methods": "GET, POST",
                                             "Access-Control-Allow-Headers": CORS_HEADERS,
                                             "Access-Control-Max-Age": "600"})


async def _refused_token(request: web.Request) -> None:
    """The audit row of a refused token: the first from an address (IPv6: its /64) in a minute, with how many
    more came from there since its previous row; the others are counted, not written (REFUSALS: a flood of bad
    tokens writes a row per address and minute, where a row per token would fill the audit table)."""
    source, refusals = source_of(request.remote or "?"), request.app[REFUSALS]
    earlier = refusals.note(source, request.app[CLOCK]())
    if refusals.forgotten:
        log.warning("DICOMweb: %d refused tokens from addresses past the %d remembered, not audited",
                    refusals.forgotten, refusals.sources)
        refusals.forgotten = 0
    if earlier is None:
        return
    detail = "a bad, expired or revoked token" + (f" (and {earlier} more from this address since the previous "
                                                  "such row, not written one by one)" if earlier else "")
    if earlier:
        log.warning("DICOMweb: %d more refused tokens from %s (one audit row per address and minute)", earlier,
                    source)
    await run(request, lambda: accounts.audit(request.app[ARCHIVE].index, "token:?", "dicomweb", "refused",
                                              detail=detail, address=request.remote))


async def authenticate(request: web.Request, handler):
    """The sessions middleware's step for /dicomweb: a token, else the session cookie, else 401 (a CORS
    preflight, which carries no token, is answered here)."""
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return _preflight(request)
    if "//" in request.path:                      # dicomweb-client given ".../dicomweb/" asks "/dicomweb//studies"
        raise error(web.HTTPNotFound, "no such path: it has an empty segment ('//'); the base URL is "
                    "https://HOST:PORT/dicomweb, without a '/' at its end")
    app = request.app
    index, now = app[ARCHIVE].index, app[CLOCK]()
    authorization = request.headers.get("Authorization")
    request[SESSION] = None
    if authorization is not None:
        scheme, _, value = authorization.strip().partition(" ")
        token = await run(request, tokens.check, index, value.strip(), now) if scheme.lower() == "bearer" else None
        if token is None:
            await _refused_token(request)
            raise _unauthorized("invalid")
        request[CALLER] = Caller(token.who, token.scope == "write", None, True)
        return await handler(request)
    cookie = request.cookies.get(COOKIE)
    session = await run(request, accounts.session, index, cookie, app[CONFIG].viewer.session_idle_minutes,
                        now) if cookie else None
    if session is None:
        raise _unauthorized()
    request[SESSION] = session
    request[CALLER] = Caller(session.who, not session.is_share, session.study_uid, False)
    if session.is_share and request.method not in ("GET", "HEAD", "OPTIONS"):     # before the CSRF rule's answer
        await audit(request, "a share link is read-only", session.study_uid, "refused")
        raise error(web.HTTPForbidden, "a share link is read-only: storing needs a user's session or an API token "
                                       "of scope write")
    return await handler(request)


async def audit(request: web.Request, detail: str, study_uid: str | None = None, outcome: str = "ok") -> None:
    await audit_each(request, [(detail, study_uid, outcome)])


async def audit_each(request: web.Request, records: list[tuple[str, str | None, str]]) -> None:
    """Audit records of one call, (detail, study, outcome) each: one transaction, and an ATNA message each."""
    caller = request[CALLER]
    archive = request.app[ARCHIVE]

    def write() -> None:
        accounts.audit_many(archive.index, caller.who, "dicomweb", [
            (outcome, study_uid, f"{request.method} {detail}") for detail, study_uid, outcome in records],
            address=request.remote)
        for detail, study_uid, outcome in records[:AUDITED_STUDIES]:      # the recorder's queue is bounded
            atna.record(archive, request.app[CONFIG].node.ae_title, caller.who, "dicomweb", outcome, request.remote,
                        study_uid, detail, (request.path, request.query_string.encode("utf-8", "replace")))
    await run(request, write)


def checked_uid(request: web.Request, name: str) -> str | None:
    """The UID of a path segment (400 for one that is not a UID: `..`, letters, too long)."""
    value = request.match_info.get(name)
    if value is None:
        return None
    if not valid_uid(value):
        raise error(web.HTTPBadRequest, f"{name}: not a UID (digits and dots, at most 64 characters)")
    return value


def study_in_reach(request: web.Request) -> str | None:
    """The path's study UID, checked; a share link's session sees no other study (404, as for none)."""
    study = checked_uid(request, "study")
    caller = request[CALLER]
    if study is not None and caller.study_uid is not None and study != caller.study_uid:
        raise error(web.HTTPNotFound, "no such study")
    return study


def base_url(request: web.Request) -> str:
    """Where this API is, as its callers reach it (viewer.public_url when set)."""
    viewer = request.app[CONFIG].viewer
    if viewer.public_url:
        return viewer.public_url.rstrip("/") + ROOT
    host = request.host
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    default = {"http": 80, "https": 443}.get(request.scheme)
    if not re.search(r":\d+$", host) and isinstance(sockname, tuple) and sockname[1] != default:
        host = f"{host}:{sockname[1]}"       # a Host without the port (dicomweb-client sends one): the port it came to
    return f"{request.scheme}://{host}{ROOT}"


def json_answer(request: web.Request, data, status: int = 200, **headers) -> web.Response:
    """DICOM JSON (`data`, or bytes already encoded), gzipped when the client accepts it."""
    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    response = web.Response(body=body, status=status, content_type=DICOM_JSON,
                            headers=headers or None)
    response.enable_compression()                # gzip when the client's Accept-Encoding says so
    return response


# -- QIDO-RS ---------------------------------------------------------------------------------

# what PS3.18 Table 10.6.3-3 / -4 / -5 asks of each level (that the index holds), and what a
# query of a level above the one asked also returns (/series: the study's too; /instances: both)
LEVEL_KEYS = {
    "STUDY": ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
              "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
              "StudyDescription", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "SERIES": ("Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber",
               "NumberOfSeriesRelatedInstances"),
    "IMAGE": ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "BitsAllocated", "NumberOfFrames"),
}
PARAMETERS = ("limit", "offset", "fuzzymatching", "includefield")
PATIENT_COUNTS = ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances")
LISTS = ("uid", "cs", "modalities")        # kinds whose comma-separated values are a list
MAX_OFFSET = 1 << 31                       # limit and offset at most (the database's integers)


def _attribute(name: str) -> str | None:
    """The keyword a query parameter names (a keyword, or a tag as 8 hex digits); None: no such attribute."""
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        return keyword_for_tag(int(name, 16)) or None
    return name if tag_for_keyword(name) is not None else None


def _element(keyword: str, value: str) -> DataElement:
    """A C-FIND key: pydicom does not validate it here (the engine checks it and says what is wrong;
    pydicom's warnings would write the value, perhaps patient data, to the log)."""
    tag = tag_for_keyword(keyword)
    return DataElement(tag, dictionary_VR(tag), value, validation_mode=pydicom_config.IGNORE)


def _number(query, name: str, default: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise error(web.HTTPBadRequest, f"{name}: not a whole number") from None
    if not 0 <= value <= MAX_OFFSET:
        raise error(web.HTTPBadRequest, f"{name}: between 0 and {MAX_OFFSET}")
    return value


def identifier(query, level: str, fixed: dict[str, str], share_study: str | None, limited: bool = False) -> Dataset:
    """The C-FIND identifier of a QIDO-RS query string (400 with the reason for what cannot be one)."""
    depth = LEVELS.index(level)
    fuzzy = query.get("fuzzymatching", "false").lower()
    if fuzzy not in ("true", "false"):
        raise error(web.HTTPBadRequest, "fuzzymatching: true or false")
    keys: dict[str, str] = {}
    for name in LEVELS[1:depth + 1]:
        keys.update(dict.fromkeys(LEVEL_KEYS[name], ""))
    for field in query.getall("includefield", []):
        for name in filter(None, (f.strip() for f in field.split(","))):
            if name == "all":
                keys.update((k, keys.get(k, "")) for k, a in ATTRIBUTES.items()
                            if LEVELS.index(a.level) <= depth)
                continue
            keyword = _attribute(name)
            if keyword is None:
                raise error(web.HTTPBadRequest, f"includefield: {name[:64]!r} is not a DICOM attribute")
            if keyword in ATTRIBUTES and LEVELS.index(ATTRIBUTES[keyword].level) <= depth:
                keys.setdefault(keyword, "")           # others: not held by the index, left out of the answer
    for name in query:
        if name in PARAMETERS:
            continue
        keyword = _attribute(name)
        if keyword is None:
            raise error(web.HTTPBadRequest, f"{name[:64]!r} is neither a query parameter ({', '.join(PARAMETERS)}) "
                                            "nor a DICOM attribute (a keyword, or a tag as 8 hex digits)")
        attribute = ATTRIBUTES.get(keyword)
        if attribute is None or LEVELS.index(attribute.level) > depth:
            raise error(web.HTTPBadRequest, f"{keyword}: cannot be matched at this level; these can: "
                        f"{', '.join(k for k, a in ATTRIBUTES.items() if LEVELS.index(a.level) <= depth)}")
        values = query.getall(name)
        if len(values) > 1:
            raise error(web.HTTPBadRequest, f"{keyword}: give it once (a list of values is comma-separated)")
        value = values[0]
        if attribute.kind in LISTS:
            value = value.replace(",", "\\")
        if attribute.kind == "pn" and fuzzy == "true" and value and not value.endswith("*"):
            value += "*"                         # fuzzy: a name matches by its beginning, whatever its case
        keys[keyword] = value
    keys.update(fixed)
    if share_study is not None or limited:        # a share link, a reader: they count the patient's other
        for keyword in PATIENT_COUNTS:            # studies, which these callers may not see: left out
            keys.pop(keyword, None)
    if share_study is not None:                   # a share link: its one study, whatever the query asks
        asked = [v for v in keys.get("StudyInstanceUID", "").split("\\") if v]
        keys["StudyInstanceUID"] = share_study if not asked or share_study in asked else "0.0"
    ds = Dataset()
    ds.add(_element("QueryRetrieveLevel", level))
    for keyword, value in keys.items():
        try:
            ds.add(_element(keyword, value))
        except (ValueError, OverflowError):       # pydicom's own check of a number (IS, DS, US ...)
            raise error(web.HTTPBadRequest, f"{keyword}: not a value of its kind "
                                            f"({dictionary_VR(tag_for_keyword(keyword))})") from None
    return ds


RETRIEVE_URL, AVAILABILITY = "00081190", "00080056"


_TEXT = json.encoder.encode_basestring_ascii      # a str as a JSON string, as json.dumps writes it (C)
_URL, _ONLINE = object(), object()                 # where RetrieveURL and InstanceAvailability go among the columns


@functools.lru_cache(maxsize=256)
def _columns(return_keys: tuple[str, ...]) -> tuple[tuple, ...]:
    """How each return key is written, in tag order with RetrieveURL and InstanceAvailability among them:
    (its position in a match's values, its JSON text up to the value, VR, kind), looked up once a query."""
    columns = [(f"{tag_for_keyword(keyword):08X}", position, dictionary_VR(keyword), ATTRIBUTES[keyword].kind)
               for position, keyword in enumerate(return_keys)]
    columns = [c for c in columns if c[0] not in (RETRIEVE_URL, AVAILABILITY)]     # written by the node itself
    columns += [(RETRIEVE_URL, _URL, "UR", ""), (AVAILABILITY, _ONLINE, "CS", "")]
    return tuple((position, f'"{tag}":{{"vr":"{vr}"', vr, kind) for tag, position, vr, kind in sorted(columns))


def _as_json(query: Query, found: list[tuple], level: str, base: str) -> bytes:
    """The matches as DICOM JSON (PS3.18 F.2), written from the index's values straight into JSON text."""
    keys = tuple(query.return_keys)
    columns, where = _columns(keys), {k: keys.index(k) for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                                                 "SOPInstanceUID") if k in keys}
    rows = []
    for values in found:
        url = f"{base}/studies/{values[where['StudyInstanceUID']] if 'StudyInstanceUID' in where else ''}"
        if level in ("SERIES", "IMAGE") and "SeriesInstanceUID" in where and values[where["SeriesInstanceUID"]]:
            url += f"/series/{values[where['SeriesInstanceUID']]}"
        if level == "IMAGE":
            url += f"/instances/{values[where['SOPInstanceUID']] if 'SOPInstanceUID' in where else ''}"
        parts = []
        for position, head, vr, kind in columns:
            if position is _URL:
                parts.append(f'{head},"Value":[{_TEXT(url)}]}}')
                continue
            if position is _ONLINE:
                parts.append(f'{head},"Value":["ONLINE"]}}')
                continue
            value = values[position]
            if value is None or value == "":
                parts.append(head + "}")
                continue
            if kind == "modalities":
                text = ",".join(map(_TEXT, sorted(str(value).split(","))))
            elif kind in ("int", "count"):
                text = str(int(value))
            elif vr == "PN":
                text = ",".join("{" + ",".join(f'"{group}":{_TEXT(part)}' for group, part in zip(
                    ("Alphabetic", "Ideographic", "Phonetic"), name.split("="))) + "}"
                    for name in str(value).split("\\"))
            else:
                text = ",".join(map(_TEXT, str(value).split("\\")))
            parts.append(f'{head},"Value":[{text}]}}')
        rows.append("{" + ",".join(parts) + "}")
    return ("[" + ",".join(rows) + "]").encode()


async def qido(request: web.Request) -> web.Response:
    level = {"studies": "STUDY", "series": "SERIES", "instances": "IMAGE"}[request.path.rstrip("/").rsplit("/", 1)[1]]
    study, series = study_in_reach(request), checked_uid(request, "series")
    fixed = {k: v for k, v in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)) if v is not None}
    config = request.app[CONFIG]
    cap = config.query.max_results
    limit, offset = _number(request.query, "limit", cap), _number(request.query, "offset", 0)
    referring = roles.limited(request[SESSION])
    ds = roles.restrict(identifier(request.query, level, fixed, request[CALLER].study_uid, referring is not None),
                        referring)
    if ds is None:                                # a reader without a name: none of the studies is theirs
        await audit(request, f"QIDO {level}: 0 matches", study)
        return web.Response(status=204)
    fuzzy = request.query.get("fuzzymatching", "false").lower() == "true"
    try:
        # fuzzy matching ignores case, but not in a reader's name, matched as the node's setting says (roles.py)
        insensitive = config.query.case_insensitive_names or (fuzzy and referring is None)
        query = Query(STUDY_ROOT, ds, case_insensitive_names=insensitive)
        found = await run(request, archive_query.find_values, request.app[ARCHIVE].index, query,
                          min(limit, cap) or cap, config.query.timeout, offset)
    except QueryError as exc:
        await audit(request, f"QIDO {level}: {exc.reason}"[:300], study, "refused")
        raise error(web.HTTPBadRequest, str(exc)[:300]) from None
    except sa_exc.OperationalError as exc:        # the database refused a statement too large for it
        if not any(words in str(exc) for words in ("too large", "too complex", "too many", "too big")):
            raise
        raise error(web.HTTPBadRequest, "this query is too complex: use fewer values or wildcards") from None
    await audit(request, f"QIDO {level}: {len(found)} matches", study)
    if not found:
        return web.Response(status=204)
    base = base_url(request)
    headers = {}
    if len(found) == cap and ("limit" not in request.query or limit > cap):     # perhaps more: say how to go on
        headers["Warning"] = (f'299 m3dicom "at most {cap} matches a request (query.max_results): ask for the '
                              f'next ones with offset={offset + cap}"')
    return json_answer(request, _as_json(query, found, level, base), **headers)


# -- STOW-RS ---------------------------------------------------------------------------------

FAILURE = {"invalid": 0xC000, "mismatch": 0xA900, "conflict": 0xC000, "storage full": 0xA700,
           "failure": 0x0110}
STUDY_MISMATCH = 0xA900           # the instance is not of the study the path names
AUDITED_STUDIES = 1000            # studies of one STOW-RS request with an ATNA message each (every one is audited)
# PS3.18 Table 10.5.3-2's "Elements Discarded": an instance sent again with other content under storage.duplicates
# = "keep-first" (the stored copy kept, the one sent discarded: storage commitment will not confirm it)
DISCARDED = 0xB006


class _TooLarge(Exception):
    pass


def _multipart_boundary(request: web.Request) -> None:
    """400 unless the body says it is multipart/related with a boundary, of DICOM parts."""
    content_type = request.headers.get("Content-Type", "")
    media, *params = [p.strip() for p in content_type.split(";")]
    values = {k.strip().lower(): v.strip().strip('"') for k, _, v in (p.partition("=") for p in params)}
    if media.lower() != "multipart/related":
        raise error(web.HTTPUnsupportedMediaType, "send multipart/related; type=\"application/dicom\"")
    if not values.get("boundary"):
        raise error(web.HTTPBadRequest, "the multipart body has no boundary (Content-Type: ...; boundary=...)")
    if values.get("type", "application/dicom").lower() != "application/dicom":
        raise error(web.HTTPUnsupportedMediaType, "only application/dicom parts are stored (no metadata and bulk "
                                                  "data parts)")


class _Parts(MultipartReader):
    """aiohttp's multipart reader, taking boundaries longer than RFC 2046's 70 characters: Orthanc's
    DICOMweb plug-in sends 73. Still bounded (MAX_BOUNDARY), so a line is never read without end."""

    def _get_part_reader(self, headers):
        """Every part as its bytes up to this body's next boundary, a multipart part too (it then fails alone in
        `_store`: not application/dicom). Read as a multipart of its own, it was a 500 (it has no read_chunk), and
        aiohttp misreads one whose close-delimiter has no epilogue line after it: the whole body was lost."""
        if not headers.get("Content-Type", "").strip().lower().startswith("multipart/"):
            return super()._get_part_reader(headers)
        opaque = CIMultiDict(headers)
        opaque["Content-Type"] = "application/octet-stream"
        part = super()._get_part_reader(CIMultiDictProxy(opaque))
        part.headers = headers                     # its own type, which its refusal names
        return part

    def _get_boundary(self) -> str:
        boundary = self._mimetype.parameters["boundary"]
        if len(boundary) > MAX_BOUNDARY:
            raise ValueError(f"boundary of {len(boundary)} characters ({MAX_BOUNDARY} at most)")
        return boundary


MAX_BOUNDARY = 200
STOW_PARALLEL = 4                  # parts of one STOW-RS stored at once


async def _receive(request: web.Request, work: Path, limit: int, file_limit: int, count_limit: int) -> list:
    """Each part to a file of its own ((path, its Content-Type)), within the upload limits."""
    async with paced(request) as pace:
        return await _parts(request, work, limit, file_limit, count_limit, pace)


async def _parts(request: web.Request, work: Path, limit: int, file_limit: int, count_limit: int, pace) -> list:
    reader = _Parts(request.headers, request.content)
    received, total = [], 0
    async for part in reader:
        if len(received) >= count_limit:
            raise _TooLarge(f"more than {count_limit} parts (viewer.max_upload_files)")
        path = work / f"{len(received):06d}.dcm"
        size = 0
        with open(path, "wb") as out:
            while chunk := await part.read_chunk(CHUNK):
                pace.got(len(chunk))
                size, total = size + len(chunk), total + len(chunk)
                if size > file_limit:
                    raise _TooLarge(f"a part is larger than {file_limit >> 20} MB (viewer.max_file_mb)")
                if total > limit:
                    raise _TooLarge(f"the request is larger than {limit >> 20} MB (viewer.max_upload_mb)")
                out.write(chunk)
        received.append((path, part.headers.get("Content-Type", "application/dicom")))
    return received


def _store(archive, received: list, study: str | None, who: str,
           base: str) -> tuple[list[Dataset], list[Dataset], set]:
    """(ReferencedSOPSequence items, FailedSOPSequence items, the studies stored into)."""
    stored, failed, studies = [], [], Counter()       # studies: instances stored into each

    def item(sop_class, sop_instance, **more) -> Dataset:
        ds = Dataset()
        ds.ReferencedSOPClassUID = sop_class or ""
        ds.ReferencedSOPInstanceUID = sop_instance or ""
        for keyword, value in more.items():
            setattr(ds, keyword, value)
        return ds

    def looked_at(number: int, path: Path, media: str):
        """(the part's header or None, None to store it, or its FailureReason)"""
        if media.split(";")[0].strip().lower() not in ("application/dicom", ""):
            log.warning("STOW-RS from %s: part %d refused: its type is %.60r, not application/dicom", who, number,
                        media)
            return None, 0xC000
        try:
            header = inspect(path, limits=archive.limits)
        except Exception as exc:                      # not DICOM, or not within the limits: this part's outcome
            why = str(exc) if isinstance(exc, InvalidInstance) else f"cannot be read ({type(exc).__name__})"
            log.warning("STOW-RS from %s: part %d refused: %s", who, number, why[:200])
            return None, 0xC000
        if study is not None and header.study_uid != study:
            return header, STUDY_MISMATCH
        return header, None

    def ingested(n: int):
        try:
            return archive.ingest_file(received[n][0], calling_ae=f"stow:{who}"[:64], inspected=outcomes[n][0])
        except Exception as exc:                      # the reader met bytes it did not expect
            log.warning("STOW-RS: a part refused: %s while reading it", type(exc).__name__)
            return 0xC000

    outcomes = [looked_at(number, path, media) for number, (path, media) in enumerate(received, 1)]
    first, again, seen = [], [], set()               # an instance sent twice: its parts stored in their order
    for n, (header, refused) in enumerate(outcomes):
        if refused is None:
            (again if header.sop_instance_uid in seen else first).append(n)
            seen.add(header.sop_instance_uid)
    # a few parts at once: one part's fsyncs (blob, index) overlap another's encrypting
    with ThreadPoolExecutor(STOW_PARALLEL, thread_name_prefix="stow") as pool:
        for n, result in zip(first, pool.map(ingested, first)):
            outcomes[n] = outcomes[n][0], result
    for n in again:
        outcomes[n] = outcomes[n][0], ingested(n)
    for header, result in outcomes:
        if isinstance(result, int):
            failed.append(item(header.sop_class_uid if header else "", header.sop_instance_uid if header else "",
                               FailureReason=result))
            continue
        if result.outcome.ok or result.outcome.value == "quarantined":
            kept_first = result.outcome.value == "duplicate kept"     # as a C-STORE: success, the stored copy kept
            stored.append(item(header.sop_class_uid, header.sop_instance_uid, RetrieveURL=(
                f"{base}/studies/{header.study_uid}/series/{header.series_uid}/instances/{header.sop_instance_uid}"),
                **({"WarningReason": DISCARDED} if kept_first else {})))
            studies[header.study_uid] += 1
        else:
            failed.append(item(header.sop_class_uid, header.sop_instance_uid,
                               FailureReason=FAILURE.get(result.outcome.value, 0x0110)))
    return stored, failed, studies


async def stow(request: web.Request) -> web.Response:
    caller = request[CALLER]
    study = study_in_reach(request)
    if not caller.write:
        await audit(request, "STOW: needs a write token or a user's session", study, "refused")
        raise error(web.HTTPForbidden, "storing needs a token of scope write, or a user's session")
    viewer = request.app[CONFIG].viewer
    limit, file_limit = viewer.max_upload_mb << 20, viewer.max_file_mb << 20
    if request.content_length is not None and request.content_length > limit:
        await audit(request, f"STOW: {request.content_length} bytes announced", study, "refused")
        raise error(web.HTTPRequestEntityTooLarge, f"the request is larger than {viewer.max_upload_mb} MB "
                    "(viewer.max_upload_mb)")
    _multipart_boundary(request)
    spool = request.app[CONFIG].data_dir / "spool" / "uploads"
    spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=spool))
    try:
        received = await _receive(request, work, limit, file_limit, viewer.max_upload_files)
        stored, failed, studies = await run(request, _store, request.app[ARCHIVE], received, study, caller.who,
                                            base_url(request))
    except _TooLarge as exc:
        await audit(request, f"STOW: {exc}", study, "refused")
        raise error(web.HTTPRequestEntityTooLarge, str(exc)) from None
    except SlowBody as exc:
        log.warning("STOW-RS from %s refused: %s", caller.who, exc)
        await audit(request, f"STOW: {exc}", study, "refused")
        raise too_slow(exc) from None
    except (ValueError, AssertionError, HttpProcessingError) as exc:    # aiohttp's parser: not the multipart it claims
        log.warning("STOW-RS refused: not a readable multipart body (%s: %s)", type(exc).__name__, str(exc)[:200])
        await audit(request, "STOW: not a readable multipart body", study, "refused")
        raise error(web.HTTPBadRequest, "the body is not a readable multipart/related message") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    answer, base = Dataset(), base_url(request)
    if len(studies) == 1:
        answer.RetrieveURL = f"{base}/studies/{next(iter(studies))}"
    answer.ReferencedSOPSequence = stored
    if failed:
        answer.FailedSOPSequence = failed
    kept = sum("WarningReason" in item for item in stored)
    said = (f"STOW: {len(stored)} stored, {len(failed)} failed"
            + (f", {kept} sent again with other content (the stored copy kept)" if kept else ""))
    if len(studies) > 1:       # a record (and an ATNA message) for each study, saying what went into it
        await audit_each(request, [(f"STOW: {count} stored into this study; the request: {said[6:]}, into "
                                    f"{len(studies)} studies", each, "ok")
                                   for each, count in sorted(studies.items())])
    else:
        await audit(request, said, next(iter(studies), study), "ok" if stored else "refused")
    if len(studies) > AUDITED_STUDIES:
        log.warning("STOW-RS from %s stored into %d studies: each is in the audit trail, the first %d have an ATNA "
                    "message", caller.who, len(studies), AUDITED_STUDIES)
    status = 200 if not failed and not kept else 202 if stored else 409
    headers = {"Warning": f'299 m3dicom "{kept} instance(s) already stored with other content: the stored copy '
                          f'was kept, the one sent discarded (storage.duplicates = keep-first)"'} if kept else {}
    return json_answer(request, answer.to_json_dict(), status, **headers)


# -- routes ---------------------------------------------------------------------------------------

STUDY, SERIES, INSTANCE = "/dicomweb/studies/{study}", "/series/{series}", "/instances/{instance}"


def routes(app: web.Application) -> None:
    """QIDO-RS and STOW-RS (WADO-RS: wado.routes), and CORS for viewer.cors_origins."""
    app.on_response_prepare.append(cors_headers)
    r = app.router
    for path in ("/dicomweb/studies", "/dicomweb/series", "/dicomweb/instances", f"{STUDY}/series",
                 f"{STUDY}{SERIES}/instances", f"{STUDY}/instances"):
        r.add_get(path, qido)
    r.add_post("/dicomweb/studies", stow)
    r.add_post(STUDY, stow)
