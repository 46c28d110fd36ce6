"""C-FIND matching over the index (PS3.4 C.2.2.2), shared by the C-FIND SCP and the viewer.

An identifier becomes one SQL statement with bound parameters, never SQL text made from
values: single value, universal (empty or "*"), wildcard ("*", "?" as LIKE's "%" and "_" with
an ESCAPE character, case-sensitive on both engines, so "%", "_" and quotes mean themselves),
range (dates, times), and list
(UIDs, and code strings such as Modality). Person names match without regard to case
through upper-cased key columns. Keys the index does not hold are returned empty and
reported with status 0xFF01.

A match comes out as a pydicom Dataset (`Query.run`) or already encoded (`Query.encoded`):
the C-FIND SCP sends one response per match, and building and encoding a Dataset costs
~0.5 ms where writing the few elements a match holds directly costs a few microseconds.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO
from typing import TYPE_CHECKING, Callable, Collection, Iterator

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from sqlalchemy import bindparam, func, literal_column, text
from sqlalchemy.engine import Connection, Row

from . import db
from .dicomfile import valid_uid
from .index import name_key, time_key
from .matching import without_nul

if TYPE_CHECKING:
    from .index import Index

PATIENT_ROOT, STUDY_ROOT = "patient", "study"
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
MODEL_LEVELS = {PATIENT_ROOT: LEVELS, STUDY_ROOT: LEVELS[1:]}
UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
          "IMAGE": "SOPInstanceUID"}
FROM = {
    "PATIENT": "patients p",
    "STUDY": "studies s JOIN patients p ON s.patient_pk = p.pk",
    "SERIES": "series se JOIN studies s ON se.study_pk = s.pk JOIN patients p ON s.patient_pk = p.pk",
    "IMAGE": ("instances i JOIN series se ON i.series_pk = se.pk JOIN studies s ON se.study_pk = s.pk "
              "JOIN patients p ON s.patient_pk = p.pk"),
}
ORDER = {"PATIENT": "p.pk", "STUDY": "s.pk", "SERIES": "se.pk", "IMAGE": "i.pk"}
# Query complexity (docs/security.md). Exact values become one indexed IN (...) list, so a
# thousand UIDs cost little; each wildcard, range or modality value adds an OR term that every
# candidate row is tested against (and SQLite refuses an expression more than 1000 deep).
MAX_VALUE_LENGTH = 1024
MAX_LIST = 1000           # values of one key
MAX_PATTERNS = 32         # wildcard / range / modality values of one key
MAX_PARAMETERS = 4000     # bound values in the whole query
# explicit VR: these carry a 4-byte length after two reserved bytes; the rest a 2-byte one
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_SHORT_VRS = {"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "PN", "SH", "SL", "SS",
              "ST", "TM", "UI", "UL", "US"}
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


class QueryError(ValueError):
    """The identifier cannot be answered; `status` is the C-FIND failure to send.

    The message may quote the peer's value (it goes back to the peer, in the Error
    Comment); `reason` says the same without it, for the log (no patient data in logs).
    """

    def __init__(self, message: str, status: int = 0xC000, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.reason = reason or message


class QueryTimeout(QueryError):
    """The query ran past its time limit (C-FIND: 0xA700, out of resources)."""

    def __init__(self, message: str):
        super().__init__(message, 0xA700)


@dataclass(frozen=True)
class Attribute:
    keyword: str
    level: str
    column: str      # SQL expression giving the value
    kind: str        # uid | text | cs | pn | date | time | int | count | modalities
    key: str = ""    # normalised column used for matching (pn, time)


def _count(sql: str) -> str:
    return f"(SELECT COUNT(*) FROM {sql})"


ATTRIBUTES = {a.keyword: a for a in (
    Attribute("PatientID", "PATIENT", "p.patient_id", "text"),
    Attribute("PatientName", "PATIENT", "p.patient_name", "pn", "p.patient_name_key"),
    Attribute("PatientBirthDate", "PATIENT", "p.birth_date", "date"),
    Attribute("PatientSex", "PATIENT", "p.sex", "cs"),
    Attribute("NumberOfPatientRelatedStudies", "PATIENT", _count("studies x WHERE x.patient_pk = p.pk"), "count"),
    Attribute("NumberOfPatientRelatedSeries", "PATIENT",
              _count("series x JOIN studies y ON x.study_pk = y.pk WHERE y.patient_pk = p.pk"), "count"),
    Attribute("NumberOfPatientRelatedInstances", "PATIENT",
              _count("instances x JOIN series y ON x.series_pk = y.pk JOIN studies z ON y.study_pk = z.pk "
                     "WHERE z.patient_pk = p.pk"), "count"),
    Attribute("StudyInstanceUID", "STUDY", "s.study_uid", "uid"),
    Attribute("StudyDate", "STUDY", "s.study_date", "date"),
    Attribute("StudyTime", "STUDY", "s.study_time", "time", "s.study_time_key"),
    Attribute("AccessionNumber", "STUDY", "s.accession_number", "text"),
    Attribute("StudyID", "STUDY", "s.study_id", "text"),
    Attribute("StudyDescription", "STUDY", "s.study_description", "text"),
    Attribute("ReferringPhysicianName", "STUDY", "s.referring_physician", "pn", "s.referring_physician_key"),
    Attribute("ModalitiesInStudy", "STUDY",        # {aggregate}: the dialect's string aggregation (`_dialect_sql`)
              "(SELECT {aggregate} FROM (SELECT DISTINCT x.modality AS m FROM series x WHERE x.study_pk = s.pk) x)",
              "modalities"),
    Attribute("NumberOfStudyRelatedSeries", "STUDY", _count("series x WHERE x.study_pk = s.pk"), "count"),
    Attribute("NumberOfStudyRelatedInstances", "STUDY",
              _count("instances x JOIN series y ON x.series_pk = y.pk WHERE y.study_pk = s.pk"), "count"),
    Attribute("SeriesInstanceUID", "SERIES", "se.series_uid", "uid"),
    Attribute("Modality", "SERIES", "se.modality", "cs"),
    Attribute("SeriesNumber", "SERIES", "se.series_number", "int"),
    Attribute("SeriesDescription", "SERIES", "se.series_description", "text"),
    Attribute("BodyPartExamined", "SERIES", "se.body_part", "cs"),
    Attribute("NumberOfSeriesRelatedInstances", "SERIES", _count("instances x WHERE x.series_pk = se.pk"), "count"),
    Attribute("SOPInstanceUID", "IMAGE", "i.sop_instance_uid", "uid"),
    Attribute("SOPClassUID", "IMAGE", "i.sop_class_uid", "uid"),
    Attribute("InstanceNumber", "IMAGE", "i.instance_number", "int"),
    Attribute("Rows", "IMAGE", "i.pixel_rows", "int"),
    Attribute("Columns", "IMAGE", "i.pixel_columns", "int"),
    Attribute("BitsAllocated", "IMAGE", "i.bits_allocated", "int"),
    Attribute("NumberOfFrames", "IMAGE", "i.frames", "int"),
)}
_NOT_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "InstanceAvailability"}


def _values(value, keyword: str = "") -> list[str]:
    """The values of a query element: a DICOM multi-value or backslash-separated string. An empty one
    alone is universal matching; an empty one in a list (`\\`, `A\\`) is refused: it would have matched
    everything, which is not what a list of values asks."""
    if value is None:
        return []
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else str(value).split("\\")
    items = [without_nul(str(v)).strip() for v in items]
    if len(items) > 1 and not all(items):
        raise QueryError(f"{keyword}: an empty value in a list of values ({_quoted(value)}): give each value, "
                         "or leave the key empty to match any", reason=f"{keyword}: an empty value in a list")
    return [v for v in items if v]


def _like(value: str) -> str:
    """A DICOM wildcard as a LIKE pattern (ESCAPE '\\'): '*' and '?' become '%' and '_', which mean
    themselves otherwise, as does the escape character."""
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


_LIKE = "{} LIKE {} ESCAPE '\\'"
# A prefix ("SMI*") as the dialect matches it fastest (`_dialect_sql`): {prefix COLUMN LIKE LOW HIGH}, the
# names of its parameters: the LIKE pattern, and the prefix and the first string past it.
_PREFIX = re.compile(r"\{prefix (\S+) (\w+) (\w+) (\w+)\}")


def _dialect_sql(sql: str, dialect) -> str:
    """`sql` with the dialect's string aggregation where it says {aggregate} (SQLAlchemy's
    `aggregate_strings`: group_concat on SQLite, string_agg on PostgreSQL), and its prefix matches.

    A prefix is a range on SQLite: its LIKE optimisation makes the same range of a bound pattern, but
    then re-prepares the statement for each new pattern, which costs more than the query (bench/index.py).
    PostgreSQL keeps the LIKE: a range compares in the database's collation, which need not keep
    prefixes together; LIKE 'X%' uses the text_pattern_ops indexes (archive_0003)."""
    if "{prefix " in sql:
        form = "({0} >= :{2} AND {0} < :{3})" if dialect.name == "sqlite" else _LIKE.format("{0}", ":{1}")
        sql = _PREFIX.sub(lambda m: form.format(*m.groups()), sql)
    if "{aggregate}" not in sql:
        return sql
    aggregate = _AGGREGATE.get(dialect.name)
    if aggregate is None:
        aggregate = _AGGREGATE[dialect.name] = str(func.aggregate_strings(literal_column("x.m"), ",").compile(
            dialect=dialect, compile_kwargs={"literal_binds": True}))
    return sql.replace("{aggregate}", aggregate)


_AGGREGATE: dict[str, str] = {}


@lru_cache(maxsize=512)
def _prepared(sql: str) -> db.Prepared:
    """One `db.Prepared` per query shape (the SQL of an identifier's keys and kinds of values; the values
    themselves are parameters): a C-FIND SCP sees a few shapes over and over.

    PostgreSQL: never prepared on the server, each run planned for its values. Prepared (psycopg does
    after five runs), a statement gets PostgreSQL's generic plan for good once that looks cheaper than
    its custom plans have cost on average: one broad prefix ("S*") does it, and the generic plan of
    `LIKE $1` cannot use the text_pattern_ops indexes: it reads every patient (10M instances: 1.5 ms
    custom, ~24 ms generic, growing with the archive; bench/query.py --explain). Planning costs ~0.4 ms."""
    return db.Prepared(sql, prepare=False)


def _wild(value: str) -> bool:
    return "*" in value or "?" in value


def _quoted(value, limit: int = 24) -> str:
    """A peer's value in a message: quoted, and cut short (it goes into logs and comments)."""
    text = str(value)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _date_range(value: str, keyword: str) -> tuple[str | None, str | None]:
    low, dash, high = value.replace(".", "").partition("-")
    for part in (low, high):
        if part and not (_DATE.match(part) and _real_date(part)):
            raise QueryError(f"{keyword}: {_quoted(value)} is not a date or a date range (YYYYMMDD-YYYYMMDD)",
                             reason=f"{keyword}: not a date or a date range (YYYYMMDD-YYYYMMDD)")
    if dash and not low and not high:              # "-" matched nothing, with success: say it
        raise QueryError(f"{keyword}: a range needs a start or an end (YYYYMMDD-, -YYYYMMDD); leave the key "
                         "empty to match any", reason=f"{keyword}: a range without a start or an end")
    return (low or None, high or None) if dash else (low, low)


