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


HOSTILE_X3D = b"""<?xml version="1.0" encoding="UTF-8"?>
<X3D xmlns:h="http://www.w3.org/1999/xhtml"><Scene>
  <h:script>window.pwned = "script element";</h:script>
  <Script url='"javascript:window.pwned = 1"'/>
  <Background skyColor="0.12 0.14 0.17" onload="window.pwned = 'onload'"/>
  <Viewpoint position="0 0 60" description="front"/>
  <Transform onclick="window.pwned = 'onclick'">
    <Shape><Appearance><Material diffuseColor="0.9 0.9 0.9"/><ImageTexture url='"https://attacker.example/x.png"'/>
    </Appearance><IndexedTriangleSet index="0 1 2 0 2 3"><Coordinate point="-20 -20 0 20 -20 0 20 20 0 -20 20 0"/>
    </IndexedTriangleSet></Shape>
    <h:img src="x" onerror="window.pwned = 'img'"/>
  </Transform>
</Scene></X3D>"""


class HostileScene:
    """A plug-in gone bad: a 'model' whose scene carries scripts and handlers (the viewer must run none)."""
    name = "test-hostile-scene"
    version = "1.0"
    title = "Test: a scene with scripts in it"
    accepts = Accepts(modalities=("CT",), per="study")
    params = ()
    wants_gpu = False

    def run(self, inputs, params, ctx) -> Result:
        return Result([], [OutputFile("model.x3d", "model/x3d+xml", HOSTILE_X3D)], {"triangles": 2})
