"""The mammography plug-in: phantoms, the detector against known truth, its DICOM results, bad input."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from gpu_workers.backend import BackendError, array_module
from gpu_workers.local import run_local
from gpu_workers.mammo import detect, phantom
from gpu_workers.mammo.evaluate import analyse, cluster_marks, sensitivity_at
from gpu_workers.mammo.model import Model, ModelError
from gpu_workers.mammo.plugin import MammoCad
from gpu_workers.plugin import PluginError
from helpers import M3DICOM, ROOT, arrived, data_file, wait_for

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


def phantom_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpu_workers.mammo.phantom", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_the_phantom_command_line_writes_screening_examinations_a_viewer_can_hang(tmp_path):
    assert all(flag in phantom_cli("--help").stdout for flag in ("--out", "--n", "--seed", "--view", "--density",
                                                                  "--no-calcifications"))
    made = phantom_cli("--out", str(tmp_path / "out"), "--n", "2", "--seed", "7", "--density", "dense",
                       "--no-calcifications", "--truth", str(tmp_path / "truth"))
    assert made.returncode == 0, made.stderr
    assert "8/8" in made.stderr and "wrote 8 mammograms" in made.stdout            # the progress bar, the total
    codes_ = {"CC": ("399162004", "SCT", "cranio-caudal"), "MLO": ("399368009", "SCT", "medio-lateral oblique")}
    orientation = {"RCC": ["P", "L"], "LCC": ["A", "R"], "RMLO": ["P", "FL"], "LMLO": ["A", "FR"]}
    studies = {}
    for exam in ("PH000007", "PH000011"):
        for number, view in enumerate(phantom.VIEWS, start=1):
            path = tmp_path / "out" / f"{exam}_{view}.dcm"
            ds = pydicom.dcmread(path)
            assert ds.SOPClassUID == phantom.MG_FOR_PRESENTATION and ds.Modality == "MG"
            assert (ds.ImageLaterality, ds.ViewPosition) == (view[0], view[1:])
            code = ds.ViewCodeSequence[0]
            assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == codes_[view[1:]]
            assert list(ds.PatientOrientation) == orientation[view] and ds.SeriesNumber == number
            assert (ds.PatientID, ds.SeriesDescription) == (exam, f"{view[0]} {view[1:]}")
            studies.setdefault(ds.StudyInstanceUID, set()).add(ds.SeriesInstanceUID)
            truth = phantom.Truth.from_json((tmp_path / "truth" / f"{exam}_{view}.json").read_text())
            assert truth.calcifications == [] and truth.density == phantom.DENSITIES["dense"]
    assert sorted(len(series) for series in studies.values()) == [4, 4]                # a study per exam
    assert dciodvfy_errors(tmp_path / "out" / "PH000011_LMLO.dcm") == []
    # one view asked alone is the same image: the seed decides
    alone = phantom_cli("--out", str(tmp_path / "alone"), "--seed", "11", "--view", "lmlo", "--density", "dense",
                        "--no-calcifications")
    assert alone.returncode == 0 and "%|" not in alone.stderr                        # no bar for one file
    assert "wrote 1 mammogram (1 study: LMLO; 0 true clusters)" in alone.stdout      # not "1 studies"
    assert "(2 studies:" in made.stdout
    assert [p.name for p in (tmp_path / "alone").iterdir()] == ["PH000011_LMLO.dcm"]
    assert pydicom.dcmread(tmp_path / "alone" / "PH000011_LMLO.dcm").PixelData == \
        pydicom.dcmread(tmp_path / "out" / "PH000011_LMLO.dcm").PixelData


@pytest.mark.parametrize("args,message", [
    (["--view", "AP"], "view 'AP': give RCC, LCC, RMLO, LMLO or all"),
    (["--density", "0.95"], "between 0.05 (fatty) and 0.8"),
    (["--density", "thick"], "give one of fatty, scattered"),
    (["--n", "0"], "at least 1"),
    (["--no-calcifications", "--clusters", "2"], "contradicts"),
])
def test_the_phantom_command_line_refuses_what_it_cannot_make(tmp_path, args, message):
    refused = phantom_cli("--out", str(tmp_path / "out"), *args)
    assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    assert not (tmp_path / "out").exists()


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


def test_the_texture_features_are_skimages_glcm_counted_for_all_patches_at_once():
    from skimage.feature import graycomatrix

    levels = detect._LEVELS
    i, j = np.meshgrid(np.arange(levels), np.arange(levels), indexing="ij")

    def one_patch(patch):       # the reference: skimage, one patch at a time
        span = patch.max() - patch.min()
        quantised = np.clip(((patch - patch.min()) / (span + 1e-9) * (levels - 1)).astype(np.uint8), 0, levels - 1)
        glcm = graycomatrix(quantised, [1], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=levels,
                            symmetric=True, normed=True)[:, :, 0, :].mean(axis=2)
        mean = (glcm * i).sum()
        std = np.sqrt((glcm * (i - mean) ** 2).sum()) + 1e-12
        return [(glcm * (i - j) ** 2).sum(), (glcm / (1 + (i - j) ** 2)).sum(), np.sqrt((glcm ** 2).sum()),
                (glcm * (i - mean) * (j - mean)).sum() / std ** 2]

    rng = np.random.default_rng(3)
    for shape in ((200, 35, 35), (4, 3, 3), (6, 24, 17)):
        patches = rng.normal(size=shape).cumsum(axis=1)
        patches[0] = 0.5                                   # a flat patch
        expected = np.array([one_patch(p) for p in patches])
        assert np.abs(detect.textures(patches) - expected).max() < 1e-12
    assert detect.textures(np.zeros((0, 5, 5))).shape == (0, 4)


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
    view = f"{source.ImageLaterality} {source.ViewPosition}"     # a four-view study's CAD series told apart
    assert sc.SeriesDescription == f"CAD {view}: micro-calcifications" == sr.SeriesDescription


def test_ids_agree_between_sr_findings_json_and_the_marks(results):
    path, truth, out, summary = results
    findings = json.loads((out / "findings.json").read_text())
    assert set(findings) == {"calcifications", "clusters", "images"}
    assert findings["images"] == [{"sop_instance_uid": pydicom.dcmread(path).SOPInstanceUID, "clusters":
                                   len(findings["clusters"]), "calcifications": len(findings["calcifications"]),
                                   "outcome": "clusters found"}]
    assert summary["outcome"] == "clusters found" and summary["images_without_clusters"] == 0
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


# -- normal images: most screening mammograms ----------------------------------------------

NORMAL = {   # a phantom without a cluster, and the parameters the CAD runs with
    "no calcification": (dict(clusters=0, isolated=0, density=0.3, view="CC", laterality="R"), {}),
    "isolated calcifications only": (dict(clusters=0, isolated=6, density=0.2, view="MLO", laterality="R"),
                                     {"report_isolated": True}),
    "very dense": (dict(clusters=0, isolated=0, density=0.8, view="MLO", laterality="L"), {}),
}


def text_values(group, code: str) -> list[str]:
    """TEXT items of an SR content item (and its children) by concept code."""
    found = []
    for item in getattr(group, "ContentSequence", []):
        if item.ConceptNameCodeSequence[0].CodeValue == code and item.ValueType == "TEXT":
            found.append(item.TextValue)
        found.extend(text_values(item, code))
    return found


def no_cluster_statements(sr_path: Path) -> list:
    """The report's groups that say no calcification cluster was found, read back by highdicom."""
    sr = hd.sr.srread(sr_path)
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    statements = []
    for group in report.get_image_measurement_groups(finding_type=codes.SCT.CalcificationCluster):
        evaluations = [(e.name, e.value) for e in group.get_qualitative_evaluations()]
        if (codes.SCT.CalcificationCluster, codes.cid240.Absent) in evaluations:
            statements.append(group)
    return statements