def _real_date(text: str) -> bool:
    from datetime import datetime

    try:
        datetime.strptime(text, "%Y%m%d")
        return True
    except ValueError:
        return False


def _time_range(value: str, keyword: str) -> tuple[str | None, str | None]:
    low, dash, high = value.replace(":", "").partition("-")
    for part in (low, high):
        if part and not _TIME.match(part):
            raise QueryError(f"{keyword}: {_quoted(value)} is not a time or a time range (HHMMSS-HHMMSS)",
                             reason=f"{keyword}: not a time or a time range (HHMMSS-HHMMSS)")
    if dash and not low and not high:
        raise QueryError(f"{keyword}: a range needs a start or an end (HHMMSS-, -HHMMSS); leave the key "
                         "empty to match any", reason=f"{keyword}: a range without a start or an end")
    if not dash:
        high = low
    return time_key(low) if low else None, time_key(high, upper=True) if high else None


class Query:
    """One C-FIND identifier, parsed against a model; `run(conn)` yields the responses."""

    def __init__(self, model: str, identifier: Dataset, *, case_insensitive_names: bool = True,
                 retrieve_ae: str = ""):
        self.model = model
        self.retrieve_ae = retrieve_ae
        try:
            self.level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
        except Exception:
            raise QueryError("QueryRetrieveLevel cannot be read", 0xA900) from None
        if self.level not in MODEL_LEVELS[model]:
            raise QueryError(f"QueryRetrieveLevel {_quoted(self.level)} is not one of "
                             f"{', '.join(MODEL_LEVELS[model])} for this information model", 0xA900,
                             reason="QueryRetrieveLevel is not one of this information model's")
        depth = LEVELS.index(self.level)
        self.return_keys: list[str] = []          # known attributes, in identifier order
        self.unsupported: list[tuple[int, str]] = []  # (tag, VR) returned empty
        self.conditions: list[str] = []
        self.params: dict[str, object] = {}
        for element in identifier:
            if element.tag.group in (0x0000, 0x0002) or element.keyword in _NOT_KEYS:
                continue
            attribute = ATTRIBUTES.get(element.keyword)
            if attribute is None or LEVELS.index(attribute.level) > depth:
                self.unsupported.append((element.tag, element.VR))
                continue
            self.return_keys.append(attribute.keyword)
            if element.VR == "SQ":
                continue
            try:
                value = element.value
            except Exception:
                raise QueryError(f"{element.keyword}: value cannot be decoded") from None
            self._match(attribute, value, case_insensitive_names)
        for level in LEVELS[LEVELS.index(MODEL_LEVELS[model][0]):depth + 1]:  # unique keys always answered
            if UNIQUE[level] not in self.return_keys:
                self.return_keys.append(UNIQUE[level])

    def _match(self, attribute: Attribute, value, case_insensitive: bool) -> None:
        values = _values(value, attribute.keyword)
        if not values or values == ["*"]:
            return                                            # universal matching
        if len(values) > MAX_LIST:
            raise QueryError(f"{attribute.keyword}: {len(values)} values, at most {MAX_LIST}")
        if any(len(v) > MAX_VALUE_LENGTH for v in values):
            raise QueryError(f"{attribute.keyword}: a value longer than {MAX_VALUE_LENGTH} characters")
        kind, column, bind = attribute.kind, attribute.key or attribute.column, self._bind
        if kind == "uid" and not all(map(valid_uid, values)):      # as ingest refuses one (no leading zero)
            raise QueryError(f"{attribute.keyword}: {_quoted(value)} is not a UID or a list of UIDs (digits and dots, "
                             "no component with a leading zero, at most 64 characters; no wildcards)",
                             reason=f"{attribute.keyword}: not a UID")
        patterns = len(values) if kind in ("date", "time", "modalities") else sum(map(_wild, values))
        if patterns > MAX_PATTERNS:
            raise QueryError(f"{attribute.keyword}: {patterns} wildcard or range values, at most {MAX_PATTERNS}")
        if len(self.params) + 2 * len(values) + sum(map(_wild, values)) > MAX_PARAMETERS:
            raise QueryError(f"more than {MAX_PARAMETERS} values in one query")
        if kind == "count":
            return                                            # return keys only
        if kind == "pn":
            if not case_insensitive:
                column = attribute.column
            values = [name_key(v) if case_insensitive else v for v in values]
        if kind == "modalities":
            inner = " OR ".join(_LIKE.format("x.modality", bind(_like(v))) if _wild(v) else f"x.modality = {bind(v)}"
                                for v in values)
            self.conditions.append(f"EXISTS (SELECT 1 FROM series x WHERE x.study_pk = s.pk AND ({inner}))")
            return
        if kind in ("date", "time"):
            ranges = [(_date_range if kind == "date" else _time_range)(v, attribute.keyword) for v in values]
            parts = []
            for low, high in ranges:
                if low and high:
                    parts.append(f"{column} BETWEEN {bind(low)} AND {bind(high)}")
                elif low:
                    parts.append(f"{column} >= {bind(low)}")
                else:
                    parts.append(f"{column} <= {bind(high)}")
            self.conditions.append("(" + " OR ".join(parts) + ")")
            return
        if kind == "int":
            try:
                numbers = [int(v) for v in values]
            except ValueError:
                raise QueryError(f"{attribute.keyword}: {_quoted(value)} is not an integer",
                                 reason=f"{attribute.keyword}: not an integer") from None
            self.conditions.append(f"{column} IN ({', '.join(map(bind, numbers))})")
            return
        exact = values if kind == "uid" else [v for v in values if not _wild(v)]
        wild = [] if kind == "uid" else [v for v in values if _wild(v)]
        terms = [f"{column} IN ({', '.join(map(bind, exact))})"] if exact else []
        terms += [self._wildcard(column, v) for v in wild]
        self.conditions.append(terms[0] if len(terms) == 1 else "(" + " OR ".join(terms) + ")")

    def _wildcard(self, column: str, value: str) -> str:
        """`column` matched against a wildcard value: a prefix ("SMI*") as `_dialect_sql` says, else LIKE."""
        pattern = self._bind(_like(value))
        stem = value[:-1]
        if not value.endswith("*") or not stem or _wild(stem) or ord(stem[-1]) >= 0xD7FF:
            return _LIKE.format(column, pattern)
        low, high = self._bind(stem), self._bind(stem[:-1] + chr(ord(stem[-1]) + 1))
        return f"{{prefix {column} {pattern[1:]} {low[1:]} {high[1:]}}}"

    def _bind(self, value) -> str:
        """A bound parameter for `value`: its `:name` in the SQL."""
        name = f"p{len(self.params)}"
        self.params[name] = value
        return f":{name}"

    def sql_for(self, dialect) -> str:
        """The query's SQL as `dialect` runs it (`_dialect_sql`)."""
        return _dialect_sql(self.sql, dialect)

    @property
    def sql(self) -> str:
        """The query's SQL for either engine: `sql_for` makes it one engine's."""
        columns = ", ".join(f"{ATTRIBUTES[k].column} AS {k}" for k in self.return_keys)
        where = " AND ".join(self.conditions) or "1 = 1"
        charset = "s.character_set" if self.level != "PATIENT" else "NULL"
        return (f"SELECT {columns}, {charset} AS _charset FROM {FROM[self.level]} WHERE {where} "
                f"ORDER BY {ORDER[self.level]}")

    def run(self, conn: Connection, limit: int | None = None,
            timeout: float | None = None, offset: int = 0) -> Iterator[Dataset]:
        """The matches as Datasets; `offset` skips that many first (QIDO-RS pages with it)."""
        yield from self.responses(self.rows(conn, limit, timeout, offset))

    def values(self, conn: Connection, limit: int | None = None, timeout: float | None = None,
               offset: int = 0) -> Iterator[tuple]:
        """The matches as the index holds them: a tuple of each match's `return_keys` values (None or "" when
        empty; a count or number as an integer; ModalitiesInStudy comma-separated). QIDO-RS writes DICOM JSON
        from them: a Dataset per match costs ten times the query."""
        for row in self.rows(conn, limit, timeout, offset):
            yield tuple(row[:-1])

    def encoded(self, conn: Connection, explicit_vr: bool, limit: int | None = None,
                timeout: float | None = None) -> Iterator[bytes]:
        """The matches as identifiers encoded in Little Endian (explicit or implicit VR): the
        bytes pydicom writes for `run`'s Datasets (tests/test_query.py compares them)."""
        yield from self.responses(self.rows(conn, limit, timeout), explicit_vr)

    def responses(self, rows: list, explicit_vr: bool | None = None) -> Iterator[Dataset | bytes]:
        """`rows`' matches: Datasets, or (`explicit_vr` given) identifiers already encoded as `encoded` says."""
        if explicit_vr is None:
            return map(self._response, rows)
        return map(self._encoder(explicit_vr), rows)

    def rows(self, conn: Connection, limit: int | None, timeout: float | None, offset: int = 0) -> list:
        """The matching rows (the return keys in order, then the character set; the driver's tuples),
        all fetched within the time limit: past `timeout` seconds of work in the database, `QueryTimeout`.

        Run as `db.Prepared` (compiled once per query shape and dialect, on the driver's cursor):
        `Connection.execute` costs more than SQLite spends on a typical C-FIND (bench/index.py)."""
        paging = (f" LIMIT {int(limit)}" if limit else " LIMIT -1" if offset and conn.dialect.name == "sqlite" else "")
        statement = _prepared(self.sql_for(conn.dialect) + paging + (f" OFFSET {int(offset)}" if offset else ""))
        try:
            with db.deadline(conn, timeout):
                rows = statement.rows(conn, self.params)
        except db.QueryCancelled as exc:
            raise QueryTimeout(f"the query took more than {exc.timeout:g} s: narrow it") from None
        return rows

    def _encoder(self, explicit_vr: bool) -> Callable[[Row], bytes]:
        def header(tag: int, vr: str) -> tuple[bytes, struct.Struct]:
            head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
            if not explicit_vr:
                return head, _U32
            return (head + vr.encode() + b"\0\0", _U32) if vr in _LONG_VRS else (head + vr.encode(), _U16)

        def pydicom_encoded(row) -> bytes:
            out = BytesIO()
            write_dataset(_writer(out, explicit_vr), self._response(row))
            return out.getvalue()

        if any(vr not in _LONG_VRS | _SHORT_VRS for _, vr in self.unsupported):
            return pydicom_encoded               # ambiguous VRs ("US or SS"): pydicom resolves them
        fixed = [(tag, header(tag, vr), b"") for tag, vr in self.unsupported]
        fixed.append((0x00080052, header(0x00080052, "CS"), _pad(self.level)))
        if self.retrieve_ae:
            fixed.append((0x00080054, header(0x00080054, "AE"), _pad(self.retrieve_ae)))
        keys = [(tag_for_keyword(k), k, "us" if dictionary_VR(k) == "US" else ATTRIBUTES[k].kind,
                 header(tag_for_keyword(k), dictionary_VR(k))) for k in self.return_keys]
        charset = header(0x00080005, "CS")

        def encode(row) -> bytes:
            elements, text = list(fixed), False
            for (tag, keyword, kind, head), value in zip(keys, row):
                if value is None or value == "":
                    value = b""
                elif kind == "modalities":
                    value = "\\".join(sorted(value.split(","))).encode()
                elif kind in ("int", "count"):
                    value = str(int(value)).encode()
                elif kind == "us":                   # Rows, Columns, Bits Allocated: binary (empty if not a US)
                    value = _U16.pack(int(value)) if 0 <= int(value) <= 0xFFFF else b""
                elif kind == "uid":
                    value = _pad(value, b"\0")
                elif isinstance(value, str):
                    text = text or not value.isascii()
                    value = value.encode("utf-8")
                else:
                    return pydicom_encoded(row)
                elements.append((tag, head, _pad(value)))
            stored = row[-1]
            if text:
                elements.append((0x00080005, charset, b"ISO_IR 192"))
            elif stored:
                elements.append((0x00080005, charset, _pad(stored.encode())))
            elements.sort(key=lambda element: element[0])
            out = bytearray()
            for _, (head, length), value in elements:
                if length is _U16 and len(value) > 0xFFFF:
                    return pydicom_encoded(row)
                out += head + length.pack(len(value)) + value
            return bytes(out)

        return encode

    def _response(self, row) -> Dataset:
        ds = Dataset()
        text = []
        for keyword, value in zip(self.return_keys, row):
            kind = ATTRIBUTES[keyword].kind
            if value is None or value == "":
                value = "" if dictionary_VR(keyword) != "SQ" else []
            elif kind == "modalities":
                value = sorted(value.split(","))
            elif kind in ("int", "count"):
                value = int(value)
                if dictionary_VR(keyword) == "US" and not 0 <= value <= 0xFFFF:
                    value = ""                      # not a US: answered empty, as the encoder does
            elif kind == "uid":
                value = UID(value)
            elif isinstance(value, str):
                text.append(value)
            setattr(ds, keyword, value)
        for tag, vr in self.unsupported:
            ds.add_new(tag, vr, [] if vr == "SQ" else None)
        ds.QueryRetrieveLevel = self.level
        if self.retrieve_ae:
            ds.RetrieveAETitle = self.retrieve_ae
        stored = row[-1]
        if any(not t.isascii() for t in text):
            ds.SpecificCharacterSet = "ISO_IR 192"   # what we hold is decoded text: UTF-8 holds it all
        elif stored:
            ds.SpecificCharacterSet = stored.split("\\")
        return ds


