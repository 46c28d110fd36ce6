"""The Dask task that runs a job: inputs from the blob store, the plug-in, outputs to the blob store.

Workers read their inputs themselves (local blobs or S3, through the archive's read path:
authenticated, SHA-256 checked) instead of receiving bytes through the scheduler, and
stage what the plug-in returns as encrypted blobs; the node then ingests the DICOM results
and keeps the files (`router.intake`). Plain-text copies live only in a private work
directory inside the data directory, removed when the job ends.

A worker of the node's embedded cluster uses the node's settings, which come with the job. An
external worker (`m3dicom worker --config`) has settings of its own, installed on it as the Dask
worker plug-in `SETTINGS_PLUGIN` (router/worker.py): it opens that archive, and stages results in
S3 when it has an S3 tier.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from archive import Archive
from archive import open as open_archive
from archive.inputs import InputInstance, InputSeries
from gpu_workers.backend import ENV as ARRAY_BACKEND_ENV
from gpu_workers.backend import array_module
from gpu_workers.plugin import Algorithm, Context, Instance, PluginError, Result, Series, check_params, discover

from .settings import Settings

__all__ = ["InputInstance", "InputSeries", "JobOutput", "JobSpec", "PROGRESS_TOPIC", "SETTINGS_PLUGIN",
           "StagedOutput", "run_job", "stage", "worker_backend"]

log = logging.getLogger(__name__)
PROGRESS_TOPIC = "m3dicom-progress"
SETTINGS_PLUGIN = "m3dicom-settings"    # the worker plug-in holding an external worker's own settings


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    plugin: str
    params: dict
    inputs: tuple[InputSeries, ...]
    config: Settings                    # the node's settings (storage, keys, plug-ins)
    predecessors: tuple[dict, ...] = ()


@dataclass(frozen=True)
class StagedOutput:
    kind: str                           # dicom | file
    name: str
    media_type: str
    blob_id: str
    size: int                           # plaintext bytes
    sha256: str                         # of the plaintext
    sop_instance_uid: str | None = None
    in_s3: bool = False                 # staged in S3 (a worker with its own settings), not the node's local store


@dataclass(frozen=True)
class JobOutput:
    outputs: tuple[StagedOutput, ...]
    summary: dict
    backend: str
    seconds: float
    started_at: float                   # wall clock: the worker began the job
    returned_at: float                  # wall clock: the plug-in returned


_ARCHIVES: dict[str, Archive] = {}   # per worker process: opened once, kept while the worker lives


def own_settings() -> Settings | None:
    """This worker's own settings (`m3dicom worker --config`), or None on the node's workers."""
    try:
        from distributed import get_worker
        plugin = get_worker().plugins.get(SETTINGS_PLUGIN)
    except (ImportError, ValueError):          # not in a Dask worker (a test runs the task inline)
        return None
    return getattr(plugin, "settings", None)


def _archive(settings: Settings) -> Archive:
    """The archive of `settings`, opened once per process."""
    key = str(settings.data_dir)
    if key not in _ARCHIVES:
        _ARCHIVES[key] = open_archive(settings)
    return _ARCHIVES[key]


def _progress(job_id: str):
    try:
        from distributed import get_worker
        worker = get_worker()
    except (ImportError, ValueError):
        return lambda fraction, message="": log.info("job %s: %.0f%% %s", job_id, 100 * fraction, message)

    def report(fraction: float, message: str = "") -> None:
        worker.log_event(PROGRESS_TOPIC, {"job": job_id, "fraction": float(fraction), "message": str(message)[:200]})
    return report


def worker_backend() -> str | None:
    """'numpy' on a Dask worker that declares no GPU resource (`m3dicom worker --gpus 0` on a machine
    with a GPU, say): no job there takes a GPU. None elsewhere: the default choice (CuPy when a device
    is there; on a GPU worker, also for jobs that did not ask for the GPU), or what
    M3DICOM_ARRAY_BACKEND forces."""
    if os.environ.get(ARRAY_BACKEND_ENV, "").strip():
        return None
    try:
        from distributed import get_worker
        worker = get_worker()
    except (ImportError, ValueError):
        return None
    state = getattr(worker, "state", worker)
    return None if getattr(state, "total_resources", {}).get("GPU", 0) else "numpy"


def run_job(spec: JobSpec) -> JobOutput:
    """Run one job on this worker; exceptions travel back to the router as the attempt's error."""
    started, started_at = time.perf_counter(), time.time()
    own = own_settings()
    archive = _archive(own or spec.config)
    plugins = discover(spec.config.router.plugins)
    if spec.plugin not in plugins:
        raise PluginError(f"plug-in {spec.plugin!r} is not installed on worker (have: {', '.join(plugins) or 'none'})")
    plugin = plugins[spec.plugin]
    params = check_params(plugin, spec.params)
    xp, backend = array_module(worker_backend())
    spool = spec.config.data_dir / "spool" / "jobs"
    spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{spec.job_id}-", dir=spool)))
        series = []
        for item in spec.inputs:
            instances = tuple(Instance(i.sop_instance_uid, i.sop_class_uid,
                                       stack.enter_context(archive.exported(i.blob_id, i.sha256, work)),
                                       archive.limits)
                              for i in item.instances)
            series.append(Series(item.series_uid, item.modality, instances))
        ctx = Context(spec.job_id, Algorithm(plugin.name, plugin.version, params), xp, backend, work,
                      _progress(spec.job_id), tuple(spec.predecessors))
        result = plugin.run(series, params, ctx)
        returned_at = time.time()
        outputs = stage(archive, result, to_remote=own is not None)
    return JobOutput(tuple(outputs), result.summary, backend, time.perf_counter() - started, started_at, returned_at)


def stage(archive: Archive, result: Result, to_remote: bool = False) -> list[StagedOutput]:
    """Each output as an encrypted blob: in the node's local store when this worker shares its
    data directory, in S3 when it runs with settings of its own (another machine: `to_remote`)."""
    from gpu_workers.results import encode           # (highdicom: imported where results are made, not by the node)

    store = archive.remote if to_remote and archive.remote is not None else archive.local
    in_s3 = store is not archive.local
    staged = []
    for dataset in result.datasets:
        data = encode(dataset)
        blob = store.create([data])
        staged.append(StagedOutput("dicom", f"{dataset.Modality.lower()}-{dataset.SOPInstanceUID}",
                                   "application/dicom", blob.blob_id, len(data), hashlib.sha256(data).hexdigest(),
                                   str(dataset.SOPInstanceUID), in_s3))
    for item in result.files:
        blob = store.create([item.data])
        staged.append(StagedOutput("file", item.name, item.media_type, blob.blob_id, len(item.data),
                                   hashlib.sha256(item.data).hexdigest(), in_s3=in_s3))
    return staged
