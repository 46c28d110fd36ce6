"""The mammography plug-in: phantoms, the detector against known truth, its DICOM results, bad input."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from gpu_workers.backend import BackendError, array_module
from gpu_workers.local import run_local
from gpu_workers.mammo import detect, phantom
from gpu_workers.mammo.evaluate import analyse, cluster_marks, sensitivity_at
from gpu_workers.mammo.model import Model, ModelError
from gpu_workers.mammo.plugin import MammoCad
from gpu_workers.plugin import PluginError
from helpers import M3DICOM, ROOT, data_file

DCIODVFY = Path(sys.executable).parent / "dciodvfy"
SMALL = phantom.Options(rows=900, columns=720, spacing=0.1)


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def mammogram(tmp_path_factory):
    """A phantom with two clusters, written as DICOM."""
    path, truth = phantom.write(tmp_path_factory.mktemp("mg"), 424242,
                                dataclasses.replace(SMALL, clusters=2, isolated=3, density=0.3, view="MLO"))
    return path, truth


# -- the phantom ---------------------------------------------------------------------------

def test_phantoms_follow_their_seed_and_their_truth_holds():
    a, truth = phantom.generate(7, SMALL)
    b, again = phantom.generate(7, SMALL)
    assert np.array_equal(a, b) and truth == again
    assert a.dtype == np.uint16 and a.max() <= 2 ** SMALL.bits - 1
    for cluster in truth.clusters:
        members = [c for c in truth.calcifications if c.cluster_id == cluster.id]
        assert len(members) == cluster.n >= 3
        assert all(np.hypot(c.x - cluster.x, c.y - cluster.y) * truth.spacing <= np.sqrt(100 / np.pi) for c in members)
    assert all(0.1 <= c.diameter_mm <= 1.0 for c in truth.calcifications)


@pytest.mark.parametrize("beta", [2.5, 3.2])
def test_the_tissue_texture_has_a_power_law_spectrum(beta):
    field = phantom.power_law_texture(np.random.default_rng(1), (512, 512), beta, cutoff=10.0)
    power = np.abs(np.fft.fft2(field)) ** 2
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(512), np.fft.fftfreq(512), indexing="ij"))
    band = (f > 0.02) & (f < 0.3)
    slope = np.polyfit(np.log(f[band]), np.log(power[band]), 1)[0]
    assert slope == pytest.approx(-beta, abs=0.15)


def test_a_phantom_is_a_valid_mammogram_for_presentation(mammogram):
    path, truth = mammogram
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.2" and ds.PresentationIntentType == "FOR PRESENTATION"
    assert (ds.ImageLaterality, ds.ViewPosition) == (truth.laterality, truth.view)
    assert dciodvfy_errors(path) == []


# -- reading the image ----------------------------------------------------------------------

def test_monochrome1_and_for_processing_come_to_the_same_attenuation():
    pixels, truth = phantom.generate(11, SMALL)
    plain = detect.load(phantom.to_dataset(pixels, truth, SMALL), np).values
    inverted_opts = dataclasses.replace(SMALL, monochrome1=True)
    inverted = detect.load(phantom.to_dataset(phantom.generate(11, inverted_opts)[0], truth, inverted_opts), np).values
    assert np.corrcoef(plain.ravel(), inverted.ravel())[0, 1] > 0.999
    raw = phantom.to_dataset(np.exp(-pixels.astype(np.float64) / 600 + 9).astype(np.uint16), truth, SMALL)
    raw.PresentationIntentType = "FOR PROCESSING"
    raw.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2.1"
    processed = detect.load(raw, np).values
    assert np.corrcoef(plain.ravel(), processed.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("change,message", [
    (lambda ds: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.2"), "not a mammogram"),
    (lambda ds: (ds.__delattr__("ImagerPixelSpacing"), ds.__delattr__("PixelSpacing")), "Pixel Spacing"),
    (lambda ds: setattr(ds, "PixelData", bytes(len(ds.PixelData))), "empty"),
])
def test_images_the_detector_cannot_use_are_refused_clearly(change, message):
    pixels, truth = phantom.generate(3, SMALL)
    ds = phantom.to_dataset(pixels, truth, SMALL)
    change(ds)
    with pytest.raises(PluginError, match=message):
        detect.load(ds, np)


# -- detection against known truth (a regression gate, not the performance claim) -----------

@pytest.fixture(scope="module")
def scored():
    model = Model.load()
    results = [analyse(seed, dataclasses.replace(SMALL, spacing=0.085, rows=1100, columns=880))
               for seed in range(30000, 30008)]
    for r in results:
        r.scores = model.probabilities(r.features)
    return model, results


def test_the_detector_finds_the_clusters_and_few_false_ones(scored):
    model, results = scored
    calc_threshold, _ = model.operating_point(0.5)
    marks = cluster_marks(results, calc_threshold)
    true_clusters = sum(marks.truths)
    assert true_clusters >= 8
    sensitivity_at_two = sensitivity_at(marks, [2.0])[0]
    assert sensitivity_at_two >= 0.7, sensitivity_at_two
    positive_recall = np.mean([r.labels.sum() / max(1, len(r.truth.calcifications)) for r in results])
    assert positive_recall >= 0.5


def test_the_shipped_model_says_how_it_was_trained():
    model = Model.load()
    training = model.meta["training"]
    assert training["command"].startswith("python -m gpu_workers.mammo.train")
    assert training["validation_seeds"][0] == 10000 and training["training_seeds"][1] < 10000
    assert model.meta["classifier"] in model.meta["validation"] and model.meta["operating_points"]


def test_a_model_file_with_untrusted_types_is_refused(tmp_path):
    import skops.io as sio
    from sklearn.preprocessing import FunctionTransformer

    sio.dump(FunctionTransformer(os.system), tmp_path / "model.skops")   # would run commands when used
    (tmp_path / "model.json").write_text(json.dumps({"features": list(detect.FEATURES)}))
    with pytest.raises(ModelError, match="not trusted"):
        Model.load(tmp_path / "model.skops", tmp_path / "model.json")


# -- the plug-in's results ------------------------------------------------------------------

@pytest.fixture(scope="module")
def results(mammogram, tmp_path_factory):
    path, truth = mammogram
    out = tmp_path_factory.mktemp("cad")
    summary = run_local(MammoCad(), [path], {"report_isolated": True}, out)
    return path, truth, out, summary


def test_the_sc_and_sr_are_valid_and_keep_the_source_patient_and_study(results):
    path, _, out, summary = results
    source = pydicom.dcmread(path)
    sc_path, sr_path = out / summary["written"][0], out / summary["written"][1]
    for result in (sc_path, sr_path):
        assert dciodvfy_errors(result) == [], result
        ds = pydicom.dcmread(result)
        assert (ds.PatientID, ds.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    sc = pydicom.dcmread(sc_path)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.PhotometricInterpretation == "RGB" and (sc.Rows, sc.Columns) == (source.Rows, source.Columns)
    sr = pydicom.dcmread(sr_path)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_ids_agree_between_sr_findings_json_and_the_marks(results):
    path, truth, out, summary = results
    findings = json.loads((out / "findings.json").read_text())
    assert set(findings) == {"calcifications", "clusters"}
    assert {"id", "x", "y", "radius_mm", "n", "score"} <= set(findings["clusters"][0])
    assert {"id", "x", "y", "score", "cluster_id"} <= set(findings["calcifications"][0])
    sr = pydicom.dcmread(out / summary["written"][1])
    groups = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"]
    tracked = set()
    for container in groups:
        for group in container.ContentSequence:
            for item in group.ContentSequence:
                if item.ConceptNameCodeSequence[0].CodeValue == "112039":       # Tracking Identifier
                    tracked.add(item.TextValue)
    expected = {c["id"] for c in findings["clusters"]} | {c["id"] for c in findings["calcifications"]
                                                         if c["cluster_id"] is None}
    assert tracked == expected and summary["clusters"] == len(findings["clusters"]) >= 1
    for cluster in findings["clusters"]:                     # each reported cluster sits on a true one
        assert any(np.hypot(cluster["x"] - t.x, cluster["y"] - t.y) * truth.spacing <= t.radius_mm + 1
                   for t in truth.clusters), cluster
    sc = pydicom.dcmread(out / summary["written"][0]).pixel_array
    grey = pydicom.dcmread(path).pixel_array
    marked = (sc[..., 0] > 200) & (sc[..., 2] < 80)            # yellow marks
    for cluster in findings["clusters"]:
        y, x = int(cluster["y"]), int(cluster["x"])
        assert marked[max(0, y - 60):y + 60, max(0, x - 60):x + 60].any()
    assert grey.shape == sc.shape[:2]


def test_run_without_a_node_from_the_command_line(mammogram, tmp_path):
    path, _ = mammogram
    result = subprocess.run(M3DICOM + ["plugin", "run", "mammo-cad", str(path), "--param", "operating_point=1",
                                       "--out", str(tmp_path / "out"), "--quiet"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert {"findings.json", "summary.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    refused = subprocess.run(M3DICOM + ["plugin", "run", "mammo-cad", str(data_file("CT_small.dcm")), "--out",
                                        str(tmp_path / "ct"), "--quiet"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 1 and "takes none of these files" in refused.stderr


def test_the_array_backend_can_be_forced(monkeypatch):
    monkeypatch.setenv("M3DICOM_ARRAY_BACKEND", "numpy")
    assert array_module()[1] == "numpy"
    monkeypatch.setenv("M3DICOM_ARRAY_BACKEND", "cupy")
    try:
        import cupy  # noqa: F401
        has_gpu = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        has_gpu = False
    if has_gpu:
        assert array_module()[1] == "cupy"
    else:
        with pytest.raises(BackendError, match="not available"):
            array_module()
    monkeypatch.setenv("M3DICOM_ARRAY_BACKEND", "fortran")
    with pytest.raises(BackendError):
        array_module()


@pytest.mark.gpu
def test_cupy_finds_what_numpy_finds(mammogram):
    cupy = pytest.importorskip("cupy")
    if cupy.cuda.runtime.getDeviceCount() == 0:
        pytest.skip("no CUDA device")
    ds = pydicom.dcmread(mammogram[0])
    found = {}
    for xp in (np, cupy):
        image = detect.load(ds, xp)
        mask, _, skin = detect.masks(image, xp)
        found[xp.__name__] = detect.candidates(image, mask, skin, xp)
    assert abs(len(found["numpy"].x) - len(found["cupy"].x)) <= max(2, 0.02 * len(found["numpy"].x))