# -- the viewer's study list ------------------------------------------------------------------
# The same matching as a C-FIND at STUDY level, one page in an order a person picks, each study's
# own images counted apart from the node's results (instances a job made: instances.job_id).
_OWN = "instances x JOIN series y ON x.series_pk = y.pk WHERE y.study_pk = s.pk AND x.job_id IS {} NULL"
STUDY_LIST_COLUMNS = {"images": _count(_OWN.format("")), "results": _count(_OWN.format("NOT"))}
# sort key -> the terms it orders by (an empty value sorts last whichever the direction)
STUDY_LIST_ORDER = {
    "date": ("s.study_date", "s.study_time_key"),
    "name": ("p.patient_name_key",),
    "id": ("p.patient_id",),
    "description": ("s.study_description COLLATE NOCASE",),
    "modalities": (ATTRIBUTES["ModalitiesInStudy"].column,),
    "images": (STUDY_LIST_COLUMNS["images"],),
}


def study_list(conn: Connection, query: Query, *, order: str = "date", descending: bool = True,
               limit: int = 50, offset: int = 0) -> list[dict]:
    """One page of a STUDY-level query's matches as dicts (its return keys by keyword, plus
    `images` and `results`), ordered by `order` (a STUDY_LIST_ORDER key), ties in the order received
    (the latest first when descending)."""
    if query.level != "STUDY":
        raise QueryError("the study list is a STUDY-level query")
    if order not in STUDY_LIST_ORDER:
        raise QueryError(f"order by one of {', '.join(STUDY_LIST_ORDER)}")
    direction = "DESC" if descending else "ASC"
    terms = []
    for term in STUDY_LIST_ORDER[order]:
        bare = term.removesuffix(" COLLATE NOCASE")
        terms += [f"({bare} IS NULL OR {bare} = '')", f"{term} {direction}"]
    columns = ", ".join([*(f"{ATTRIBUTES[k].column} AS \"{k}\"" for k in query.return_keys),
                         *(f"{sql} AS {name}" for name, sql in STUDY_LIST_COLUMNS.items())])
    sql = (f"SELECT {columns} FROM {FROM['STUDY']} WHERE {' AND '.join(query.conditions) or '1 = 1'} "
           f"ORDER BY {', '.join(terms)}, s.pk {direction} LIMIT {int(limit)} OFFSET {int(offset)}")
    return [dict(row._mapping) for row in conn.execute(text(_dialect_sql(sql, conn.dialect)), query.params)]



