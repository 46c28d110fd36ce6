"""Bone-model benchmark: time and peak memory per stage, the real CT head and a 512x512x300 volume.

Data: Debian's invesalius-examples Cranium.inv3 (108 x 256 x 256, written as a CT series),
and the same head resampled to 300 x 512 x 512 (0.48 mm pixels, 0.54 mm slices). Each runs
the plug-in's stages in a process of its own whose memory is sampled every 10 ms: load
(DICOM slices to a volume), segment (smoothing, threshold, clean-up, parts), marching
cubes, decimation (and repair), writing (X3D, STL, key image, DICOM objects). Prints the
stage times, peak resident memory, triangles and X3D sizes; NumPy here, CuPy when a GPU is
there (M3DICOM_ARRAY_BACKEND). Not a test.

    .venv/bin/python bench/bone_mesh.py
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

STAGES = """
import json, sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
import numpy as np
from gpu_workers.backend import array_module
from gpu_workers.bone import mesh as meshing
from gpu_workers.bone.plugin import BoneModel
from gpu_workers.bone.scene import key_image, x3d
from gpu_workers.bone.volume import load
from gpu_workers.local import series_of
from gpu_workers.plugin import Algorithm, Context, check_params
from gpu_workers.results import encapsulated_stl, encode, secondary_capture

def mark(name):
    print("stage", name, time.perf_counter(), flush=True)

xp, backend = array_module()
params = check_params(BoneModel(), {{}})
ctx = Context("bench", Algorithm("bone-model", "1", params), xp, backend, Path("."))
mark("start")
series = series_of(sorted(Path({folder!r}).iterdir()))
datasets = [i.dataset() for i in series[0].instances]
volume = load(datasets)
mark("load")
seg = meshing.segment(volume, xp)
mark("segment")
full, info = meshing.surface(volume, seg, resolution_mm=params["resolution_mm"])
mark("marching cubes")
model = meshing.simplify(full, params["triangles"])
phone = meshing.simplify(model, params["phone_triangles"], smooth=False)
mark("decimation")
scene = x3d([model, phone], "bench")
stl = model.trimesh.export(file_type="stl")
source = datasets[len(datasets) // 2]
objects = [encapsulated_stl(source, stl, ctx, name="stl", title="bench"),
           secondary_capture(source, key_image(volume, seg.field[1:-1, 1:-1, 1:-1] > seg.threshold), ctx,
                             name="sc", description="bench")]
sizes = [len(encode(o)) for o in objects]
mark("writing")
print("result", json.dumps({{"voxels": int(volume.values.size), "mc_triangles": int(len(full.faces)), "step": info["step"],
                            "triangles": int(len(model.faces)), "phone": int(len(phone.faces)),
                            "x3d_mb": len(scene) / 1e6, "phone_x3d_mb": len(x3d([phone], "p")) / 1e6,
                            "stl_mb": len(stl) / 1e6, "backend": backend}}), flush=True)
"""


def run(folder: Path) -> tuple[list[tuple[str, float, float]], dict]:
    proc = subprocess.Popen([sys.executable, "-c", STAGES.format(root=str(ROOT), folder=str(folder))],
                            stdout=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample():
        process = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                peak[0] = max(peak[0], process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    stages, result, last = [], {}, None
    for line in proc.stdout:
        if line.startswith("stage"):
            name, at = line.split(" ", 1)[1].rsplit(" ", 1)
            at = float(at)
            if last is not None:
                stages.append((name, at - last, peak[0] / 1e6))
                peak[0] = 0
            last = at
        elif line.startswith("result"):
            result = json.loads(line.split(" ", 1)[1])
    done.set()
    proc.wait()
    return stages, result


def main() -> int:
    import cranium
    from scipy import ndimage

    volume, spacing = cranium.load()
    rows = []
    with tempfile.TemporaryDirectory(prefix="m3bench-bone-") as tmp:
        work = Path(tmp)
        cranium.write_series(work / "head", volume, spacing)
        big = ndimage.zoom(volume, (300 / volume.shape[0], 512 / volume.shape[1], 512 / volume.shape[2]), order=1)
        big_spacing = (spacing[0] * volume.shape[2] / 512, spacing[1] * volume.shape[1] / 512,
                       spacing[2] * volume.shape[0] / 300)
        cranium.write_series(work / "big", big, big_spacing)
        for name, folder in (("Cranium 256x256x108", work / "head"), ("upsampled 512x512x300", work / "big")):
            print(f"{name} ...", file=sys.stderr)
            stages, result = run(folder)
            rows.append((name, stages, result))
    stage_names = [s[0] for s in rows[0][1]]
    print("\nBone model, NumPy on the 2-core machine: seconds (peak resident MB) per stage\n")
    print("| volume | " + " | ".join(stage_names) + " | total | triangles (marching cubes -> model / phone) | "
          "X3D MB (phone) |")
    print("|---|" + "---|" * (len(stage_names) + 3))
    for name, stages, result in rows:
        cells = [f"{seconds:.1f} ({peak:.0f})" for _, seconds, peak in stages]
        total = sum(s for _, s, _ in stages)
        peak = max(p for _, _, p in stages)
        print(f"| {name} | " + " | ".join(cells) + f" | {total:.1f} s, peak {peak:.0f} MB | "
              f"{result['mc_triangles']} -> {result['triangles']} / {result['phone']} | "
              f"{result['x3d_mb']:.1f} ({result['phone_x3d_mb']:.1f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
