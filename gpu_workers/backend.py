"""The array backend: CuPy when it imports and a CUDA device exists, else NumPy.

`M3DICOM_ARRAY_BACKEND=numpy|cupy` forces one (cupy without a device is an error, not a
silent fall-back). Plug-ins are written once against `xp` and call `to_numpy` at the edges.
"""
from __future__ import annotations

import os
from types import ModuleType

import numpy

ENV = "M3DICOM_ARRAY_BACKEND"


class BackendError(RuntimeError):
    """The backend asked for cannot be used here."""


def gpu_count() -> int:
    """CUDA devices usable through CuPy (0 when CuPy or a device is missing)."""
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # ImportError, CUDARuntimeError, a driver that is not there
        return 0


def array_module(wanted: str | None = None) -> tuple[ModuleType, str]:
    """(xp, name): the forced backend, else CuPy with a device, else NumPy."""
    wanted = (wanted or os.environ.get(ENV, "")).strip().lower()
    if wanted not in ("", "numpy", "cupy"):
        raise BackendError(f"{ENV}={wanted!r}: expected numpy or cupy")
    if wanted == "numpy":
        return numpy, "numpy"
    if wanted == "cupy" or gpu_count():
        if not gpu_count():
            raise BackendError(f"{ENV}=cupy, but CuPy or a CUDA device is not available")
        import cupy
        return cupy, "cupy"
    return numpy, "numpy"


def to_numpy(array):
    """A NumPy array from either backend."""
    get = getattr(array, "get", None)
    return get() if callable(get) else numpy.asarray(array)