# -- what the DICOM services read: C-FIND matches, a retrieve's instances, one stored instance ------

def find(index: Index, query: Query, limit: int | None = None, timeout: float | None = None,
         explicit_vr: bool | None = None, offset: int = 0) -> Iterator[Dataset | bytes]:
    """A C-FIND's matches, read on a read connection of their own (given back before the first match is
    yielded): Datasets (`Query.run`), or identifiers already encoded in Little Endian (`Query.encoded`) when
    `explicit_vr` is given; the first `offset` skipped. The query runs at the first `next`."""
    with index.reader() as conn:        # every row fetched (at most `limit`), then the connection goes back:
        rows = query.rows(conn, limit, timeout, offset)   # a peer slow to read its answers holds none of the pool's
    yield from query.responses(rows, explicit_vr)


def find_values(index: Index, query: Query, limit: int | None = None, timeout: float | None = None,
                offset: int = 0) -> list[tuple]:
    """`Query.values` on a read connection of its own."""
    with index.reader() as conn:
        return list(query.values(conn, limit, timeout, offset))


@dataclass(frozen=True)
class Match:
    """An instance a C-MOVE / C-GET sends; `pk` orders them (`instances(after=...)` pages on it)."""
    pk: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    blob_id: str
    sha256: str
    received_at: float = 0.0     # when it was stored (a WADO-RS answer's Last-Modified)
    size: int = 0                # bytes of its Part 10 file (a WADO-RS answer's Content-Length)


