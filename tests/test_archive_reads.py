"""The archive's typed reads for the DICOM services and `m3dicom status` (archive.query, archive.status)."""
from __future__ import annotations

import pydicom
import pytest
from pydicom.dataset import Dataset

from archive import Archive, query, status
from helpers import synthetic_instances


@pytest.fixture
def stored(tmp_path, index_url):
    """Two studies in an archive whose index is SQLite or PostgreSQL (each test runs on both)."""
    archive = Archive(tmp_path / "var", index_url=index_url)
    paths = synthetic_instances(tmp_path / "a", 5) + synthetic_instances(tmp_path / "b", 2)
    for path in paths:
        archive.ingest_file(path)
    yield archive, [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    archive.close()


def _study(uid: str) -> query.Query:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = uid
    return query.Query(query.STUDY_ROOT, identifier)


def test_a_retrieve_reads_its_instances_a_page_at_a_time(stored):
    archive, datasets = stored
    study = _study(datasets[0].StudyInstanceUID)
    assert query.instance_count(archive.index, study) == 5
    assert query.instance_kinds(archive.index, study, 10) == [(datasets[0].SOPClassUID,
                                                                 datasets[0].file_meta.TransferSyntaxUID)]
    first = query.instances(archive.index, study, 0, 3)
    rest = query.instances(archive.index, study, first[-1].pk, 3)
    assert [m.sop_instance_uid for m in first + rest] == [d.SOPInstanceUID for d in datasets[:5]]
    assert query.instances(archive.index, study, rest[-1].pk, 3) == []


def test_stored_names_only_what_the_node_holds(stored):
    archive, datasets = stored
    found = query.stored(archive.index, [datasets[0].SOPInstanceUID, "1.2.3.999", datasets[6].SOPInstanceUID])
    assert set(found) == {datasets[0].SOPInstanceUID, datasets[6].SOPInstanceUID}
    assert found[datasets[0].SOPInstanceUID].sop_class_uid == datasets[0].SOPClassUID
    assert query.stored(archive.index, []) == {}


def test_find_yields_encoded_matches_and_status_counts_what_is_held(stored):
    archive, datasets = stored
    matches = query.find(archive.index, _study("*"), explicit_vr=True)
    assert isinstance(next(matches), bytes)
    matches.close()
    assert status.counts(archive.index) == status.Counts(instances=7, studies=2)
    assert status.conflicts(archive.index) == []