def assert_says_no_cluster(sr_path: Path, source: Path, params: dict) -> None:
    assert dciodvfy_errors(sr_path) == [], sr_path
    (statement,) = no_cluster_statements(sr_path)
    assert statement.tracking_identifier == "no cluster found"
    assert [i.referenced_sop_instance_uid for i in statement.source_images] == [pydicom.dcmread(source).SOPInstanceUID]
    group = statement[0]
    assert text_values(group, "111001") == ["mammo-cad"]                    # Algorithm Name
    assert text_values(group, "111003") == [MammoCad.version]               # Algorithm Version
    parameters = dict(p.split("=", 1) for p in text_values(group, "111002"))   # Algorithm Parameters
    expected = {p.name: str(params.get(p.name, p.default)) for p in MammoCad.params}
    assert parameters == expected
    sr = pydicom.dcmread(sr_path)
    assert sr.CompletionFlag == "COMPLETE" and sr.PatientID == pydicom.dcmread(source).PatientID
    report = hd.sr.MeasurementReport.from_sequence(hd.sr.srread(sr_path).content)
    assert report.get_planar_roi_measurement_groups(finding_type=codes.SCT.CalcificationCluster) == []


@pytest.mark.parametrize("kind", NORMAL)
def test_a_normal_mammogram_gives_a_report_that_says_no_cluster_was_found(kind, tmp_path):
    """It failed on every such image (highdicom: "Argument 'imaging_measurements' is required")."""
    options, params = NORMAL[kind]
    path, truth = phantom.write(tmp_path / "mg", 515151, dataclasses.replace(SMALL, **options))
    assert truth.clusters == []
    summary = run_local(MammoCad(), [path], params, tmp_path / "cad")
    assert summary["outcome"] == "no cluster found" and summary["clusters"] == 0
    assert summary["images"] == summary["images_without_clusters"] == 1
    sr_path, sc_path = tmp_path / "cad" / "sr-901-1.dcm", tmp_path / "cad" / "ot-900-1.dcm"
    assert_says_no_cluster(sr_path, path, params)
    findings = json.loads((tmp_path / "cad" / "findings.json").read_text())
    assert findings["clusters"] == [] and findings["images"][0]["outcome"] == "no cluster found"
    assert findings["images"][0]["sop_instance_uid"] == pydicom.dcmread(path).SOPInstanceUID
    # the SC: the image without a cluster mark (yellow), its banner saying so
    assert dciodvfy_errors(sc_path) == []
    sc = pydicom.dcmread(sc_path).pixel_array
    assert not ((sc[..., 0] > 200) & (sc[..., 1] > 180) & (sc[..., 2] < 80)).any()
    if params.get("report_isolated"):      # isolated calcifications are reported as such, not as a cluster
        isolated = [c for c in findings["calcifications"] if c["cluster_id"] is None]
        assert isolated and findings["images"][0]["calcifications"] == len(isolated)
        report = hd.sr.MeasurementReport.from_sequence(hd.sr.srread(sr_path).content)
        assert len(report.get_planar_roi_measurement_groups(finding_type=codes.SCT.IndividualCalcification)) == \
            len(isolated)