def _where(query: Query, conn: Connection) -> tuple[str, dict]:
    return _dialect_sql(" AND ".join(query.conditions) or "1 = 1", conn.dialect), dict(query.params)


def matches(index: Index, query: Query) -> bool:
    """Whether anything matches the query's keys at its level (one row looked for: a reader's reach)."""
    with index.reader() as conn:
        where, params = _where(query, conn)
        return conn.execute(text(f"SELECT 1 FROM {FROM[query.level]} WHERE {where} LIMIT 1"), params).first() is not None


def instance_count(index: Index, query: Query) -> int:
    """How many stored instances the query's keys name (at any level: a retrieve sends instances)."""
    with index.reader() as conn:
        where, params = _where(query, conn)
        return conn.execute(text(f"SELECT COUNT(*) FROM {FROM['IMAGE']} WHERE {where}"), params).scalar_one()


def instance_kinds(index: Index, query: Query, limit: int) -> list[tuple[str, str]]:
    """The (SOP class UID, transfer syntax) pairs of those instances, at most `limit` of them
    (the presentation contexts a C-MOVE proposes)."""
    with index.reader() as conn:
        where, params = _where(query, conn)
        return [(sop_class, syntax) for sop_class, syntax in conn.execute(text(
            f"SELECT DISTINCT i.sop_class_uid, i.transfer_syntax FROM {FROM['IMAGE']} WHERE {where} "
            f"LIMIT {int(limit)}"), params)]


