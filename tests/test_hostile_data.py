"""Damaged and hostile data sets (issue 14, items 3, 4 and 8), over real associations.

A deflate bomb, a data set nested 600 deep and three instances that contradict the
hierarchy: each is answered with a failure status the peer can read, with bounded
memory, one log line and no traceback; everything stored before is unchanged and a
real storescu still stores within 2 s. Then the readers of stored files (viewer,
plug-ins) facing the same bombs, and fuzzing of the data set inspector.
"""
from __future__ import annotations

import io
import os
import struct
import subprocess
import tempfile
import time
import tracemalloc
import zlib
from pathlib import Path

import pydicom
import pytest
from hypothesis import given, strategies as st
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         generate_uid)
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import (CTImageStorage, PatientRootQueryRetrieveInformationModelFind,
                                  PatientRootQueryRetrieveInformationModelGet, Verification)
from sqlalchemy import text

from archive import Archive, Limits, Outcome
from archive.dicomfile import (DEFAULT_LIMITS, InvalidInstance, PixelsTooLarge, _Malformed, check_pixels,
                               check_structure, inspect)
from helpers import _toml, data_file, dataset_sha256, synthetic_instances, wait_for
from scp.handlers import RATE_WINDOW, Reception
from test_hostile_network import MiB, _flood, _fragments, _is_abort, _p_data, _peak_rss, _store_rq, _until_closed
from test_hostile_network import _associate as raw_association

# -- data sets made byte by byte ----------------------------------------------------------------