def test_a_series_where_one_image_is_normal_says_so_for_that_image(tmp_path):
    normal, _ = phantom.write(tmp_path / "a", 515152, dataclasses.replace(SMALL, clusters=0, isolated=0))
    with_clusters, _ = phantom.write(tmp_path / "b", 424242, dataclasses.replace(SMALL, clusters=2, isolated=0,
                                                                                   density=0.3, view="MLO"))
    first = pydicom.dcmread(normal)
    second = pydicom.dcmread(with_clusters)
    second.SeriesInstanceUID, second.StudyInstanceUID, second.InstanceNumber = (first.SeriesInstanceUID,
                                                                               first.StudyInstanceUID, 2)
    second.save_as(with_clusters)
    summary = run_local(MammoCad(), [normal, with_clusters], {}, tmp_path / "cad")
    assert summary["outcome"] == "clusters found" and summary["images_without_clusters"] == 1
    (statement,) = no_cluster_statements(tmp_path / "cad" / "sr-901-1.dcm")
    assert statement.tracking_identifier == "image 1: no cluster found"
    assert statement.source_images[0].referenced_sop_instance_uid == first.SOPInstanceUID
    findings = json.loads((tmp_path / "cad" / "findings.json").read_text())
    assert [i["outcome"] for i in findings["images"]] == ["no cluster found", "clusters found"]


