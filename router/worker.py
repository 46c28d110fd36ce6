"""An external Dask worker's own settings (`m3dicom worker --config`), installed on the worker
as a plug-in: the job task (router/task.py) then opens that machine's archive and stages its
results in S3, instead of using the node's settings that come with each job."""
from __future__ import annotations

from distributed import Worker
from distributed.diagnostics.plugin import WorkerPlugin

from .settings import Settings
from .task import SETTINGS_PLUGIN


class WorkerSettings(WorkerPlugin):
    """Holds the settings; `router.task.own_settings()` reads them in the task."""
    name = SETTINGS_PLUGIN

    def __init__(self, settings: Settings):
        self.settings = settings


async def install(worker: Worker, settings: Settings) -> None:
    """Give `worker` these settings (a Dask preload's `dask_setup` awaits this)."""
    await worker.plugin_add(WorkerSettings(settings), name=SETTINGS_PLUGIN, catch_errors=False)
