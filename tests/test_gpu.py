"""The GPU path: CuPy finds, measures and models what NumPy does, and a job takes its worker's backend.

The tests marked `gpu` need CuPy (the `gpu` extra) and a CUDA device; elsewhere they are
skipped, saying so. `bench/gpu-check.sh` runs them, and `bench/gpu.py`, on a GPU machine. The
choice of backend by a Dask worker's declared resources is checked everywhere.

Tolerances (why they are not zero): both backends run the same passes in float32, but in
another order of additions (CUDA kernels, scipy's C loops), so a candidate whose peak sits
at a threshold can come or go, and a patch's statistics move in their last digits.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest
from scipy.spatial import cKDTree

import cranium
from gpu_workers.backend import gpu_count
from gpu_workers.bone import mesh as meshing
from gpu_workers.bone.volume import load as load_volume
from gpu_workers.mammo import detect, phantom
from gpu_workers.mammo.model import Model, clusters
from helpers import M3DICOM, ROOT, free_port, wait_for

needs_gpu = pytest.mark.skipif(gpu_count() == 0, reason="no CUDA device or no CuPy here (bench/gpu-check.sh "
                                                         "runs these on a GPU machine)")
PHANTOMS = {
    "mlo-two-clusters": (424242, phantom.Options(rows=900, columns=720, spacing=0.1, clusters=2, isolated=3,
                                                 density=0.3, view="MLO")),
    "cc-dense-normal": (7, phantom.Options(rows=900, columns=720, spacing=0.1, clusters=0, isolated=2, density=0.8,
                                           view="CC", laterality="L")),
    "full-field-monochrome1": (20999, phantom.Options(rows=4096, columns=3328, spacing=0.07, clusters=2, isolated=3,
                                                      monochrome1=True)),
}
MATCH_PX = 0.5          # a candidate of one backend is the other's when their centres are this close
FEATURE_RTOL = 1e-3     # relative, with an absolute floor of the same size
FEATURE_ROWS = 0.97     # share of matched candidates whose every feature agrees so
PROBABILITY_ATOL = 0.01


def _cupy():
    import cupy
    return cupy


def _detect(ds, xp):
    image = detect.load(ds, xp)
    mask, _, skin = detect.masks(image, xp)
    return image, detect.candidates(image, mask, skin, xp)


def _matched(a: detect.Candidates, b: detect.Candidates) -> list[tuple[int, int]]:
    if not len(a.x) or not len(b.x):
        return []
    distance, nearest = cKDTree(np.column_stack([b.x, b.y])).query(np.column_stack([a.x, a.y]))
    return [(i, int(j)) for i, (d, j) in enumerate(zip(distance, nearest)) if d <= MATCH_PX]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", list(PHANTOMS))
def test_cupy_finds_the_candidates_features_and_scores_numpy_finds(name, tmp_path):
    seed, opts = PHANTOMS[name]
    path, _ = phantom.write(tmp_path, seed, opts)
    ds = pydicom.dcmread(path)
    model = Model.load()
    calc_threshold, cluster_threshold = model.operating_point(0.5)
    found, groups = {}, {}
    for xp in (np, _cupy()):
        image, found[xp.__name__] = _detect(ds, xp)
        scores = model.probabilities(found[xp.__name__].features)
        groups[xp.__name__] = ([c for c in clusters(found[xp.__name__].x, found[xp.__name__].y, scores,
                                                    image.spacing, threshold=calc_threshold)
                                if c.score >= cluster_threshold], scores)
    cpu, gpu = found["numpy"], found["cupy"]
    pairs = _matched(cpu, gpu)
    i, j = (np.array([p[k] for p in pairs], dtype=int) for k in (0, 1))
    close = np.abs(cpu.features[i] - gpu.features[j]) <= FEATURE_RTOL * np.maximum(np.abs(cpu.features[i]), 1)
    p_cpu, p_gpu = groups["numpy"][1][i], groups["cupy"][1][j]
    report = {"phantom": name, "candidates": [len(cpu.x), len(gpu.x)], "matched": len(pairs),
              "features_agree": float(close.all(axis=1).mean()) if len(pairs) else 1.0,
              "worst_feature_rel": float((np.abs(cpu.features[i] - gpu.features[j])
                                          / np.maximum(np.abs(cpu.features[i]), 1)).max()) if len(pairs) else 0.0,
              "max_probability_diff": float(np.abs(p_cpu - p_gpu).max()) if len(pairs) else 0.0,
              "clusters": [len(groups["numpy"][0]), len(groups["cupy"][0])]}
    print("GPU-PARITY", json.dumps(report))
    assert len(pairs) >= 0.98 * max(len(cpu.x), len(gpu.x)), report
    assert report["features_agree"] >= FEATURE_ROWS, report
    assert np.mean(np.abs(p_cpu - p_gpu) <= PROBABILITY_ATOL) >= FEATURE_ROWS, report
    a, b = groups["numpy"][0], groups["cupy"][0]
    assert len(a) == len(b), report
    for cluster in a:
        assert min(np.hypot(cluster.x - other.x, cluster.y - other.y) for other in b) * opts.spacing <= 1.0, report


@pytest.mark.gpu
@needs_gpu
@pytest.mark.skipif(not cranium.CRANIUM.exists(), reason="Debian's invesalius-examples is not installed")
def test_cupy_makes_the_bone_model_numpy_makes(tmp_path):
    volume_hu, spacing = cranium.load()
    volume = load_volume([pydicom.dcmread(p) for p in cranium.write_series(tmp_path, volume_hu, spacing)])
    made = {}
    for xp in (np, _cupy()):
        seg = meshing.segment(volume, xp)
        full, _ = meshing.surface(volume, seg)
        model = meshing.simplify(full, 100000)
        made[xp.__name__] = (seg, full, model)
    (seg_cpu, full_cpu, model_cpu), (seg_gpu, full_gpu, model_gpu) = made["numpy"], made["cupy"]
    volumes = [abs(float(m.trimesh.volume)) for m in (model_cpu, model_gpu)]
    report = {"parts": [seg_cpu.parts, seg_gpu.parts], "field_max_diff_hu": float(np.abs(seg_cpu.field - seg_gpu.field).max()),
              "marching_cubes_triangles": [len(full_cpu.faces), len(full_gpu.faces)],
              "triangles": [len(model_cpu.faces), len(model_gpu.faces)], "volume_ml": [v / 1000 for v in volumes]}
    print("GPU-PARITY", json.dumps(report))
    assert seg_cpu.parts == seg_gpu.parts and seg_cpu.crop == seg_gpu.crop, report
    assert report["field_max_diff_hu"] < 0.5, report
    assert abs(len(full_cpu.faces) - len(full_gpu.faces)) <= 0.01 * len(full_cpu.faces), report
    assert abs(len(model_cpu.faces) - len(model_gpu.faces)) <= 0.01 * len(model_cpu.faces), report
    assert abs(volumes[0] - volumes[1]) <= 0.005 * volumes[0], report


# -- the backend follows the worker's declared resources ---------------------------------

def _backend_here() -> str:
    from router.task import worker_backend
    return str(worker_backend())


def test_a_worker_without_the_gpu_resource_runs_numpy_one_with_it_the_default(monkeypatch):
    from distributed import Client, LocalCluster

    from gpu_workers.backend import ENV

    monkeypatch.delenv(ENV, raising=False)          # a forced backend wins over the resources (docs/gpu.md)

    for resources, expected in ((None, "numpy"), ({"GPU": 1}, "None")):
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, resources=resources,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            assert client.submit(_backend_here, pure=False).result(timeout=30) == expected


@pytest.mark.gpu
@needs_gpu
@pytest.mark.slow
def test_an_external_gpu_worker_runs_a_gpu_job_with_cupy_and_a_cpu_worker_with_numpy(tmp_path):
    from distributed import Client
    from sqlalchemy import text

    from archive import Archive
    from archive.inputs import input_series
    from node.config import from_dict
    from router.task import JobSpec, run_job

    config = from_dict({"node": {"data_dir": str(tmp_path / "node")}}, tmp_path)
    archive = Archive(config.data_dir)
    path, _ = phantom.write(tmp_path / "mg", 424242, PHANTOMS["mlo-two-clusters"][1])
    assert archive.ingest_file(path).outcome.ok
    series = input_series(archive.index, archive.index.read(text("SELECT series_uid FROM series"))[0][0])
    port = free_port()
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in ("scheduler", "gpu", "cpu")}
    processes = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                   "--port", str(port), "--no-dashboard"], stdout=logs["scheduler"],
                                  stderr=subprocess.STDOUT)]
    try:
        for name, gpus in (("gpu", "1"), ("cpu", "0")):
            processes.append(subprocess.Popen(M3DICOM + ["worker", "--scheduler", f"tcp://127.0.0.1:{port}",
                                                         "--gpus", gpus], cwd=ROOT, stdout=logs[name],
                                              stderr=subprocess.STDOUT))
        with Client(f"tcp://127.0.0.1:{port}", timeout="30s") as client:
            workers = wait_for(lambda: (lambda w: w if len(w) == 2 else None)(
                client.scheduler_info(n_workers=-1)["workers"]), timeout=60, what="two workers")
            (cpu_worker,) = [address for address, w in workers.items() if not w.get("resources", {}).get("GPU")]
            started = time.perf_counter()
            on_gpu = client.submit(run_job, JobSpec("gpu-job", "mammo-cad", {}, (series,), config),
                                   resources={"GPU": 1}, pure=False).result(timeout=180)
            on_cpu = client.submit(run_job, JobSpec("cpu-job", "mammo-cad", {}, (series,), config),
                                   workers=[cpu_worker], pure=False).result(timeout=180)
        print("GPU-WORKER", json.dumps({"gpu": [on_gpu.backend, round(on_gpu.seconds, 2)],
                                        "cpu": [on_cpu.backend, round(on_cpu.seconds, 2)],
                                        "wall": round(time.perf_counter() - started, 1)}))
        assert on_gpu.backend == "cupy" and on_gpu.summary["backend"] == "cupy"
        assert on_cpu.backend == "numpy" and on_cpu.summary["backend"] == "numpy"
        assert on_gpu.summary["clusters"] == on_cpu.summary["clusters"]
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(15)
        archive.close()
    assert "1 GPU(s)" in (tmp_path / "gpu.log").read_text() and "0 GPU(s)" in (tmp_path / "cpu.log").read_text()
