"""Fuzzing the C-FIND identifier (issue 14): whatever a peer puts in it, the engine answers
with matches and a final status, or a failure status with a reason; it never raises, and
each query ends in bounded time. `make fuzz` runs these with many more examples."""
from __future__ import annotations

import struct
import time
from io import BytesIO

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode
from pynetdicom.sop_class import (PatientRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelFind)

from archive import Archive
from archive.query import ATTRIBUTES, LEVELS
from node.config import Config
from scp.handlers import find
from test_query import build_studies

pytestmark = pytest.mark.fuzz

MODELS = [PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind]
FINAL = {0x0000, 0xA700, 0xA900, 0xC000, 0xC001, 0xFE00}
PENDING = {0xFF00, 0xFF01}
SECONDS = 5.0   # one query, on the test data (five patients)


@pytest.fixture(scope="module")
def archive(tmp_path_factory, module_index_url):
    """The test studies on SQLite and on PostgreSQL (each property runs on both)."""
    root = tmp_path_factory.mktemp("fuzz-query")
    archive = Archive(root / "var", index_url=module_index_url)
    for entry in build_studies(root / "files").values():
        for path in entry["files"]:
            assert archive.ingest_file(path).outcome.ok
    yield archive
    archive.close()


def _answers(archive, sop_class: str, identifier, explicit_vr) -> list[tuple[int, str, object]]:
    started = time.monotonic()
    answers = list(find(archive, Config(), "FUZZER", sop_class, identifier, lambda: False, explicit_vr))
    assert time.monotonic() - started < SECONDS
    *pending, (final, comment, last) = answers
    assert final in FINAL and last is None, answers[-1]
    assert all(status in PENDING and match is not None for status, _, match in pending)
    assert len(comment) <= 200
    return answers


# values a peer can send: wildcards, ranges, lists, control and non-ASCII characters, long ones
_piece = st.one_of(st.sampled_from(["*", "?", "-", "\\", "^", "=", "[", "]", "%", "_", "'", "\0", "\n", "20240115",
                                    "093000", "Smith", "1.2.3", " "]),
                   st.text(max_size=12))
values = st.one_of(st.lists(_piece, max_size=12).map("".join),
                   st.lists(st.lists(_piece, max_size=4).map("".join), max_size=60).map("\\".join),
                   st.integers(min_value=0, max_value=5000).map(lambda n: "\\".join(["A*"] * n)),
                   st.integers(min_value=0, max_value=3000).map(lambda n: "x" * n))
keywords = st.sampled_from(sorted(ATTRIBUTES) + ["PatientComments", "OtherPatientIDsSequence",
                                                 "SpecificCharacterSet", "RetrieveAETitle"])


@given(model=st.sampled_from(MODELS), level=st.sampled_from(list(LEVELS) + ["", "FRAME", "study"]),
       keys=st.dictionaries(keywords, values, max_size=8), explicit_vr=st.sampled_from([None, True, False]))
def test_any_identifier_gets_answers_and_a_final_status(archive, model, level, keys, explicit_vr):
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        try:
            setattr(identifier, keyword, [] if keyword.endswith("Sequence") else value)
        except Exception:   # pydicom refuses some values outright: a peer would send the bytes
            continue
    _answers(archive, model, lambda: identifier, explicit_vr)


def _element(group: int, elem: int, vr: bytes, value: bytes, explicit: bool) -> bytes:
    if not explicit:
        return struct.pack("<HHI", group, elem, len(value)) + value
    if vr in (b"OB", b"SQ", b"UN", b"UT", b"OW"):
        return struct.pack("<HH", group, elem) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value) & 0xFFFF) + value


elements = st.tuples(st.sampled_from([0x0008, 0x0010, 0x0020, 0x0000, 0x0002, 0xFFFE, 0x7FE0, 0x0009]),
                     st.integers(0, 0xFFFF), st.sampled_from([b"PN", b"UI", b"DA", b"SQ", b"UN", b"CS", b"US",
                                                              b"OB", b"\0\0", b"ZZ"]),
                     st.binary(max_size=80))


@given(model=st.sampled_from(MODELS), explicit=st.booleans(), items=st.lists(elements, max_size=10),
       tail=st.binary(max_size=16))
def test_any_identifier_bytes_get_a_status(archive, model, explicit, items, tail):
    """The identifier as it comes off the wire: decoded inside the engine, never a crash."""
    level = _element(0x0008, 0x0052, b"CS", b"STUDY ", explicit)
    raw = level + b"".join(_element(g, e, vr, v, explicit) for g, e, vr, v in sorted(items)) + tail
    _answers(archive, model, lambda: decode(BytesIO(raw), not explicit, True, False), explicit)
