"""The bone-model plug-in: a CT or dental CBCT series becomes a light 3D model a phone can turn.

Results: an X3D scene with two levels of detail (model.x3d) and the phone level alone
(model-phone.x3d); the same mesh as a DICOM Encapsulated STL in the source study and
frame of reference (so a PACS keeps it with the images); a Secondary Capture key image (a
shaded front view of the extracted bone) that any DICOM viewer shows; and a summary
(triangles, vertices, threshold, volume, surface, bounds).
"""
from __future__ import annotations

import time

import numpy as np

from gpu_workers.plugin import Accepts, Context, OutputFile, Param, PluginError, Result, Series
from gpu_workers.results import encapsulated_stl, secondary_capture

from . import mesh as meshing
from .scene import key_image, x3d
from .volume import load


class BoneModel:
    name = "bone-model"
    version = "1.0.0"
    title = "3D bone model from CT or dental CBCT"
    accepts = Accepts(modalities=("CT",), per="series")
    params = (
        Param("threshold", "float", 300.0, "Bone threshold in Hounsfield units (used when the values are HU).",
              -1000.0, 4000.0, unit="HU"),
        Param("threshold_mode", "choice", "auto", "auto: HU when the values are HU (air near -1000), else Otsu; "
              "hu; otsu; valley (the histogram's minimum between tissue and bone).", choices=meshing.MODES),
        Param("smoothing_mm", "float", 0.5, "Gaussian smoothing before thresholding; 0: none.", 0.0, 3.0, unit="mm"),
        Param("triangles", "int", 100000, "Triangle budget of the model.", 1000, 2000000),
        Param("phone_triangles", "int", 25000, "Triangles of the level of detail for phones.", 500, 500000),
        Param("keep_fraction", "float", 0.1, "Connected parts kept: at least this share of the largest one "
              "(drops the table and the head rest).", 0.0, 1.0),
        Param("resolution_mm", "float", 1.0, "Marching cubes sampling: every voxel, or every few voxels to about "
              "this (the triangle budget sets the detail kept); 0: every voxel.", 0.0, 5.0, unit="mm"),
    )
    wants_gpu = True

    def run(self, inputs: list[Series], params: dict, ctx: Context) -> Result:
        if len(inputs) != 1:
            raise PluginError("the bone model takes one CT series")
        started = time.perf_counter()
        timings = {}
        ctx.progress(0.0, "reading the slices")
        datasets = [instance.dataset() for instance in inputs[0].instances]
        volume = load(datasets)
        timings["load"] = time.perf_counter() - started
        ctx.progress(0.15, "segmenting")
        seg = meshing.segment(volume, ctx.xp, threshold=params["threshold"], mode=params["threshold_mode"],
                              smoothing_mm=params["smoothing_mm"], keep_fraction=params["keep_fraction"])
        timings.update(seg.timings)
        ctx.progress(0.4, "marching cubes")
        full, surface_timings = meshing.surface(volume, seg, resolution_mm=params["resolution_mm"])
        timings.update(surface_timings)
        ctx.progress(0.6, f"decimating {len(full.faces)} triangles")
        clock = time.perf_counter()
        phone_budget = min(params["phone_triangles"], params["triangles"])
        model = meshing.simplify(full, params["triangles"])
        phone = meshing.simplify(model, phone_budget, smooth=False)
        timings["decimate"] = time.perf_counter() - clock
        ctx.progress(0.8, "writing the scene and the DICOM objects")
        clock = time.perf_counter()
        tm = model.trimesh
        title = f"Bone model, {seg.mode} threshold {seg.threshold:.0f}"
        scene = x3d([model, phone], title)
        stl = tm.export(file_type="stl")
        source = datasets[len(datasets) // 2]
        objects = [encapsulated_stl(source, stl, ctx, name="stl", title=title,
                                    frame_of_reference=volume.frame_of_reference)]
        keep = seg.field[1:-1, 1:-1, 1:-1] > seg.threshold
        image = key_image(volume, keep)
        spacing = min(volume.spacing) * max(keep.shape) / max(image.shape)
        objects.append(secondary_capture(source, image, ctx, name="sc", description="Bone model: front view",
                                         pixel_spacing=(round(spacing, 4), round(spacing, 4))))
        timings["write"] = time.perf_counter() - clock
        low, high = model.vertices.min(axis=0), model.vertices.max(axis=0)
        watertight = bool(tm.is_watertight)
        voxel_ml = float(keep.sum()) * float(np.prod(volume.spacing)) / 1000
        summary = {
            "triangles": int(len(model.faces)), "vertices": int(len(model.vertices)),
            "phone_triangles": int(len(phone.faces)),
            "threshold_hu": round(seg.threshold, 1) if seg.mode == "hu" else None,
            "threshold": round(seg.threshold, 1), "threshold_mode": seg.mode,
            "volume_ml": round(abs(float(tm.volume)) / 1000 if watertight else voxel_ml, 2),
            "surface_mm2": round(float(tm.area), 1),
            "bounds_mm": [np.round(low, 2).tolist(), np.round(high, 2).tolist()],
            "watertight": watertight, "parts": seg.parts, "marching_cubes_triangles": int(len(full.faces)),
            "backend": ctx.backend, "seconds": {k: round(v, 2) if isinstance(v, float) else v
                                                for k, v in timings.items()},
        }
        ctx.progress(1.0, f"{summary['triangles']} triangles")
        files = [OutputFile("model.x3d", "model/x3d+xml", scene),
                 OutputFile("model-phone.x3d", "model/x3d+xml", x3d([phone], title + " (phone)"))]
        return Result(objects, files, summary)