@dataclass(frozen=True)
class StudyShare:
    """A study a retrieve sends instances of, with its patient (for the audit trail)."""
    study_uid: str
    patient_id: str
    patient_name: str
    accession: str
    sop_classes: dict


def studies_named(index: Index, query: Query, limit: int = 100) -> list[StudyShare]:
    """The studies (at most `limit`) whose instances the query names, each with the count of its instances by
    SOP class."""
    found: dict[str, StudyShare] = {}
    with index.reader() as conn:
        where, params = _where(query, conn)
        for study, patient_id, name, accession, sop_class, count in conn.execute(text(
                f"SELECT s.study_uid, p.patient_id, p.patient_name, s.accession_number, i.sop_class_uid, COUNT(*) "
                f"FROM {FROM['IMAGE']} WHERE {where} GROUP BY s.study_uid, p.patient_id, p.patient_name, "
                f"s.accession_number, i.sop_class_uid ORDER BY s.study_uid LIMIT {int(limit) * 8}"), params):
            share = found.get(study)
            if share is None:
                if len(found) == limit:
                    break
                share = found[study] = StudyShare(study, patient_id or "", name or "", accession or "", {})
            share.sop_classes[sop_class] = int(count)
    return list(found.values())


def instances(index: Index, query: Query, after: int, limit: int) -> list[Match]:
    """The next `limit` of those instances with `pk` above `after`, in `pk` order: a retrieve reads
    them a page at a time and never holds them all."""
    with index.reader() as conn:
        where, params = _where(query, conn)
        return [Match(*row) for row in conn.execute(text(
            f"SELECT i.pk, i.sop_class_uid, i.sop_instance_uid, i.transfer_syntax, i.blob_id, i.sha256, "
            f"i.received_at, i.size "
            f"FROM {FROM['IMAGE']} WHERE {where} AND i.pk > :after ORDER BY i.pk LIMIT {int(limit)}"),
            {**params, "after": after})]


