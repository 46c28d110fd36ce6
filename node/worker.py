"""Dask preload of `m3dicom worker --config FILE`: the worker process loads this machine's
configuration and installs it on its Dask worker (router/worker.py), so that nothing below
node/ reads a configuration file."""
from __future__ import annotations

import os
from pathlib import Path

CONFIG_ENV = "M3DICOM_WORKER_CONFIG"   # the configuration file, set by `m3dicom worker --config`


def dask_setup(worker):
    """Called by Dask in each worker process it starts with `--preload node.worker`."""
    from router.worker import install

    from .config import load

    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise RuntimeError(f"{CONFIG_ENV} is not set: start workers with `m3dicom worker --config FILE`")
    return install(worker, load(Path(path)))
