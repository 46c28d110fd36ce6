"""Small plug-ins for the router tests (loaded through `router.plugins`, PYTHONPATH=tests)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from pydicom.sr.coding import Code

from gpu_workers.backend import to_numpy
from gpu_workers.plugin import Accepts, OutputFile, Param, PluginError, Result
from gpu_workers.results import Finding, measurement_report, secondary_capture


class MarkedCopy:
    """An SC of the series' first image (8-bit, a square drawn at the centre) and an SR naming it."""
    name = "test-sc"
    version = "1.0"
    title = "Test: a marked copy and a report"
    accepts = Accepts(modalities=("CT", "MR"), per="series")
    params = (Param("sleep", "float", 0.0, "Seconds to wait before working (to kill a worker meanwhile).", 0, 600),
              Param("marker_dir", "str", "", "A folder where the worker notes its process id."),
              Param("size", "int", 8, "Half the side of the square, pixels.", 1, 100))
    wants_gpu = False

    def run(self, inputs, params, ctx) -> Result:
        if params["marker_dir"]:
            (Path(params["marker_dir"]) / f"{ctx.job_id}-{os.getpid()}").write_text(str(os.getpid()))
        steps = 10
        for step in range(steps):
            ctx.progress(step / steps, f"waiting {step}/{steps}")
            time.sleep(params["sleep"] / steps)
        source = inputs[0].instances[0].dataset()
        pixels = ctx.xp.asarray(source.pixel_array.astype(np.float32))
        low, high = float(pixels.min()), float(pixels.max())
        image = to_numpy((pixels - low) / max(high - low, 1) * 255).astype(np.uint8)
        rows, cols = image.shape
        r, c, h = rows // 2, cols // 2, params["size"]
        image[r - h:r + h, c - h] = image[r - h:r + h, c + h] = 255
        image[r - h, c - h:c + h] = image[r + h, c - h:c + h] = 255
        sc = secondary_capture(source, image, ctx, name="sc", description="test marked copy")
        finding = Finding("T1", Code("112179", "DCM", "Image Region"), source, "CIRCLE",
                          np.array([[c, r], [c + h, r]]))
        sr = measurement_report([finding], [source], ctx, name="sr", title="test report",
                                procedure=Code("77477000", "SCT", "CT"))
        ctx.progress(1.0, "done")
        return Result([sc, sr], [OutputFile("note.txt", "text/plain", b"one finding\n")],
                      {"instances": sum(len(s.instances) for s in inputs), "findings": 1})


class AlwaysFails:
    name = "test-fail"
    version = "1.0"
    title = "Test: always raises"
    accepts = Accepts(modalities=("CT",), per="study")
    params = ()
    wants_gpu = False

    def run(self, inputs, params, ctx) -> Result:
        raise RuntimeError("this plug-in always fails")


class RefusesInput:
    name = "test-refuse"
    version = "1.0"
    title = "Test: refuses its input"
    accepts = Accepts(modalities=("CT",), per="study")
    params = ()
    wants_gpu = False

    def run(self, inputs, params, ctx) -> Result:
        raise PluginError("this is not the image this plug-in expects")