_LONG = {b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV", b"SV", b"UV"}
UNDEFINED = 0xFFFFFFFF


def element(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little endian element; `length` overrides the encoded length."""
    length = len(value) if length is None else length
    if vr in _LONG:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, length) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, length) + value


def item(value: bytes, length: int | None = None) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(value) if length is None else length) + value


ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def uid_value(uid: str) -> bytes:
    data = uid.encode()
    return data + b"\0" * (len(data) % 2)


def text_value(text: str) -> bytes:
    data = text.encode()
    return data + b" " * (len(data) % 2)


def identity(sop_instance: str, study: str | None = None, series: str | None = None,
             patient_id: str = "HOSTILE-1", patient_name: str = "Hostile^Data") -> tuple[bytes, bytes]:
    """The elements before (0008,1115) and those after it, in tag order."""
    before = (element(0x00080016, b"UI", uid_value(CTImageStorage))
              + element(0x00080018, b"UI", uid_value(sop_instance))
              + element(0x00080060, b"CS", text_value("CT")))
    after = (element(0x00100010, b"PN", text_value(patient_name)) + element(0x00100020, b"LO", text_value(patient_id))
             + element(0x0020000D, b"UI", uid_value(study or generate_uid()))
             + element(0x0020000E, b"UI", uid_value(series or generate_uid())))
    return before, after


def nested(depth: int, undefined: bool = True) -> bytes:
    """Referenced Series Sequence (0008,1115) holding one item holding the sequence again, `depth` deep."""
    inner = element(0x00081030, b"LO", text_value("bottom"))
    for _ in range(depth):
        if undefined:
            inner = element(0x00081115, b"SQ", item(inner + ITEM_END, UNDEFINED) + SEQUENCE_END, UNDEFINED)
        else:
            inner = element(0x00081115, b"SQ", item(inner))
    return inner


def part10(dataset: bytes, sop_instance: str, syntax: str = ExplicitVRLittleEndian) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.9.7433.1"
    buffer = io.BytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + buffer.getvalue() + dataset


def deflate_bomb(sop_instance: str, inflated: int = 2 << 30, **ids) -> bytes:
    """A Deflated Explicit VR Little Endian file of about inflated/1000 bytes whose data set
    inflates to `inflated` bytes: a valid header, then Pixel Data of zeros.

    Made in a few milliseconds: zeros deflated after a full flush always give the same
    bytes, so one compressed MiB is repeated.
    """
    before, after = identity(sop_instance, **ids)
    head = before + after + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, inflated)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = deflater.compress(head) + deflater.flush(zlib.Z_FULL_FLUSH)
    mib = deflater.compress(bytes(1 << 20)) + deflater.flush(zlib.Z_FULL_FLUSH)
    assert deflater.compress(bytes(1 << 20)) + deflater.flush(zlib.Z_FULL_FLUSH) == mib
    stream = start + mib * (inflated >> 20) + deflater.flush()
    return part10(stream, sop_instance, DeflatedExplicitVRLittleEndian)


def deep_file(sop_instance: str, depth: int = 600, undefined: bool = True) -> bytes:
    before, after = identity(sop_instance)
    return part10(before + nested(depth, undefined) + after, sop_instance)


# -- the node, after an attack ------------------------------------------------------------------

@pytest.fixture(autouse=True)
def datasets_sent_from_files(monkeypatch):
    """pynetdicom's chunked send streams a file's bytes untouched (it does not parse them)."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


def send_raw(node, path: Path, syntax: str = ExplicitVRLittleEndian, tls: bool = True):
    """C-STORE the file's bytes as they are: (status, error comment)."""
    assoc = _associate(node, syntax, tls)
    try:
        status = assoc.send_c_store(path)
        return int(status.Status), str(status.get("ErrorComment", ""))
    finally:
        assoc.release()


def _associate(node, syntax: str, tls: bool):
    from pynetdicom import AE, evt

    from scp.tls import client_context, no_delay

    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(CTImageStorage, [syntax])
    options = {"evt_handlers": [(evt.EVT_CONN_OPEN, no_delay)]}
    if tls:
        options["tls_args"] = (client_context(node.pki / "ca.pem", node.pki / "client.pem", node.pki / "client.key"),
                               "localhost")
    assoc = ae.associate("127.0.0.1", node.port if tls else node.plain_port, ae_title="M3DICOM", **options)
    assert assoc.is_established, node.log()[-2000:]
    return assoc


def peak_rss(node) -> dict[int, int]:
    """pid -> the highest resident memory each process of the node has had (VmHWM), bytes."""
    peaks = {}
    for proc in node.processes():
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            continue
        kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        peaks[proc.pid] = kib << 10
    return peaks


def grew(before: dict[int, int], after: dict[int, int]) -> int:
    """The largest growth of one process's peak memory (a process new since `before` counts whole)."""
    return max((peak - before.get(pid, 0) for pid, peak in after.items()), default=0)


def stored_before(node, tmp_path) -> dict:
    """A few instances stored before the attack; their state, to compare after."""
    for path in synthetic_instances(tmp_path / "before", 2, patient="Before^Attack", patient_id="BEFORE-1"):
        node.storescu(path)
    state = node.stored_state()
    assert len(state) == 2
    return state


def after_the_attack(node, tmp_path, state: dict) -> None:
    assert {uid: state[uid] for uid in state} == {uid: v for uid, v in node.stored_state().items() if uid in state}
    assert set(state) <= set(node.stored_state())
    assert node.spool_files() == []
    assert "Traceback" not in node.log()
    node.still_serves(tmp_path)


@pytest.mark.interop
@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_a_deflate_bomb_is_refused_with_c000_in_bounded_memory(make_node, tmp_path, tls):
    node = make_node(router={"enabled": False})
    state = stored_before(node, tmp_path)
    blobs = len(node.blob_files())
    uid = generate_uid()
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(deflate_bomb(uid))                         # 2 MB on the wire, 2 GiB inflated
    assert bomb.stat().st_size < 3 << 20
    before = peak_rss(node)
    started = time.monotonic()
    status, comment = send_raw(node, bomb, DeflatedExplicitVRLittleEndian, tls=tls)
    took = time.monotonic() - started
    assert (status, comment) == (0xC000, "deflated data set inflates over 100x (ingest.max_inflate_ratio)"), \
        (hex(status), comment)
    assert grew(before, peak_rss(node)) < 150 << 20, "the bomb was inflated in memory"
    assert took < 10
    assert node.rows("SELECT COUNT(*) FROM instances WHERE sop_instance_uid=?", (uid,)) == [(0,)]
    assert len(node.blob_files()) == blobs
    assert node.log().count("ingest.max_inflate_ratio") == 1    # one log line
    after_the_attack(node, tmp_path, state)


@pytest.mark.interop
def test_a_data_set_nested_600_deep_is_refused_with_c000_and_one_log_line(make_node, tmp_path):
    node = make_node(router={"enabled": False})
    state = stored_before(node, tmp_path)
    for undefined in (True, False):
        uid = generate_uid()
        path = tmp_path / f"deep-{undefined}.dcm"
        path.write_bytes(deep_file(uid, 600, undefined))
        assert send_raw(node, path) == (0xC000, "sequences nested deeper than 32 (ingest.max_sequence_depth)")
        assert node.rows("SELECT COUNT(*) FROM instances WHERE sop_instance_uid=?", (uid,)) == [(0,)]
    assert node.log().count("sequences nested deeper than 32 (ingest.max_sequence_depth)") == 2
    shallow = tmp_path / "shallow.dcm"
    shallow.write_bytes(deep_file(uid := generate_uid(), 12))
    assert send_raw(node, shallow) == (0x0000, "")
    assert node.rows("SELECT COUNT(*) FROM instances WHERE sop_instance_uid=?", (uid,)) == [(1,)]
    state.update({k: v for k, v in node.stored_state().items() if k == uid})
    after_the_attack(node, tmp_path, state)


# -- integrity: a study never mixes patients ----------------------------------------------------

def instance(directory: Path, *, study: str, series: str | None = None, patient_id: str | None,
             patient_name: str, **changes) -> Path:
    """A CT_small copy with these identifiers and a fresh SOP Instance UID."""
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    del ds[0xFFFCFFFC]                                  # storescu would drop the trailing padding
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series or generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientName = patient_name
    if patient_id is None:
        del ds.PatientID
    else:
        ds.PatientID = patient_id
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def getscu_study(node, study: str, out: Path) -> set[str]:
    """SOP Instance UIDs a real getscu retrieves for the study (and the patient IDs in those files)."""
    out.mkdir()
    result = subprocess.run(["getscu", "-S", "-aet", "GETSCU", "-aec", "M3DICOM", "+B", "-od", str(out),
                             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                             "127.0.0.1", str(node.plain_port)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TCP_NODELAY": "1"})
    assert result.returncode == 0, result.stderr
    got = [pydicom.dcmread(p, stop_before_pixels=True) for p in out.iterdir()]
    return {(str(ds.SOPInstanceUID), str(ds.PatientID)) for ds in got}


def find_patients(node, patient_id: str) -> list[tuple[str, str]]:
    """(PatientID, PatientName) answered by C-FIND at PATIENT level."""
    from pydicom.dataset import Dataset

    assoc = node.associate("FINDSCU", PatientRootQueryRetrieveInformationModelFind)
    try:
        query = Dataset()
        query.QueryRetrieveLevel, query.PatientID, query.PatientName = "PATIENT", patient_id, ""
        return [(str(ds.PatientID), str(ds.PatientName))
                for status, ds in assoc.send_c_find(query, PatientRootQueryRetrieveInformationModelFind)
                if status and status.Status in (0xFF00, 0xFF01)]
    finally:
        assoc.release()


@pytest.mark.interop
def test_instances_that_contradict_the_hierarchy_are_refused_and_a_study_returns_one_patient(make_node, tmp_path):
    node = make_node(router={"enabled": False})
    study_a, series_a, study_b = generate_uid(), generate_uid(), generate_uid()
    first = instance(tmp_path / "a", study=study_a, series=series_a, patient_id="PAT-A", patient_name="Alpha^Ann")
    other = instance(tmp_path / "b", study=study_b, patient_id="PAT-B", patient_name="Bravo^Ben")
    node.storescu(first, other)
    state = node.stored_state()
    # 1. the same Patient ID with another name (a new study): stored, the index keeps the first name
    renamed = instance(tmp_path / "c", study=generate_uid(), patient_id="PAT-A", patient_name="Renamed^Ruth")
    assert send_raw(node, renamed) == (0x0000, "")
    # 2. a series UID that belongs to study A, sent as part of study B
    moved = instance(tmp_path / "d", study=study_b, series=series_a, patient_id="PAT-B", patient_name="Bravo^Ben")
    assert send_raw(node, moved) == (0xC000, "series belongs to another study")   # the UID does not fit in 64
    # 3. patient B's ID with study A's UID
    joined = instance(tmp_path / "e", study=study_a, patient_id="PAT-B", patient_name="Bravo^Ben")
    assert send_raw(node, joined) == (0xC000, "study belongs to another patient")
    for path in (moved, joined):
        assert node.rows("SELECT COUNT(*) FROM instances WHERE sop_instance_uid=?", (uid_of(path),)) == [(0,)]
    assert getscu_study(node, study_a, tmp_path / "got-a") == {(uid_of(first), "PAT-A")}
    assert getscu_study(node, study_b, tmp_path / "got-b") == {(uid_of(other), "PAT-B")}
    assert find_patients(node, "PAT-A") == [("PAT-A", "Alpha^Ann")]       # the first name received
    conflicts = node.rows("SELECT sop_instance_uid, attribute, index_value, instance_value, action FROM conflicts "
                          "ORDER BY seq")
    assert conflicts == [(uid_of(renamed), "PatientName", "Alpha^Ann", "Renamed^Ruth", "stored"),
                         (uid_of(moved), "StudyInstanceUID", study_a, study_b, "refused"),
                         (uid_of(joined), "PatientID", "PAT-A", "PAT-B", "refused")]
    log = node.log()
    assert f"SOP Instance {uid_of(joined)} from HOSTILE refused: study belongs to another patient: {study_a}" in log
    for value in ("Alpha", "Bravo", "Renamed", "PAT-A", "PAT-B"):
        assert value not in log, f"patient data in the log: {value}"
    status = node.cli("status").stdout
    assert "2 instances refused" in status and "1 stored whose patient data differs" in status
    assert "m3dicom status --conflicts" in status
    listed = node.cli("status", "--conflicts").stdout
    assert uid_of(joined) in listed and "Renamed^Ruth" in listed
    assert f"  series   {series_a}" in listed                  # the moved series is named
    assert "its series belongs to another study: the index has" in listed
    assert "its study belongs to another patient: the index has 'PAT-A', the instance 'PAT-B'" in listed
    assert "-> not stored: correct it at the sender and send it again" in listed
    # re-sending what was stored is still a no-op; what was refused is refused again, counted
    assert send_raw(node, first) == (0x0000, "")
    assert send_raw(node, joined) == (0xC000, "study belongs to another patient")
    assert node.rows("SELECT received FROM conflicts WHERE sop_instance_uid=?", (uid_of(joined),)) == [(2,)]
    after_the_attack(node, tmp_path, state)


@pytest.mark.interop
def test_with_on_conflict_quarantine_the_instance_is_kept_outside_the_study(make_node, tmp_path):
    node = make_node(router={"enabled": False}, ingest={"on_conflict": "quarantine"})
    study = generate_uid()
    first = instance(tmp_path / "a", study=study, patient_id="PAT-Q1", patient_name="Quebec^One")
    node.storescu(first)
    joined = instance(tmp_path / "b", study=study, patient_id="PAT-Q2", patient_name="Quebec^Two")
    assert send_raw(node, joined) == (0x0000, "")
    assert send_raw(node, joined) == (0x0000, "")                   # again: kept once
    uid = uid_of(joined)
    assert node.rows("SELECT COUNT(*) FROM instances WHERE sop_instance_uid=?", (uid,)) == [(0,)]
    (blob_id,), = node.rows("SELECT blob_id FROM quarantine WHERE sop_instance_uid=?", (uid,))
    assert dataset_sha256(node.stored_bytes_of_blob(blob_id)) == dataset_sha256(joined)   # durable, as sent
    assert getscu_study(node, study, tmp_path / "got") == {(uid_of(first), "PAT-Q1")}
    assert find_patients(node, "PAT-Q2") == []
    assert "1 kept in quarantine, 0 stored" in node.cli("status").stdout    # counted once
    node.stop()
    node.start()                                                    # recovery keeps quarantined blobs
    assert dataset_sha256(node.stored_bytes_of_blob(blob_id)) == dataset_sha256(joined)


# -- readers of stored files: the viewer and plug-ins -------------------------------------------

def lenient_archive(directory: Path) -> Archive:
    """An archive whose limits let bombs in (as a node before this fix did): what readers must survive."""
    return Archive(directory, limits=Limits(max_inflated_bytes=1 << 40, max_inflate_ratio=1 << 20,
                                            max_sequence_depth=64, max_pixel_bytes=1 << 40))


def pixel_bomb(directory: Path, rows: int = 65535, columns: int = 65535, frames: int = 1) -> Path:
    """An RLE instance whose header declares Rows x Columns x Frames of 16-bit pixels (8 GiB at the
    defaults) with a few bytes of data: what would be allocated is what it claims."""
    ds = pydicom.dcmread(data_file("MR_small_RLE.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pixel-bomb.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def j2k_bomb(directory: Path) -> Path:
    """JPEG2000.dcm whose codestream header (SIZ) claims 60000 x 60000 while Rows x Columns stay small."""
    ds = pydicom.dcmread(data_file("JPEG2000.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    data = bytearray(ds.PixelData)
    siz = data.index(b"\xff\x4f\xff\x51")
    struct.pack_into(">II", data, siz + 8, 60000, 60000)
    ds.PixelData = bytes(data)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "j2k-bomb.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_the_viewer_reads_no_bomb_from_storage(tmp_path):
    from viewer.images import Images, NotAnImage

    lenient = lenient_archive(tmp_path / "data")
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(deflate_bomb(generate_uid(), 256 << 20))       # 256 MiB: stored by a lenient archive
    stored = [lenient.ingest_file(p) for p in (bomb, pixel_bomb(tmp_path / "px"), j2k_bomb(tmp_path / "j2k"))]
    deep = tmp_path / "deep.dcm"
    deep.write_bytes(deep_file(generate_uid(), 60))
    stored.append(lenient.ingest_file(deep))
    assert [r.outcome for r in stored] == [Outcome.STORED] * 4
    lenient.close()
    archive = Archive(tmp_path / "data")                            # the viewer's, with the default limits
    images = Images(archive)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInstance, match="inflates over 100x"):
            images.dataset(stored[0].sop_instance_uid)
        for result, reason in zip(stored[1:3], ("declares 8.0 GiB decoded", "larger than the declared")):
            with pytest.raises(NotAnImage, match=reason):
                images.decode(result.sop_instance_uid)
        with pytest.raises(InvalidInstance, match="nested deeper than 32"):
            images.dataset(stored[3].sop_instance_uid)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak >> 20} MiB allocated"
    archive.close()


def test_plug_ins_get_no_bomb_either(tmp_path):
    from gpu_workers.plugin import Instance, PluginError

    for path, reason in ((pixel_bomb(tmp_path / "a"), "declares 8.0 GiB"),
                         (pixel_bomb(tmp_path / "b", 4096, 4096, 100), "declares 3.1 GiB"),
                         (j2k_bomb(tmp_path / "c"), "larger than the declared")):
        plugin_input = Instance(uid_of(path), CTImageStorage, path, DEFAULT_LIMITS)
        with pytest.raises(PluginError, match=reason):
            plugin_input.dataset()
        assert plugin_input.dataset(pixels=False).Rows            # the header alone is fine
    small = Instance("1.2.3", CTImageStorage, data_file("MR_small_RLE.dcm"), Limits(max_pixel_bytes=1 << 20))
    assert small.dataset().pixel_array.shape == (64, 64)


async def logged_in_viewer(tmp_path: Path, aiohttp_client):
    """The viewer app on tmp_path/var (its archive) and a client logged in as a clinician."""
    from node.config import from_dict
    from viewer import accounts
    from viewer.app import create_app

    config = from_dict({"node": {"data_dir": str(tmp_path / "var")}, "viewer": {"tls": False}}, tmp_path)
    archive = Archive(config.data_dir)
    accounts.migrate(archive.index)                 # the viewer's tables, as the node's start makes them
    accounts.add_user(archive.index, "alice", "a long enough password", "clinician")
    client = await aiohttp_client(create_app(config, archive))
    await client.post("/login", data={"user": "alice", "password": "a long enough password", "next": "/studies"},
                      allow_redirects=False)
    return archive, client


async def test_an_uploaded_deflate_bomb_is_refused_and_stores_nothing(tmp_path, aiohttp_client):
    archive, client = await logged_in_viewer(tmp_path, aiohttp_client)
    try:
        page = await (await client.get("/studies")).text()
        token = page.split('name="csrf-token" content="')[1].split('"')[0]
        import aiohttp

        form = aiohttp.FormData()
        form.add_field("files", deflate_bomb(generate_uid()), filename="bomb.dcm",
                       content_type="application/octet-stream")
        tracemalloc.start()
        try:
            answer = await client.post("/api/upload", data=form, headers={"X-CSRF-Token": token})
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert answer.status == 200, await answer.text()
        (result,) = (await answer.json())["files"]
        assert result["outcome"] == "refused" and "inflates over 100x" in result["reason"]
        assert peak < 64 << 20, f"{peak >> 20} MiB allocated"
        assert archive.index.read(text("SELECT COUNT(*) FROM instances"))[0][0] == 0
        assert list(archive.storage.blob_ids()) == []
    finally:
        archive.close()


# -- the inspector's limits, one by one ---------------------------------------------------------

def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / f"{generate_uid()}.dcm"
    path.write_bytes(data)
    return path


def test_inflation_is_bounded_by_size_ratio_and_end_of_stream(tmp_path):
    uid = generate_uid()
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(InvalidInstance, match=r"inflates over 100x \(ingest.max_inflate_ratio\)"):
            inspect(write(tmp_path, deflate_bomb(uid)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20 and time.monotonic() - started < 5
    with pytest.raises(InvalidInstance, match=r"^inflated data set over 16 MiB \(ingest.max_inflated_bytes\)$"):
        inspect(write(tmp_path, deflate_bomb(uid, 32 << 20)), limits=Limits(max_inflated_bytes=16 << 20))
    cut = deflate_bomb(uid, 4 << 20)
    with pytest.raises(InvalidInstance, match="deflate stream does not end"):
        inspect(write(tmp_path, cut[:-100]))
    header = inspect(write(tmp_path, deflate_bomb(uid, 8 << 20)))          # 8 MiB of zeros: a real image may
    assert header.sop_instance_uid == uid and header.transfer_syntax == DeflatedExplicitVRLittleEndian
    assert inspect(data_file("image_dfl.dcm")).transfer_syntax == DeflatedExplicitVRLittleEndian


def test_nesting_is_bounded_in_sequences_of_either_length(tmp_path):
    for undefined in (True, False):
        inspect(write(tmp_path, deep_file(uid := generate_uid(), 32, undefined)))
        with pytest.raises(InvalidInstance, match=r"^sequences nested deeper than 32 \(ingest.max_sequence_depth\)$"):
            inspect(write(tmp_path, deep_file(uid, 33, undefined)))
        with pytest.raises(InvalidInstance, match="nested deeper than 4 "):
            inspect(write(tmp_path, deep_file(uid, 5, undefined)), limits=Limits(max_sequence_depth=4))
        with pytest.raises(InvalidInstance, match="nested deeper"):
            inspect(write(tmp_path, deep_file(uid, 5000, undefined)))      # no RecursionError


def test_the_declared_pixel_size_is_checked_before_decoding(tmp_path):
    for name in ("CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEGLSNearLossless_16.dcm",
                 "emri_small_jpeg_2k_lossless.dcm", "SC_rgb_rle_2frame.dcm"):
        ds = pydicom.dcmread(data_file(name))                          # real images pass
        check_pixels(ds, len(ds.pixel_array.tobytes()))              # exactly what decoding makes
    ds = pydicom.dcmread(pixel_bomb(tmp_path))
    with pytest.raises(PixelsTooLarge, match=r"declares 8.0 GiB decoded, over 1.0 GiB \(ingest.max_pixel_bytes\)"):
        check_pixels(ds, DEFAULT_LIMITS.max_pixel_bytes)
    ds = pydicom.dcmread(j2k_bomb(tmp_path))
    with pytest.raises(PixelsTooLarge, match="60000 x 60000"):
        check_pixels(ds, DEFAULT_LIMITS.max_pixel_bytes)
    check_pixels(pydicom.dcmread(data_file("rtplan.dcm")), 1)       # no pixel data: nothing to check


def test_values_the_index_cannot_hold_are_dropped_not_a_processing_failure(tmp_path):
    archive = Archive(tmp_path / "data")
    try:
        path = instance(tmp_path, study=generate_uid(), patient_id="P-IS", patient_name="Big^Number",
                        SeriesNumber="999999999999999999999999")
        assert archive.ingest_file(path).outcome is Outcome.STORED
        assert archive.index.read(text("SELECT series_number FROM series"))[0][0] is None
    finally:
        archive.close()


# -- fuzzing the inspector ----------------------------------------------------------------------

_VRS = [b"AE", b"CS", b"DA", b"DS", b"IS", b"LO", b"PN", b"SH", b"UI", b"US", b"UL", b"OB", b"OW", b"SQ", b"UN",
        b"UT", b"XX"]
_TAGS = [0x00080016, 0x00080018, 0x00080005, 0x00100010, 0x00100020, 0x0020000D, 0x0020000E, 0x00200011,
         0x00081115, 0x00081140, 0x7FE00010, 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD, 0x00091010, 0x00000000]


@st.composite
def elements(draw, depth: int = 0) -> bytes:
    """Element headers and values with lengths that fit or lie, sequences of either length, nesting."""
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        tag, vr = draw(st.sampled_from(_TAGS)), draw(st.sampled_from(_VRS))
        if vr == b"SQ" and depth < 6:
            items = b"".join(
                item(inner + ITEM_END, UNDEFINED) if draw(st.booleans()) else item(inner)
                for inner in draw(st.lists(elements(depth + 1), max_size=2)))
            undefined = draw(st.booleans())
            out += element(tag, vr, items + (SEQUENCE_END if undefined else b""),
                           UNDEFINED if undefined else None)
            continue
        value = draw(st.binary(max_size=24))
        length = draw(st.one_of(st.none(), st.sampled_from([0, 1, 0xFFFF, UNDEFINED, 0x7FFFFFFF]),
                                st.integers(0, 0xFFFFFFFF))) if vr in _LONG else draw(
            st.one_of(st.none(), st.integers(0, 0xFFFF)))
        out += element(tag, vr, value, length)
    return out


@pytest.mark.fuzz
@given(data=st.binary(max_size=512), implicit=st.booleans(), little=st.booleans())
def test_fuzz_check_structure_on_random_bytes_raises_only_malformed(data, implicit, little):
    try:
        assert check_structure(data, 0, len(data), implicit, little, {}) >= 0
    except _Malformed:
        pass


@pytest.mark.fuzz
@given(body=elements(), cut=st.integers(0, 64), flips=st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)),
                                                                max_size=3),
       syntax=st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]),
       depth=st.integers(0, 70))
def test_fuzz_inspect_gives_a_header_or_invalid_instance_in_bounded_time_and_memory(body, cut, flips, syntax, depth):
    uid = generate_uid()
    before, after = identity(uid)
    data = before + nested(depth, depth % 2 == 0) + body + after
    data = bytearray(data[:len(data) - cut] if cut else data)
    for position, value in flips:
        if data:
            data[position % len(data)] = value
    data = bytes(data)
    if syntax == DeflatedExplicitVRLittleEndian:
        deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
        if flips:
            data = data[:len(data) - (cut % 8)]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzz.dcm"
        path.write_bytes(part10(data, uid, syntax))
        tracemalloc.start()
        started = time.monotonic()
        try:
            header = inspect(path, limits=Limits(max_sequence_depth=32))
            assert header.sop_instance_uid
        except InvalidInstance:
            pass
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert time.monotonic() - started < 2
        assert peak < 8 << 20


@pytest.mark.fuzz
@given(stream=st.binary(max_size=2048), head=st.sampled_from([b"", b"\x78\x9c", b"\x03\x00"]))
def test_fuzz_deflated_garbage_is_invalid_instance(stream, head):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzz.dcm"
        path.write_bytes(part10(head + stream, generate_uid(), DeflatedExplicitVRLittleEndian))
        try:
            inspect(path)
        except InvalidInstance:
            pass


async def test_the_viewer_answers_422_for_bombs_already_in_storage(tmp_path, aiohttp_client):
    """A bomb stored before the limits existed: its info, report and image pages are a clear
    422, never a 500, and nothing is inflated in memory."""
    lenient = lenient_archive(tmp_path / "var")
    bomb, deep = tmp_path / "bomb.dcm", tmp_path / "deep.dcm"
    bomb.write_bytes(deflate_bomb(generate_uid(), 256 << 20))
    deep.write_bytes(deep_file(generate_uid(), 60))
    stored = [lenient.ingest_file(p).sop_instance_uid for p in (bomb, deep)]
    lenient.close()
    archive, client = await logged_in_viewer(tmp_path, aiohttp_client)
    try:
        tracemalloc.start()
        try:
            for uid, reason in zip(stored, ("inflates over 100x", "nested deeper than 32")):
                for page in ("info", "sr", "render"):
                    answer = await client.get(f"/api/instances/{uid}/{page}")
                    assert answer.status == 422, f"{page}: {answer.status} {await answer.text()}"
                    assert reason in (await answer.json())["error"], page
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 64 << 20, f"{peak >> 20} MiB allocated"
    finally:
        archive.close()


# -- issue 14, second round: identifying values, long values, element order ---------------------

def with_patient_id(directory: Path, raw: bytes, charset: str, name: str) -> Path:
    """A CT_small copy whose Patient ID is the bytes `raw` in `charset`, written as they are."""
    path = instance(directory, study=generate_uid(), patient_id="ZPAT", patient_name=name,
                    SpecificCharacterSet=charset)
    data = path.read_bytes()
    assert data.count(b"ZPAT") == 1
    path.write_bytes(data.replace(b"ZPAT", raw))
    return path


@pytest.mark.interop
def test_patient_ids_undecodable_in_their_character_set_are_refused_not_merged(make_node, tmp_path):
    """b'\\xffPAT' and b'\\xfePAT' under ISO_IR 192 both read as U+FFFD + 'PAT': the index filed two
    patients as one. Each is refused; in ISO_IR 100, where both are characters, they are two patients."""
    node = make_node(router={"enabled": False})
    state = stored_before(node, tmp_path)
    refused = [with_patient_id(tmp_path / "utf8", raw, "ISO_IR 192", name)
               for raw, name in ((b"\xffPAT", "Alpha^Anna"), (b"\xfePAT", "Beta^Bob"))]
    for path in refused:
        assert send_raw(node, path) == (0xC000, "PatientID is not valid in the Specific Character Set")
        assert node.rows("SELECT COUNT(*) FROM instances WHERE sop_instance_uid=?", (uid_of(path),)) == [(0,)]
    assert node.rows("SELECT COUNT(*) FROM patients WHERE patient_id LIKE '%PAT'") == [(0,)]
    assert node.log().count("PatientID is not valid in the Specific Character Set") == 2    # one line each
    assert "Failed to decode" not in node.log()                                             # and no other
    latin = [with_patient_id(tmp_path / "latin1", raw, "ISO_IR 100", name)
             for raw, name in ((b"\xffPAT", "Gamma^Gil"), (b"\xfePAT", "Delta^Dan"))]
    for path in latin:
        assert send_raw(node, path) == (0x0000, "")
    assert sorted(node.rows("SELECT patient_id, patient_name FROM patients WHERE patient_id LIKE '%PAT'")) == [
        ("\xfePAT", "Delta^Dan"), ("\xffPAT", "Gamma^Gil")]
    for value in ("Alpha", "Beta", "Gamma", "Delta"):
        assert value not in node.log()
    after_the_attack(node, tmp_path, state)


def implicit_element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


@pytest.mark.interop
@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_a_64_mib_patient_name_is_refused_with_c000_in_bounded_memory(make_node, tmp_path, tls):
    """Implicit VR allows a 4-byte length: a 100 MiB PatientName was stored, the receiver peaked at
    832 MB and every C-FIND match carried it. Now: refused, named, never copied."""
    node = make_node(router={"enabled": False})
    state = stored_before(node, tmp_path)
    uid = generate_uid()
    data_set = (implicit_element(0x00080016, uid_value(CTImageStorage)) + implicit_element(0x00080018, uid_value(uid))
                + implicit_element(0x00080060, b"CT") + implicit_element(0x00100010, b"Q" * (64 << 20))
                + implicit_element(0x00100020, b"LONGNAME") + implicit_element(0x0020000D, uid_value(generate_uid()))
                + implicit_element(0x0020000E, uid_value(generate_uid())))
    path = tmp_path / "long-name.dcm"
    path.write_bytes(part10(data_set, uid, ImplicitVRLittleEndian))
    del data_set
    before = peak_rss(node)
    assert send_raw(node, path, ImplicitVRLittleEndian, tls=tls) == (0xC000, "PatientName longer than 776 bytes")
    assert grew(before, peak_rss(node)) < 40 << 20, "the value was read into memory"
    assert node.rows("SELECT COUNT(*) FROM patients WHERE patient_id='LONGNAME'") == [(0,)]
    assert node.log().count("PatientName longer than 776 bytes") == 1
    after_the_attack(node, tmp_path, state)


@pytest.mark.interop
def test_a_repeated_or_unordered_element_is_refused_with_c000(make_node, tmp_path):
    """Patient ID present twice (A, then B): the node filed B while dcmtk reads A, so a C-MOVE to a
    dcmtk PACS filed the image under another patient. PS3.5 7.1: ascending order, each once."""
    node = make_node(router={"enabled": False})
    state = stored_before(node, tmp_path)
    uid = generate_uid()
    before, after = identity(uid, patient_id="DUPTAG-A")
    twice = after.replace(element(0x00100020, b"LO", text_value("DUPTAG-A")),
                          element(0x00100020, b"LO", text_value("DUPTAG-A"))
                          + element(0x00100020, b"LO", text_value("DUPTAG-B")))
    nested_twice = element(0x00081140, b"SQ", item(element(0x00081150, b"UI", uid_value(CTImageStorage)) * 2))
    cases = [(before + twice, "element (0010,0020) appears twice"),
             (before + nested_twice + after, "element (0008,1150) appears twice"),
             (after + before, "element (0008,0016) is out of ascending tag order")]
    for n, (data_set, comment) in enumerate(cases):
        path = tmp_path / f"order-{n}.dcm"
        path.write_bytes(part10(data_set, uid))
        assert send_raw(node, path) == (0xC000, comment)
        assert node.log().count(comment) == 1
    assert node.rows("SELECT COUNT(*) FROM instances WHERE sop_instance_uid=?", (uid,)) == [(0,)]
    assert node.rows("SELECT COUNT(*) FROM patients WHERE patient_id LIKE 'DUPTAG%'") == [(0,)]
    after_the_attack(node, tmp_path, state)


@pytest.mark.interop
def test_the_node_log_of_a_c_find_with_a_bad_date_holds_no_part_of_it(make_node, tmp_path):
    """The peer is told what was wrong with its value; the log says which attribute, not the value."""
    from pydicom.dataset import Dataset

    node = make_node(router={"enabled": False})
    assoc = node.associate("CARELESSPACS", PatientRootQueryRetrieveInformationModelFind)
    try:
        query = Dataset()
        query.QueryRetrieveLevel, query.PatientName, query.PatientID = "PATIENT", "", ""
        query.PatientBirthDate = "1961-04-12"
        answers = [status for status, _ in assoc.send_c_find(query, PatientRootQueryRetrieveInformationModelFind)]
    finally:
        assoc.release()
    (status,) = answers
    assert status.Status == 0xC000 and "'1961-04-12' is not a date" in status.ErrorComment
    # the same bad date in a retrieve (C-GET, whose refusal goes through scp/retrieve.py)
    assoc = node.associate("CARELESSPACS", PatientRootQueryRetrieveInformationModelGet)
    try:
        query = Dataset()
        query.QueryRetrieveLevel, query.PatientID, query.PatientBirthDate = "PATIENT", "P1", "1961-04-12"
        answers = [status for status, _ in assoc.send_c_get(query, PatientRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()
    assert answers[-1].Status == 0xC000 and "'1961-04-12' is not a date" in answers[-1].ErrorComment
    log = node.log()
    assert "C-FIND from CARELESSPACS refused (0xC000): PatientBirthDate: not a date or a date range" in log
    assert "C-GET from CARELESSPACS refused (0xC000): PatientBirthDate: not a date or a date range" in log
    for part in ("1961", "04-12"):
        assert part not in log


# -- issue 14, second round: one C-STORE cannot fill the disk or hold its spool file -----------

def store_response(sock) -> tuple[int, str]:
    """(status, error comment) of the C-STORE-RSP the node sends on `sock`."""
    data = b""
    while True:
        while len(data) < 6 or len(data) < 6 + struct.unpack(">I", data[2:6])[0]:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {data[:12]!r}"
            data += chunk
        length = struct.unpack(">I", data[2:6])[0]
        pdu, data = data[:6 + length], data[6 + length:]
        assert pdu[0] == 0x04, f"expected a P-DATA-TF, got {pdu[:12]!r}"
        if pdu[11] & 0x01:                                     # a command set
            break
    command, pos, values = pdu[12:], 0, {}
    while pos + 8 <= len(command):
        group, elem, size = struct.unpack_from("<HHI", command, pos)
        values[(group << 16) | elem] = command[pos + 8:pos + 8 + size]
        pos += 8 + size
    return struct.unpack("<H", values[0x00000900])[0], values.get(0x00000902, b"").decode().strip()


def spooled_bytes(node) -> int:
    return sum(p.stat().st_size for p in node.spool_files() if p.exists())


@pytest.mark.interop
@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_a_data_set_over_max_instance_bytes_is_dropped_as_it_arrives(make_node, tmp_path, tls):
    """One C-STORE had no size limit (2 GiB spooled in 20 s; 16 of them fill the disk)."""
    node = make_node(router={"enabled": False}, ingest={"max_instance_bytes": 4 * MiB})
    state = stored_before(node, tmp_path)
    sock, contexts = raw_association(node, tls)
    context = contexts[CTImageStorage]
    fragment = _p_data(context, 0x00, b"\0" * (64 << 10))
    with _peak_rss(node) as memory:
        sock.sendall(_p_data(context, 0x03, _store_rq()))
        for _ in range(3 * 16):                                 # 3 MiB: spooled
            sock.sendall(fragment)
        wait_for(lambda: spooled_bytes(node) >= 2 * MiB, timeout=10, what="the data set to be spooled")
        for _ in range(9 * 16):                                 # 9 MiB more, over the limit: dropped at once
            sock.sendall(fragment)
        wait_for(lambda: not node.spool_files(), timeout=10, what="the spool file to be removed")
        sock.sendall(_p_data(context, 0x02, b"\0" * 16))        # the last fragment: the answer comes
        answer = store_response(sock)
    sock.close()
    assert answer == (0xA700, "data set over 4 MiB (ingest.max_instance_bytes)")
    assert memory.growth < 48 * MiB, f"the node grew by {memory.growth / MiB:.0f} MiB"
    assert node.log().count("data set over 4 MiB (ingest.max_instance_bytes)") == 1
    after_the_attack(node, tmp_path, state)


@pytest.mark.interop
def test_a_c_store_left_to_pynetdicom_is_bounded_by_max_instance_bytes_too(make_node, tmp_path):
    """A C-STORE-RQ on another context than its SOP class's goes to pynetdicom, which spools its
    data set itself: the same limit aborts it."""
    node = make_node(router={"enabled": False}, ingest={"max_instance_bytes": 4 * MiB})
    state = stored_before(node, tmp_path)
    sock, contexts = raw_association(node, False)
    context = contexts[Verification]
    sock.sendall(_p_data(context, 0x03, _store_rq()))
    sent = _flood(sock, _fragments(context, 0x00, 64 << 10), 64 * MiB)
    answer = _until_closed(sock, timeout=10)
    sock.close()
    assert _is_abort(answer), f"expected an A-ABORT, got {answer[:12]!r}"
    assert sent < 16 * MiB, f"the node took {sent / MiB:.0f} MiB"
    assert node.log().count("a C-STORE data set longer than 4194304 bytes (ingest.max_instance_bytes)") == 1
    after_the_attack(node, tmp_path, state)


@pytest.mark.interop
def test_a_trickling_data_set_is_aborted_after_max_store_seconds(make_node, tmp_path):
    """2 bytes every 40 s kept a spool file (and its association) forever: each PDU came within
    dicom.network_timeout. The whole data set now has dicom.max_store_seconds."""
    node = make_node(router={"enabled": False}, dicom={"max_store_seconds": 2.0})
    state = stored_before(node, tmp_path)
    sock, contexts = raw_association(node, True)
    context = contexts[CTImageStorage]
    sock.sendall(_p_data(context, 0x03, _store_rq()) + _p_data(context, 0x00, b"\0" * (64 << 10)) * 32)
    wait_for(lambda: spooled_bytes(node) >= MiB, timeout=10, what="the data set to be spooled")
    started = time.monotonic()
    aborted = b""
    while time.monotonic() - started < 10 and not aborted:
        time.sleep(0.5)
        try:
            sock.sendall(_p_data(context, 0x00, b"\0\0"))
        except OSError:
            break
        sock.settimeout(0.1)
        try:
            aborted = sock.recv(64)
        except (TimeoutError, OSError):
            pass
    aborted += _until_closed(sock, timeout=5)
    sock.close()
    assert _is_abort(aborted), f"expected an A-ABORT, got {aborted[:12]!r}"
    assert time.monotonic() - started < 5
    assert node.log().count("data set still arriving after 2 s (dicom.max_store_seconds)") == 1
    after_the_attack(node, tmp_path, state)


@pytest.mark.interop
def test_below_the_free_space_reserve_a_c_store_is_refused_before_anything_is_spooled(make_node, tmp_path):
    node = make_node(router={"enabled": False})
    state = stored_before(node, tmp_path)
    node.stop()
    stat = os.statvfs(tmp_path)
    node.settings["storage"] = {"min_free_bytes": stat.f_bavail * stat.f_frsize + (1 << 40)}   # always short
    node.config_path.write_text(_toml(node.settings))
    node.start()
    path, = synthetic_instances(tmp_path / "short", 1, patient="Short^Disk")
    assert send_raw(node, path) == (0xA700, "short of disk space (storage.min_free_bytes)")
    assert node.rows("SELECT COUNT(*) FROM instances WHERE sop_instance_uid=?", (uid_of(path),)) == [(0,)]
    assert node.log().count("short of disk space (storage.min_free_bytes)") == 1
    assert node.spool_files() == []
    node.stop()
    del node.settings["storage"]                               # space again: no restart needed, but the
    node.config_path.write_text(_toml(node.settings))          # reserve above can never be met here
    node.start()
    after_the_attack(node, tmp_path, state)


def test_the_reception_tally_refuses_size_pace_and_short_disk_with_their_settings():
    free = [10 << 30]
    reception = Reception(max_bytes=100 * MiB, min_free_bytes=1 << 30, max_seconds=600, min_rate=1024,
                          free_bytes=lambda: free[0])
    tally = reception.start(now=0)
    assert tally.refusal is None
    for second in range(0, 600, 10):                           # 1 MiB every 10 s for ten minutes: fine
        assert tally.add(MiB, now=second) is None
    slow = reception.start(now=0)
    assert slow.add(10 * MiB, now=1) is None                  # a burst, then a trickle
    assert slow.add(2, now=40) is None
    assert slow.add(2, now=RATE_WINDOW + 30) is None          # the first minute brought 10 MiB
    refusal = slow.add(2, now=2 * RATE_WINDOW + 40)
    assert refusal is not None and refusal.abort and "(dicom.min_store_rate)" in refusal.comment
    assert slow.add(MiB, now=2 * RATE_WINDOW + 41) is refusal  # the first refusal stays
    late = reception.start(now=0)
    refusal = late.add(MiB, now=601)
    assert refusal.abort and refusal.comment == "data set still arriving after 600 s (dicom.max_store_seconds)"
    big = reception.start(now=0)
    assert big.add(100 * MiB, now=1) is None
    refusal = big.add(1, now=1)
    assert (refusal.status, refusal.comment, refusal.abort) == (
        0xA700, "data set over 100 MiB (ingest.max_instance_bytes)", False)
    filling = reception.start(now=0)
    assert filling.add(8 * MiB, now=0) is None
    free[0] = 900 << 20                                        # another sender filled the disk meanwhile
    assert filling.add(7 * MiB, now=0) is None                 # looked at every 16 MiB, not every fragment
    assert filling.add(2 * MiB, now=0) == filling.refusal
    assert filling.refusal.comment == "short of disk space (storage.min_free_bytes)"
    assert not filling.refusal.abort
    assert reception.start(now=0).refusal.comment == "short of disk space (storage.min_free_bytes)"   # refused at once
    unlimited = Reception(1 << 40, 0, 0, 0, free_bytes=lambda: 0).start(now=0)
    assert unlimited.add(1 << 30, now=10 ** 6) is None


def test_the_archive_writes_no_instance_into_the_free_space_reserve(tmp_path):
    stat = os.statvfs(tmp_path)
    archive = Archive(tmp_path / "data", min_free_bytes=stat.f_bavail * stat.f_frsize + (1 << 40))
    try:
        result = archive.ingest_file(data_file("CT_small.dcm"))
        assert (result.outcome, result.reason) == (Outcome.STORAGE_FULL, "short of disk space (storage.min_free_bytes)")
        assert list(archive.storage.blob_ids()) == []
    finally:
        archive.close()
