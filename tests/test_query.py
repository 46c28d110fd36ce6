"""C-FIND matching: the query engine over a real index, then dcmtk findscu over TLS."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import text

from archive import Archive
from archive.query import PATIENT_ROOT, STUDY_ROOT, Query, QueryError
from helpers import data_file

# (patient id, name, study date, time, accession, modalities, series per study, charset)
PEOPLE = [
    ("P1", "Smith^John", "20240115", "093000", "ACC1", ("CT", "MR"), "ISO_IR 100"),
    ("P2", "SMITHERS^Anna", "20240220", "141500.25", "ACC2", ("CT",), None),
    ("P3", "O'Brien^Pat", "20231231", "2359", "A'3", ("MR",), None),
    ("P4", "Müller^Jörg", "20240301", "080000", "ACC4", ("US",), "ISO_IR 100"),
    ("P5", "100%_Test^X", "20240116", "120000", "AC_5", ("CT",), None),
]


def build_studies(directory: Path) -> dict[str, dict]:
    """One study per person, one series per modality, two images per series."""
    directory.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(data_file("CT_small.dcm"))
    studies = {}
    for pid, name, date, time, accession, modalities, charset in PEOPLE:
        study = generate_uid()
        studies[pid] = {"study": study, "series": {}, "files": []}
        for number, modality in enumerate(modalities, 1):
            series = generate_uid()
            studies[pid]["series"][modality] = series
            for image in (1, 2):
                ds = template.copy()
                if charset:
                    ds.SpecificCharacterSet = charset
                elif "SpecificCharacterSet" in ds:
                    del ds.SpecificCharacterSet
                ds.PatientID, ds.PatientName, ds.StudyDate, ds.StudyTime = pid, name, date, time
                ds.AccessionNumber, ds.Modality, ds.StudyInstanceUID = accession, modality, study
                ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series, number, image
                ds.StudyDescription = f"study of {pid}"
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                path = directory / f"{pid}-{modality}-{image}.dcm"
                ds.save_as(path, enforce_file_format=True)
                studies[pid]["files"].append(path)
    return studies


@pytest.fixture(scope="module")
def filled(tmp_path_factory, module_index_url):
    """The test studies in an archive whose index is SQLite or PostgreSQL (each test runs on both)."""
    root = tmp_path_factory.mktemp("query")
    studies = build_studies(root / "files")
    archive = Archive(root / "var", index_url=module_index_url)
    for entry in studies.values():
        for path in entry["files"]:
            assert archive.ingest_file(path).outcome.ok
    yield archive, studies
    archive.close()


def find(archive, model=STUDY_ROOT, ci=True, **keys) -> list[Dataset]:
    identifier = Dataset()
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    with archive.index.reader() as conn:
        return list(Query(model, identifier, case_insensitive_names=ci).run(conn))


def ids(results) -> list[str]:
    return sorted(str(r.PatientID) for r in results)


@pytest.mark.parametrize("keys,expected", [
    ({"PatientName": "Smith*"}, ["P1", "P2"]),                 # wildcard, case-insensitive
    ({"PatientName": "smith^john"}, ["P1"]),                   # single value, case-insensitive
    ({"PatientName": "S?ITH^*"}, ["P1"]),
    ({"PatientName": "*"}, ["P1", "P2", "P3", "P4", "P5"]),   # universal
    ({"PatientName": ""}, ["P1", "P2", "P3", "P4", "P5"]),
    ({"PatientName": "müller*"}, ["P4"]),                      # non-ASCII, case-insensitive
    ({"PatientName": "O'Brien*"}, ["P3"]),                     # quote is literal
    ({"PatientName": "' OR 1=1--"}, []),
    ({"PatientName": "100%_Test^X"}, ["P5"]),                  # % and _ are literal
    ({"PatientName": "%"}, []),
    ({"PatientName": "_*"}, []),
    ({"PatientName": "[S]*"}, []),                              # GLOB classes are literal too
    ({"PatientName": "100%*"}, ["P5"]),                         # a prefix: % and _ literal there too
    ({"PatientName": "100%_*"}, ["P5"]),
    ({"AccessionNumber": "AC_*"}, ["P5"]),                      # not ACC1
    ({"PatientName": "mü*"}, ["P4"]),                           # a prefix ending in a non-ASCII letter
    ({"PatientName": "SMITH^*"}, ["P1"]),                       # not SMITHERS
    ({"StudyDate": "20240115"}, ["P1"]),
    ({"StudyDate": "20240101-20240131"}, ["P1", "P5"]),        # range
    ({"StudyDate": "-20231231"}, ["P3"]),
    ({"StudyDate": "20240220-"}, ["P2", "P4"]),
    ({"StudyTime": "0900-1000"}, ["P1"]),                      # time range
    ({"StudyTime": "1415"}, ["P2"]),                           # minute precision
    ({"StudyTime": "2359-"}, ["P3"]),
    ({"AccessionNumber": "A'3"}, ["P3"]),
    ({"AccessionNumber": "AC_5"}, ["P5"]),
    ({"AccessionNumber": "AC?5"}, ["P5"]),
    ({"AccessionNumber": "acc1"}, []),                         # case-sensitive outside names
    ({"ModalitiesInStudy": "MR"}, ["P1", "P3"]),
    ({"ModalitiesInStudy": ["US", "MR"]}, ["P1", "P3", "P4"]),  # list
    ({"StudyDate": "20240115", "AccessionNumber": "ACC2"}, []),  # every key must match
    ({"StudyDate": "20240115", "AccessionNumber": "ACC1"}, ["P1"]),
])
def test_study_level_matching(filled, keys, expected):
    archive, _ = filled
    assert ids(find(archive, QueryRetrieveLevel="STUDY", **{"PatientID": "", **keys})) == expected


def test_uid_list_matching_and_returned_keys(filled):
    archive, studies = filled
    wanted = [studies["P1"]["study"], studies["P4"]["study"]]
    results = find(archive, QueryRetrieveLevel="STUDY", StudyInstanceUID=wanted, PatientName="",
                   ModalitiesInStudy="", NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="",
                   StudyDate="")
    by_id = {str(r.StudyInstanceUID): r for r in results}
    assert set(by_id) == set(wanted)
    p1 = by_id[studies["P1"]["study"]]
    assert list(p1.ModalitiesInStudy) == ["CT", "MR"]
    assert (p1.NumberOfStudyRelatedSeries, p1.NumberOfStudyRelatedInstances) == (2, 4)
    assert p1.StudyDate == "20240115" and str(p1.PatientName) == "Smith^John"
    p4 = by_id[studies["P4"]["study"]]
    assert p4.SpecificCharacterSet == "ISO_IR 192" and str(p4.PatientName) == "Müller^Jörg"
    assert all("PatientID" not in r for r in results) and all(0x0002 not in (e.tag.group for e in r)
                                                                 for r in results)


def test_a_page_of_matches_by_limit_and_offset(filled):
    """QIDO-RS pages with limit and offset (archive.query.find), in the order of reception, on both engines."""
    from contextlib import closing

    from archive.query import find as find_matches

    archive, _ = filled
    identifier = Dataset()
    identifier.QueryRetrieveLevel, identifier.StudyInstanceUID = "STUDY", ""
    everything = [str(r.StudyInstanceUID) for r in find(archive, QueryRetrieveLevel="STUDY", StudyInstanceUID="")]
    assert len(everything) >= 4

    def page(limit, offset):
        with closing(find_matches(archive.index, Query(STUDY_ROOT, identifier), limit, offset=offset)) as found:
            return [str(r.StudyInstanceUID) for r in found]

    assert page(2, 0) + page(2, 2) == everything[:4]
    assert page(None, 1) == everything[1:] and page(2, len(everything)) == []


def test_levels_and_models(filled):
    archive, studies = filled
    patients = find(archive, PATIENT_ROOT, QueryRetrieveLevel="PATIENT", PatientName="SMITH*",
                    NumberOfPatientRelatedStudies="", NumberOfPatientRelatedInstances="")
    assert [(r.PatientID, r.NumberOfPatientRelatedStudies, r.NumberOfPatientRelatedInstances)
            for r in patients] == [("P1", 1, 4), ("P2", 1, 2)]
    series = find(archive, QueryRetrieveLevel="SERIES", StudyInstanceUID=studies["P1"]["study"], Modality="MR",
                  NumberOfSeriesRelatedInstances="", SeriesNumber="")
    assert [(r.SeriesInstanceUID, r.NumberOfSeriesRelatedInstances, r.SeriesNumber) for r in series] == [
        (studies["P1"]["series"]["MR"], 2, 2)]
    images = find(archive, QueryRetrieveLevel="IMAGE", SeriesInstanceUID=studies["P1"]["series"]["CT"],
                  InstanceNumber="2", SOPClassUID="")
    assert len(images) == 1 and images[0].InstanceNumber == 2 and images[0].SOPClassUID == pydicom.dcmread(
        data_file("CT_small.dcm")).SOPClassUID
    assert images[0].StudyInstanceUID == studies["P1"]["study"]  # unique keys of the levels above
    sized = find(archive, QueryRetrieveLevel="IMAGE", SeriesInstanceUID=studies["P1"]["series"]["CT"], Columns="128",
                 Rows="", BitsAllocated="", NumberOfFrames="")
    assert [(r.Rows, r.Columns, r.BitsAllocated, r.NumberOfFrames) for r in sized] == [(128, 128, 16, "")] * 2
    assert find(archive, QueryRetrieveLevel="IMAGE", SeriesInstanceUID=studies["P1"]["series"]["CT"],
                Columns="64") == []                             # the key matches, not only comes back
    with pytest.raises(QueryError) as exc:
        find(archive, STUDY_ROOT, QueryRetrieveLevel="PATIENT")
    assert exc.value.status == 0xA900


def test_unknown_and_lower_level_keys_come_back_empty(filled):
    archive, _ = filled
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientID = "P2"
    identifier.InstitutionName = "ignored"           # not held by the index
    identifier.SOPInstanceUID = ""                    # a lower level
    identifier.add_new(0x00091010, "LO", "private")
    with archive.index.reader() as conn:
        query = Query(STUDY_ROOT, identifier)
        (result,) = list(query.run(conn))
    assert query.unsupported and result.InstitutionName in (None, "") and result.SOPInstanceUID in (None, "")
    assert result[0x00091010].value in (None, "")


ENCODED = [
    (STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "PatientName": "", "PatientID": "", "StudyDate": "", "StudyTime": "",
                  "AccessionNumber": "", "StudyDescription": "", "ReferringPhysicianName": "", "StudyID": "",
                  "ModalitiesInStudy": "", "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": "",
                  "StudyInstanceUID": "", "InstitutionName": "", "ReferencedStudySequence": [],
                  "InstanceAvailability": "", "SpecificCharacterSet": ""}),
    (PATIENT_ROOT, {"QueryRetrieveLevel": "PATIENT", "PatientName": "*", "PatientBirthDate": "", "PatientSex": "",
                    "NumberOfPatientRelatedStudies": "", "NumberOfPatientRelatedSeries": "",
                    "NumberOfPatientRelatedInstances": ""}),
    (STUDY_ROOT, {"QueryRetrieveLevel": "SERIES", "Modality": "", "SeriesNumber": "", "SeriesDescription": "",
                  "BodyPartExamined": "", "NumberOfSeriesRelatedInstances": "", "SeriesInstanceUID": ""}),
    (PATIENT_ROOT, {"QueryRetrieveLevel": "IMAGE", "PatientID": "P4", "SOPClassUID": "", "InstanceNumber": "",
                    "SOPInstanceUID": "", "Modality": "", "StudyDate": "", "ImageComments": "",
                    "Rows": "", "Columns": "", "BitsAllocated": "", "NumberOfFrames": "", (0x0009, 0x1010): "LO"}),
]


@pytest.mark.parametrize("explicit_vr", [True, False], ids=["explicit", "implicit"])
@pytest.mark.parametrize("model,keys", ENCODED, ids=["study", "patient", "series", "image"])
def test_encoded_matches_are_the_bytes_pydicom_writes(filled, model, keys, explicit_vr):
    """The C-FIND fast path sends `Query.encoded`; the stock path pydicom's encoding of `run`."""
    from pynetdicom.dsutils import encode

    archive, _ = filled
    identifier = Dataset()
    for keyword, value in keys.items():
        if isinstance(keyword, tuple):
            identifier.add_new(keyword, value, None)
        else:
            setattr(identifier, keyword, value)
    with archive.index.reader() as conn:
        query = Query(model, identifier, retrieve_ae="M3DICOM")
        datasets, encoded = list(query.run(conn)), list(query.encoded(conn, explicit_vr))
    assert len(encoded) == len(datasets) >= 2
    for dataset, ours in zip(datasets, encoded):
        assert ours == encode(dataset, not explicit_vr, True, False), dataset