def test_a_normal_mammogram_through_the_command_line(tmp_path):
    path, _ = phantom.write(tmp_path / "mg", 515151, dataclasses.replace(SMALL, **NORMAL["very dense"][0]))
    result = subprocess.run(M3DICOM + ["plugin", "run", "mammo-cad", str(path), "--out", str(tmp_path / "out"),
                                       "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["outcome"] == "no cluster found"
    assert_says_no_cluster(tmp_path / "out" / "sr-901-1.dcm", path, {})


def test_a_measurement_report_needs_a_finding_or_a_statement_that_none_was_found(tmp_path):
    from gpu_workers.plugin import Algorithm, Context
    from gpu_workers.results import measurement_report

    ctx = Context("x", Algorithm("a", "1", {}), np, "numpy", tmp_path)
    with pytest.raises(ValueError, match="nothing_found"):
        measurement_report([], [], ctx, name="sr", title="t", procedure=codes.SCT.Breast)


@pytest.mark.slow
@pytest.mark.interop
def test_the_node_runs_the_cad_on_a_normal_mammogram_and_records_found_nothing_apart_from_failed(
        make_node, storescp, tmp_path):
    """The issue's case over the real path: a dense L MLO without calcifications sent by storescu, the
    rule's job on the embedded Dask cluster, the results stored and forwarded. A mammogram the CAD
    cannot read fails its job instead: the records tell the two apart."""
    port, received = storescp
    node = make_node(remote={"DEST": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": port,
                                      "server_name": "localhost"}},
                     router={"rules": [{"name": "mammo", "match": {"Modality": "MG"}, "plugin": "mammo-cad",
                                        "forward_to": ["DEST"], "quiet_seconds": 1}]})
    made = subprocess.run([sys.executable, "-m", "gpu_workers.mammo.phantom", "--out", str(tmp_path / "mg"),
                           "--view", "LMLO", "--density", "extremely-dense", "--no-calcifications", "--seed", "40"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    (normal,) = (tmp_path / "mg").glob("*.dcm")
    unreadable = pydicom.dcmread(normal)          # another study: a mammogram without any pixel spacing
    del unreadable.PixelSpacing, unreadable.ImagerPixelSpacing
    unreadable.StudyInstanceUID, unreadable.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    unreadable.SOPInstanceUID = unreadable.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    unreadable.save_as(tmp_path / "unreadable.dcm")
    node.storescu(normal, tmp_path / "unreadable.dcm")
    study = str(pydicom.dcmread(normal).StudyInstanceUID)

    def finished():
        rows = node.rows("SELECT study_uid, state, summary, errors FROM jobs")
        return rows if len(rows) == 2 and all(r[1] in ("succeeded", "failed") for r in rows) else None
    jobs = {r[0]: r for r in wait_for(finished, timeout=240, what="both CAD jobs")}
    _, state, summary, errors = jobs[study]
    assert state == "succeeded" and json.loads(errors) == [], errors
    summary = json.loads(summary)
    assert summary["outcome"] == "no cluster found" and summary["clusters"] == 0
    _, failed_state, failed_summary, failed_errors = jobs[str(unreadable.StudyInstanceUID)]
    assert failed_state == "failed" and failed_summary is None and "Pixel Spacing" in json.loads(failed_errors)[-1]

    (blob,) = node.rows("SELECT r.blob_id FROM job_results r JOIN jobs j ON j.id = r.job_id "
                        "WHERE j.study_uid=? AND r.name='findings.json'", (study,))
    findings = json.loads(node.stored_bytes_of_blob(blob[0]))
    assert findings["clusters"] == [] and findings["images"][0]["outcome"] == "no cluster found"
    kinds = sorted(r[0] for r in node.rows("SELECT s.modality FROM instances i JOIN series s ON s.pk = i.series_pk "
                                           "WHERE i.job_id IS NOT NULL"))
    assert kinds == ["OT", "SR"]
    forwarded = wait_for(lambda: [p for p in arrived(received) if pydicom.dcmread(p).Modality == "SR"] or None,
                         timeout=60, what="the report at storescp")
    assert_says_no_cluster(forwarded[0], normal, {})


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