@dataclass(frozen=True)
class Stored:
    """What the index recorded of a stored instance at its reception (a storage commitment check)."""
    sop_class_uid: str
    blob_id: str
    sha256: str


def stored(index: Index, sop_instance_uids: Collection[str]) -> dict[str, Stored]:
    """The stored instances of these SOP Instance UIDs (at most MAX_LIST), by UID; a UID the node
    holds no instance of is not in the result."""
    uids = list(dict.fromkeys(sop_instance_uids))
    if len(uids) > MAX_LIST:
        raise ValueError(f"{len(uids)} UIDs, at most {MAX_LIST} at once")
    if not uids:
        return {}
    with index.reader() as conn:
        return {uid: Stored(*rest) for uid, *rest in conn.execute(_STORED, {"uids": uids})}


_STORED = text("SELECT sop_instance_uid, sop_class_uid, blob_id, sha256 FROM instances "
               "WHERE sop_instance_uid IN :uids").bindparams(bindparam("uids", expanding=True))


_U16, _U32 = struct.Struct("<H"), struct.Struct("<I")


def _pad(value: bytes | str, pad: bytes = b" ") -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return raw + pad if len(raw) % 2 else raw


def _writer(buffer: BytesIO, explicit_vr: bool) -> DicomFileLike:
    out = DicomFileLike(buffer)
    out.is_little_endian, out.is_implicit_VR = True, not explicit_vr
    return out


def model_of(sop_class_uid: str) -> str:
    """The information model of a Q/R SOP class (FIND, MOVE or GET)."""
    if sop_class_uid.startswith("1.2.840.10008.5.1.4.1.2.1."):
        return PATIENT_ROOT
    if sop_class_uid.startswith("1.2.840.10008.5.1.4.1.2.2."):
        return STUDY_ROOT
    raise QueryError(f"{sop_class_uid} is not a Patient Root or Study Root model", 0xA900)