@pytest.mark.parametrize("explicit_vr", [True, False], ids=["explicit", "implicit"])
def test_an_image_size_that_is_not_a_us_is_answered_empty_on_both_paths(tmp_path, explicit_vr):
    """Rows written by a file as UL 70000 (pydicom reads what the file says) is not indexed; a value the index
    holds out of US range (an older node's) is answered empty by the fast path and pydicom's alike."""
    from pydicom.dataelem import DataElement
    from pynetdicom.dsutils import encode

    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    ds["Rows"] = DataElement(0x00280010, "UL", 70000)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / "ul-rows.dcm"
    ds.save_as(path, enforce_file_format=True)
    archive = Archive(tmp_path / "var")
    try:
        assert archive.ingest_file(path).outcome.ok
        assert archive.index.read(text("SELECT pixel_rows, pixel_columns FROM instances")) == [(None, 128)]
        with archive.index.write() as conn:
            conn.execute(text("UPDATE instances SET pixel_rows = 70000, bits_allocated = -1"))
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "IMAGE"
        identifier.Rows = identifier.BitsAllocated = identifier.Columns = ""
        with archive.index.reader() as conn:
            query = Query(STUDY_ROOT, identifier)
            (dataset,), (ours,) = list(query.run(conn)), list(query.encoded(conn, explicit_vr))
        assert (dataset.Rows, dataset.BitsAllocated, dataset.Columns) == ("", "", 128)
        assert ours == encode(dataset, not explicit_vr, True, False)
    finally:
        archive.close()


