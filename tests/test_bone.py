"""The bone-model plug-in: a real CT head end to end, a sphere of known size, and geometry it must refuse."""
from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pydicom
import pytest
import trimesh
from pydicom.dataset import Dataset

import cranium
from gpu_workers.bone.plugin import BoneModel
from gpu_workers.bone.volume import load
from gpu_workers.local import run_local
from gpu_workers.plugin import PluginError
from helpers import M3DICOM, ROOT, data_file, wait_for

DCIODVFY = Path(sys.executable).parent / "dciodvfy"
TESTS = Path(__file__).resolve().parent


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def x3d_levels(data: bytes) -> list[tuple[int, int]]:
    """(triangles, points) of each IndexedTriangleSet, finest first."""
    root = ET.fromstring(data)
    levels = []
    for shape in root.iter("IndexedTriangleSet"):
        index = shape.get("index").split()
        points = shape.find("Coordinate").get("point").split()
        normals = shape.find("Normal").get("vector").split()
        assert len(index) % 3 == 0 and len(points) % 3 == 0 and len(normals) == len(points)
        assert max(map(int, index)) < len(points) // 3
        levels.append((len(index) // 3, len(points) // 3))
    assert root.find(".//Viewpoint") is not None
    return levels


# -- the real head, sent over DICOM TLS, through the router -------------------------------

@pytest.fixture(scope="module")
def head_series(tmp_path_factory):
    volume, spacing = cranium.load()
    return cranium.write_series(tmp_path_factory.mktemp("cranium"), volume, spacing), spacing


@pytest.mark.interop
@pytest.mark.slow
def test_the_real_head_becomes_a_closed_skull_model(make_node, head_series, tmp_path):
    files, _ = head_series
    node = make_node(router={"rules": [{"name": "head", "match": {"Modality": "CT", "BodyPartExamined": "HEAD"},
                                        "plugin": "bone-model", "quiet_seconds": 1, "params": {"triangles": 60000}}]})
    node.storescu(*files)
    job = wait_for(lambda: node.rows("SELECT id, state, summary, errors FROM jobs WHERE state IN ('succeeded', 'failed')"),
                   timeout=240, what="the bone model job")[0]
    assert job[1] == "succeeded", job[3]
    summary = json.loads(job[2])
    assert summary["triangles"] <= 60000 and summary["phone_triangles"] <= 25000 and summary["watertight"]
    (x_low, y_low, z_low), (x_high, y_high, z_high) = summary["bounds_mm"]
    assert 120 < x_high - x_low < 170 and 160 < y_high - y_low < 230 and 130 < z_high - z_low < 170   # an adult skull
    assert 400 < summary["volume_ml"] < 800 and summary["threshold_hu"] == 300
    results = dict(node.rows("SELECT r.name, r.blob_id FROM job_results r WHERE r.kind='file'"))
    scene = node.stored_bytes_of_blob(results["model.x3d"])
    levels = x3d_levels(scene)
    assert levels[0][0] == summary["triangles"] and levels[1][0] == summary["phone_triangles"]
    (stl_uid,), = node.rows("SELECT sop_instance_uid FROM instances WHERE sop_class_uid=?",
                            ("1.2.840.10008.5.1.4.1.1.104.3",))
    stl_path = tmp_path / "model.dcm"
    stl_path.write_bytes(node.stored_bytes(stl_uid))
    stl = pydicom.dcmread(stl_path)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert (stl.StudyInstanceUID, stl.FrameOfReferenceUID) == (source.StudyInstanceUID, source.FrameOfReferenceUID)
    assert dciodvfy_errors(stl_path) == []
    model = trimesh.load(io.BytesIO(bytes(stl.EncapsulatedDocument[:stl.EncapsulatedDocumentLength])), file_type="stl")
    assert len(model.faces) == levels[0][0]
    assert model.is_watertight and model.is_winding_consistent and model.volume > 0
    (sc_uid,), = node.rows("SELECT sop_instance_uid FROM instances WHERE job_id IS NOT NULL AND sop_class_uid=?",
                           ("1.2.840.10008.5.1.4.1.1.7",))
    sc_path = tmp_path / "key.dcm"
    sc_path.write_bytes(node.stored_bytes(sc_uid))
    assert dciodvfy_errors(sc_path) == []
    assert (pydicom.dcmread(sc_path).pixel_array > 100).mean() > 0.2          # the front view shows bone


# -- a sphere of known size -------------------------------------------------------------------

def sphere_series(directory: Path, radius: float = 20.0, spacing=(0.8, 0.8, 1.25), centre=(10.0, -5.0, 40.0),
                  hu_inside: float = 1000.0, air: float = -1000.0, tissue: float | None = None) -> list[Path]:
    """A CT of a sphere (partial volume at its edge), on an oblique plane, anisotropic voxels;
    with `tissue`, inside a 6 mm shell of soft tissue of that value."""
    angle = np.deg2rad(20)
    row = np.array([np.cos(angle), np.sin(angle), 0.0])
    col = np.array([-np.sin(angle), np.cos(angle), 0.0])
    normal = np.cross(row, col)
    margin = 14 if tissue is not None else 8
    size = int(np.ceil((radius + margin) * 2 / min(spacing)))
    count = int(np.ceil((radius + margin) * 2 / spacing[2]))
    origin = np.array(centre) - row * spacing[1] * size / 2 - col * spacing[0] * size / 2 - normal * spacing[2] * count / 2
    directory.mkdir(parents=True, exist_ok=True)
    sub = (np.arange(4) + 0.5) / 4 - 0.5                   # 4x4x4 supersampling for the partial volume
    study, series, frame = (pydicom.uid.generate_uid() for _ in range(3))
    paths = []
    j, i = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    for k in range(count):
        inside, shell = np.zeros((size, size)), np.zeros((size, size))
        for dk in sub:
            for dj in sub:
                for di in sub:
                    p = (origin[None, None, :] + (i[..., None] + di) * spacing[1] * row + (j[..., None] + dj) * spacing[0]
                         * col + (k + dk) * spacing[2] * normal)
                    distance = np.linalg.norm(p - np.array(centre), axis=-1)
                    inside += distance <= radius
                    shell += (distance > radius) & (distance <= radius + 6)
        n = len(sub) ** 3
        hu = air + (hu_inside - air) * inside / n + ((tissue - air) * shell / n if tissue is not None else 0)
        ds = Dataset()
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.Modality, ds.InstanceNumber = "Sphere^Phantom", "SPHERE", "CT", k + 1
        ds.StudyDate, ds.StudyTime, ds.SeriesNumber = "20260101", "120000", 1
        ds.ImagePositionPatient = list(origin + k * spacing[2] * normal)
        ds.ImageOrientationPatient = list(row) + list(col)
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.round(hu).astype(np.int16).tobytes()
        path = directory / f"s{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_a_sphere_has_the_area_and_volume_of_a_sphere_in_patient_coordinates(tmp_path):
    radius, centre = 20.0, (10.0, -5.0, 40.0)
    files = sphere_series(tmp_path / "sphere", radius, centre=centre)
    summary = run_local(BoneModel(), files, {"smoothing_mm": 0.0, "threshold": 0.0}, tmp_path / "out")
    assert summary["watertight"]
    assert summary["surface_mm2"] == pytest.approx(4 * np.pi * radius ** 2, rel=0.02)
    assert summary["volume_ml"] == pytest.approx(4 / 3 * np.pi * radius ** 3 / 1000, rel=0.02)
    low, high = np.array(summary["bounds_mm"])
    assert np.allclose((low + high) / 2, centre, atol=0.5) and np.allclose(high - low, 2 * radius, atol=1.0)
    levels = x3d_levels((tmp_path / "out" / "model.x3d").read_bytes())
    assert levels[0][0] == summary["triangles"]


def test_two_surfaces_joined_at_an_edge_are_mended_locally_without_meshfix(monkeypatch):
    import pymeshfix

    from gpu_workers.bone import mesh as meshing

    # two cubes sharing one edge: its 8 segments have four triangles each, as where decimation joins thin bone
    def cube():
        return trimesh.creation.box().subdivide().subdivide().subdivide()     # 768 triangles
    joined = trimesh.util.concatenate([cube(), cube().apply_translation([1, 1, 0])])
    joined.merge_vertices()
    edges = np.sort(joined.edges, axis=1)
    assert (np.unique(edges, axis=0, return_counts=True)[1] > 2).sum() == 8 and not joined.is_watertight
    assert meshing._mend_locally(joined) is None           # 6% of the surface to cut: not a local defect
    monkeypatch.setattr(meshing, "MEND_SHARE", 0.2)

    def no_meshfix(*args, **kwargs):
        raise AssertionError("MeshFix was called for a defect the local mend closes")
    monkeypatch.setattr(pymeshfix, "MeshFix", no_meshfix)
    closed = meshing._closed(joined)
    assert closed.is_watertight and closed.is_winding_consistent and closed.volume > 0
    assert 1.9 < closed.volume < 2.0 and len(closed.split()) == 2   # two unit cubes, less what was cut at the edge
    # a surface that is only open (a hole, nothing joined) is not the local mend's
    open_box = trimesh.creation.box()
    open_box.update_faces(np.arange(1, 12))
    assert meshing._mend_locally(open_box) is None


def test_values_that_are_not_hu_get_an_automatic_threshold(tmp_path):
    files = sphere_series(tmp_path / "cbct", 15.0, hu_inside=2400.0, air=400.0, tissue=1100.0)   # arbitrary grey values
    summary = run_local(BoneModel(), files, {"smoothing_mm": 0.0}, tmp_path / "out")
    assert summary["threshold_mode"] == "otsu" and summary["threshold_hu"] is None
    assert 1100 < summary["threshold"] < 2400
    # Otsu sits between the classes, not at their midpoint (the tissue class is larger): within 10%
    assert summary["volume_ml"] == pytest.approx(4 / 3 * np.pi * 15.0 ** 3 / 1000, rel=0.10)


# -- geometry it reads, and geometry it refuses -------------------------------------------

def _stack(tmp_path, count=10, positions=None, changes=None) -> list[pydicom.Dataset]:
    base = pydicom.dcmread(data_file("693_UNCR.dcm"))
    slices = []
    for k in range(count):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        x, y, z = [float(v) for v in base.ImagePositionPatient]
        ds.ImagePositionPatient = list(positions[k]) if positions is not None else [x, y, z + 2.0 * k]
        for keyword, value in (changes or {}).get(k, {}).items():
            setattr(ds, keyword, value)
        slices.append(ds)
    return slices


def test_a_real_slice_is_rescaled_to_hu_and_alone_is_refused(tmp_path):
    single = pydicom.dcmread(data_file("693_UNCR.dcm"))
    with pytest.raises(PluginError, match="at least 8"):
        load([single])
    volume = load(_stack(tmp_path))
    raw = single.pixel_array.astype(float) * float(single.RescaleSlope) + float(single.RescaleIntercept)
    assert np.allclose(volume.values[0], raw) and volume.calibrated
    assert volume.spacing == (2.0, *map(float, single.PixelSpacing))


@pytest.mark.parametrize("positions,changes,message", [
    ("duplicate", {}, "share one position"),
    ("tilted", {}, "gantry tilt"),
    ("uneven", {}, "uneven slice spacing"),
    (None, {3: {"Rows": 256, "Columns": 256, "PixelData": bytes(256 * 256 * 2)}}, "different sizes"),
    (None, {4: {"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]}}, "Image Orientation"),
])
def test_geometry_that_cannot_make_a_volume_is_refused(tmp_path, positions, changes, message):
    x, y, z = [float(v) for v in pydicom.dcmread(data_file("693_UNCR.dcm")).ImagePositionPatient]
    where = {"duplicate": [[x, y, z + 2 * min(k, 8)] for k in range(10)],
             "tilted": [[x, y + 0.9 * k, z + 2 * k] for k in range(10)],
             "uneven": [[x, y, z + 2 * k + (3 if k > 6 else 0)] for k in range(10)]}.get(positions)
    with pytest.raises(PluginError, match=message):
        load(_stack(tmp_path, positions=where, changes=changes))


def test_an_enhanced_ct_reads_like_its_slices(head_series):
    import highdicom as hd

    files, spacing = head_series
    slices = [pydicom.dcmread(p) for p in files[40:52]]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(slices, series_instance_uid=pydicom.uid.generate_uid(),
                                                        series_number=2, sop_instance_uid=pydicom.uid.generate_uid(),
                                                        instance_number=1)
    a, b = load(slices), load([enhanced])
    assert a.values.shape == b.values.shape and np.allclose(a.values, b.values)
    assert np.allclose(a.spacing, b.spacing) and np.allclose(a.origin, b.origin) and np.allclose(a.axes, b.axes)


def test_run_without_a_node_from_the_command_line(tmp_path):
    files = sphere_series(tmp_path / "sphere", 12.0)
    result = subprocess.run(M3DICOM + ["plugin", "run", "bone-model", str(tmp_path / "sphere"), "--param",
                                       "triangles=5000", "--out", str(tmp_path / "out"), "--quiet"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {"triangles", "vertices", "threshold_hu", "volume_ml", "surface_mm2", "bounds_mm"} <= set(summary)
    assert summary["triangles"] <= 5000 and len(files) > 8
    assert {"model.x3d", "model-phone.x3d"} <= {p.name for p in (tmp_path / "out").iterdir()}