@pytest.mark.parametrize("keys,message", [
    ({"StudyDate": "2024-01-01"}, "StudyDate"),
    ({"StudyDate": "yesterday"}, "StudyDate"),
    ({"StudyTime": "25h"}, "StudyTime"),
    ({"PatientName": "A" * 5000}, "longer than 1024"),
    ({"PatientName": "\\".join(f"A{i}*" for i in range(1000))}, "1000 wildcard or range values"),
    ({"StudyDate": "\\".join([f"2024{m:02d}01-2024{m:02d}02" for m in range(1, 13)] * 3)}, "at most 32"),
    ({"ModalitiesInStudy": "\\".join(["CT", "MR"] * 40)}, "at most 32"),
    ({"PatientID": "\\".join(str(i) for i in range(1001))}, "1001 values, at most 1000"),
])
def test_bad_values_are_refused_with_a_reason(filled, keys, message):
    archive, _ = filled
    with pytest.raises(QueryError, match=message):
        find(archive, QueryRetrieveLevel="STUDY", **keys)


def test_a_thousand_exact_values_and_a_few_wildcards_are_answered(filled):
    """Exact values go into one IN list: SQLite's expression depth (1000) is never reached."""
    archive, _ = filled
    names = [f"Nobody^{i}" for i in range(990)] + ["smith^jo*"] * 10
    assert ids(find(archive, QueryRetrieveLevel="STUDY", PatientID="", PatientName="\\".join(names))) == ["P1"]
    some_ids = [f"X{i}" for i in range(999)] + ["P1"]
    assert ids(find(archive, QueryRetrieveLevel="STUDY", PatientID="\\".join(some_ids))) == ["P1"]


def test_names_case_sensitive_when_configured(filled):
    archive, _ = filled
    assert ids(find(archive, ci=False, QueryRetrieveLevel="STUDY", PatientID="", PatientName="smith*")) == []
    assert ids(find(archive, ci=False, QueryRetrieveLevel="STUDY", PatientID="", PatientName="Smith*")) == ["P1"]


# -- dcmtk findscu over TLS against a node filled by storescu ------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory, pki):
    from helpers import Node

    root = tmp_path_factory.mktemp("findscu")
    studies = build_studies(root / "files")
    node = Node(root / "node", pki, query={"max_results": 3}).start()
    node.storescu(*[p for entry in studies.values() for p in entry["files"]])
    yield node, studies
    node.stop()


def findscu(node, model: str, *keys: str, check: bool = True) -> tuple[list[Dataset], str]:
    out = Path(node.workdir) / f"find-{os.getpid()}"
    out.mkdir(exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    cmd = ["findscu", *node.tls_args(), "-aet", "FINDSCU", "-aec", "M3DICOM", model, "-v", "-X", "-od", str(out)]
    for key in keys:
        cmd += ["-k", key]
    result = subprocess.run(cmd + ["127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "TCP_NODELAY": "1"})
    if check:
        assert result.returncode == 0, result.stderr
    return [pydicom.dcmread(p) for p in sorted(out.iterdir())], result.stdout + result.stderr


@pytest.mark.interop
@pytest.mark.parametrize("model,keys,expected", [
    ("-P", ["QueryRetrieveLevel=PATIENT", "PatientName=smith*", "PatientID"], ["P1", "P2"]),
    ("-S", ["QueryRetrieveLevel=STUDY", "StudyDate=20240101-20240131", "PatientID"], ["P1", "P5"]),
    ("-S", ["QueryRetrieveLevel=STUDY", "ModalitiesInStudy=US\\MR", "PatientID"], ["P1", "P3", "P4"]),
    ("-P", ["QueryRetrieveLevel=STUDY", "PatientID=P3", "AccessionNumber=A'3"], ["P3"]),
    ("-S", ["QueryRetrieveLevel=SERIES", "Modality=MR", "PatientID"], ["P1", "P3"]),
    ("-P", ["QueryRetrieveLevel=SERIES", "PatientID=P1", "Modality=CT\\MR", "SeriesNumber"], ["P1", "P1"]),
    ("-S", ["QueryRetrieveLevel=IMAGE", "AccessionNumber=ACC2", "InstanceNumber", "PatientID"], ["P2", "P2"]),
    ("-P", ["QueryRetrieveLevel=IMAGE", "PatientName=O'Brien*", "InstanceNumber=1", "PatientID"], ["P3"]),
])
def test_findscu_levels_and_models(served, model, keys, expected):
    node, _ = served
    results, _ = findscu(node, model, *keys)
    assert sorted(str(r.PatientID) for r in results) == expected


@pytest.mark.interop
def test_findscu_image_level_uid_list(served):
    node, studies = served
    series = studies["P1"]["series"]
    results, _ = findscu(node, "-S", "QueryRetrieveLevel=IMAGE", f"SeriesInstanceUID={series['CT']}\\{series['MR']}",
                         "SOPInstanceUID", "InstanceNumber=2", "Rows", "Columns=128", "BitsAllocated", "NumberOfFrames")
    assert sorted(str(r.SeriesInstanceUID) for r in results) == sorted([series["CT"], series["MR"]])
    assert {(r.InstanceNumber, r.Rows, r.Columns, r.BitsAllocated) for r in results} == {(2, 128, 128, 16)}
    assert all(r.NumberOfFrames in (None, "") for r in results)                # single-frame: empty


@pytest.mark.interop
def test_findscu_result_limit_and_hostile_values(served):
    node, _ = served
    results, log = findscu(node, "-S", "QueryRetrieveLevel=STUDY", "PatientID", check=False)
    assert len(results) == 3 and "Refused: OutOfResources" in log, log  # max_results = 3 here, 5 studies held
    results, _ = findscu(node, "-S", "QueryRetrieveLevel=STUDY", "PatientName=' OR 1=1--")
    assert results == []
    results, log = findscu(node, "-S", "QueryRetrieveLevel=STUDY", "StudyDate=2024-13", check=False)
    assert results == [] and "StudyDate" in log
    for key in ("StudyDate=-", "StudyTime=-"):           # matched nothing, with success (the attack pass)
        results, log = findscu(node, "-S", "QueryRetrieveLevel=STUDY", key, check=False)
        assert results == [] and "Failed: UnableToProcess" in log, log              # 0xC000, with the reason
    results, _ = findscu(node, "-S", "QueryRetrieveLevel=STUDY", "PatientName=" + "X" * 60 + "*")
    assert results == []
    results, _ = findscu(node, "-S", "QueryRetrieveLevel=STUDY", "PatientID=P2", "InstitutionName")
    assert [str(r.PatientID) for r in results] == ["P2"]


@pytest.mark.interop
def test_fast_path_answers_as_pynetdicom_does(served):
    """Little Endian contexts take the C-FIND fast path, Big Endian pynetdicom's own: same answers."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    from scp.tls import client_context

    node, studies = served
    tls = client_context(node.pki / "ca.pem", node.pki / "client.pem", node.pki / "client.key")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientName = "*er*"               # SMITHERS, Müller
    for keyword in ("PatientID", "StudyDate", "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
                    "StudyInstanceUID", "InstitutionName"):
        setattr(identifier, keyword, "")
    answers = {}
    for syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian):
        ae = AE(ae_title="BOTHPATHS")
        ae.add_requested_context(FIND, [syntax])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="M3DICOM", tls_args=(tls, "localhost"))
        assert assoc.is_established and assoc.accepted_contexts[0].transfer_syntax[0] == syntax
        try:
            answers[syntax] = [(status.Status, ds) for status, ds in assoc.send_c_find(identifier, FIND)]
        finally:
            assoc.release()
    fast = answers[ImplicitVRLittleEndian]
    assert [status for status, _ in fast] == [0xFF01, 0xFF01, 0x0000]   # InstitutionName: not held
    assert sorted(str(ds.PatientID) for _, ds in fast[:-1]) == ["P2", "P4"]
    assert "ISO_IR 192" in [ds.get("SpecificCharacterSet") for _, ds in fast[:-1]]
    for syntax, other in answers.items():
        assert other == fast, syntax


@pytest.mark.interop
def test_c_cancel_stops_a_running_query(make_node):
    from dataclasses import replace

    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    from archive.dicomfile import inspect
    from archive.index import Index

    node = make_node(start=False, query={"max_results": 65535})
    archive = Archive(node.data_dir)
    header = inspect(data_file("CT_small.dcm"))
    with archive.index.write() as conn:  # index rows only: C-FIND never reads the blobs
        for _ in range(5000):
            Index.upsert_hierarchy(conn, replace(header, study_uid=generate_uid(), series_uid=generate_uid()), 0)
    archive.close()
    node.start()
    assoc = node.associate("CANCELLER", FIND)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    statuses = []
    try:
        for status, _ in assoc.send_c_find(identifier, FIND, msg_id=7):
            statuses.append(status.Status)
            if len(statuses) == 1:
                assoc.send_c_cancel(7, assoc.accepted_contexts[0].context_id)
    finally:
        assoc.release()
    assert statuses[-1] == 0xFE00 and len(statuses) < 5000, (hex(statuses[-1]), len(statuses))


@pytest.mark.parametrize("keys,index,pg_index", [
    ({"QueryRetrieveLevel": "STUDY", "PatientName": "SMI*"}, "patients_name_key", "patients_name_key_pattern"),
    ({"QueryRetrieveLevel": "STUDY", "PatientID": "P1"}, "patients_patient_id", "patients_(patient_)?id(_pattern)?"),
    ({"QueryRetrieveLevel": "STUDY", "PatientID": "P*"}, "patients_patient_id", "patients_patient_id_pattern"),
    ({"QueryRetrieveLevel": "STUDY", "StudyDate": "20240101-20240131"}, "studies_date", "studies_date"),
    ({"QueryRetrieveLevel": "STUDY", "AccessionNumber": "ACC1"}, "studies_accession", "studies_accession(_pattern)?"),
    ({"QueryRetrieveLevel": "STUDY", "AccessionNumber": "AC*"}, "studies_accession", "studies_accession_pattern"),
    ({"QueryRetrieveLevel": "STUDY", "ReferringPhysicianName": "WHO*"}, None,
     "studies_referring_physician_key_pattern"),
    ({"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "1.2.3"}, "sqlite_autoindex_studies_1",
     "studies_study_uid_key"),
    ({"QueryRetrieveLevel": "IMAGE", "SeriesInstanceUID": "1.2.3"}, "sqlite_autoindex_series_1",
     "series_series_uid_key"),
])
def test_selective_queries_use_an_index(filled, keys, index, pg_index):
    """A query stays fast as the archive grows: it searches an index, never scans. PostgreSQL plans by
    statistics (a seq scan of these few rows is cheaper): with seq scans priced out, the plan must still
    search the index by the key (a prefix LIKE needs the text_pattern_ops indexes of archive_0003 where
    the database's collation is not "C", as in the test cluster; `=` may use either index)."""
    archive, _ = filled
    identifier = Dataset()
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    query = Query(STUDY_ROOT, identifier)
    with archive.index.reader() as conn:
        if archive.index.sqlite:
            if index is None:
                pytest.skip("no index for this key on SQLite")
            explained = conn.execute(text("EXPLAIN QUERY PLAN " + query.sql_for(conn.dialect)), query.params)
            plan = " ".join(row[3] for row in explained)
            assert f"USING INDEX {index}" in plan or f"USING COVERING INDEX {index}" in plan, plan
            return
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(row[0] for row in conn.execute(text("EXPLAIN " + query.sql_for(conn.dialect)), query.params))
    assert re.search(rf"(Index Scan using|Index Only Scan using|Bitmap Index Scan on) {pg_index}\b", plan), plan



def test_c_find_statements_are_planned_for_their_values(filled):
    """PostgreSQL: a C-FIND statement is never prepared on the server (psycopg prepares one after five runs
    on a connection): prepared, it may be given a generic plan for good, and the generic plan of a prefix
    (`LIKE $1`) cannot use the text_pattern_ops index: it reads every patient."""
    archive, _ = filled
    if archive.index.sqlite:
        pytest.skip("PostgreSQL's plan cache")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientName = "SMI*"
    with archive.index.reader() as conn:
        for _ in range(8):
            assert list(Query(STUDY_ROOT, identifier).run(conn))
        prepared = conn.execute(text("SELECT statement FROM pg_prepared_statements "
                                     "WHERE statement LIKE '%patient_name_key LIKE%'")).fetchall()
    assert prepared == []

def test_a_query_past_its_time_limit_ends_with_a_timeout(tmp_path, index_url):
    """Every match is fetched within `timeout` seconds of work in the database, or none is answered
    (C-FIND: 0xA700), on both engines; a generous limit answers them all."""
    from archive.index import Index
    from archive.query import QueryTimeout
    from bench.query import fill

    index = Index(index_url or tmp_path / "index.sqlite3")
    try:
        fill(index, 5000)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "IMAGE"
        identifier.PatientName = "*A*"
        identifier.SOPInstanceUID = identifier.NumberOfStudyRelatedInstances = ""
        query = Query(PATIENT_ROOT, identifier)
        with index.reader() as conn:
            with pytest.raises(QueryTimeout, match="more than 0.001 s"):
                list(query.run(conn, timeout=0.001))
        with index.reader() as conn:
            assert len(list(query.run(conn, timeout=60))) > 1000
    finally:
        index.close()
