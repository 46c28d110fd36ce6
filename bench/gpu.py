"""GPU benchmark: the two plug-ins with NumPy and with CuPy, and where each spends its time.

Workloads: the mammography CAD on a full-field 4096x3328 phantom with two clusters (0.07 mm),
and the bone model of the real CT head (Debian's invesalius-examples) resampled to
512x512x300. Each backend asked for runs each plug-in once to warm up (CuPy compiles its
kernels on first use: that run is reported as "first") and then `--runs` times; the table
gives the median. Stages are timed with the GPU synchronised at their ends; "to host" is the
time spent copying arrays from the GPU (CuPy only).

    .venv/bin/python bench/gpu.py [--backend numpy|cupy ...] [--json FILE] [--runs 3]
    .venv/bin/python bench/gpu.py --table numpy.json cupy.json [--plot docs/gpu_times.png]

The first form measures on this machine (CuPy needs a CUDA device: bench/gpu-check.sh runs it
on a GPU machine); the second prints the README's table from saved results (NumPy measured on
one machine, CuPy on another) and draws it. Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

TARGETS = {"mammo-cad": 0.3, "bone-model": 3.0}     # seconds on the GPU (issue 21)


class Stages:
    """Time per named stage; the GPU's queue is drained at each stage's end."""

    def __init__(self, xp):
        self.xp, self.times = xp, {}

    def sync(self) -> None:
        if self.xp.__name__ == "cupy":
            self.xp.cuda.get_current_stream().synchronize()

    @contextmanager
    def stage(self, name: str):
        self.sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - started


def _wrap(module, name: str, stages: Stages, label: str):
    original = getattr(module, name)

    def timed(*args, **kwargs):
        with stages.stage(label):
            return original(*args, **kwargs)
    setattr(module, name, timed)
    return original


def _runs(plugin, series, xp, backend: str, work: Path, runs: int) -> tuple[float, list[tuple[float, object]]]:
    """(seconds of a first run, [(seconds, result)] of `runs` more) of the plug-in with its defaults."""
    from gpu_workers.plugin import Algorithm, Context, check_params

    params = check_params(plugin, {})

    def once(label: str):
        ctx = Context(label, Algorithm(plugin.name, plugin.version, params), xp, backend, work)
        started = time.perf_counter()
        result = plugin.run(series, params, ctx)
        return time.perf_counter() - started, result

    first, _ = once("first")
    return first, [once(f"run{k}") for k in range(runs)]


def mammo(xp, backend: str, runs: int) -> dict:
    """The CAD on a full-field image: the plug-in's time, and its stages."""
    import pydicom

    from gpu_workers.mammo import detect, phantom
    from gpu_workers.mammo import plugin as mammo_plugin
    from gpu_workers.local import series_of

    opts = phantom.Options(rows=4096, columns=3328, spacing=0.07, clusters=2, isolated=3)
    with tempfile.TemporaryDirectory(prefix="m3bench-gpu-") as tmp:
        path, _ = phantom.write(Path(tmp), 20999, opts)
        series = series_of([path])
        first, measured = _runs(mammo_plugin.MammoCad(), series, xp, backend, Path(tmp), runs)
        totals = [t for t, _ in measured]
        # the stages of one more run, each timed with the GPU drained at its end
        stages = Stages(xp)
        ds = pydicom.dcmread(path)
        patched = [(detect, name, _wrap(detect, name, stages, label)) for name, label in
                   (("zscores", "band-pass and z-scores (xp)"), ("_features", "features (xp)"),
                    ("to_numpy", "to host"))]
        try:
            with stages.stage("read and decode (CPU)"):
                ds.pixel_array
            with stages.stage("to attenuation (xp)"):
                image = detect.load(ds, xp)
            with stages.stage("breast and muscle masks"):
                mask, _, skin = detect.masks(image, xp)
            with stages.stage("candidates, all"):
                found = detect.candidates(image, mask, skin, xp)
            model = mammo_plugin._model()
            with stages.stage("classifier (scikit-learn, CPU)"):
                scores = model.probabilities(found.features)
        finally:
            for module, name, original in patched:
                setattr(module, name, original)
        times = dict(stages.times)
        to_host = times.pop("to host", 0.0)              # inside the stages above: shown, not added
        whole = sum(times.values()) - times["band-pass and z-scores (xp)"] - times["features (xp)"]
        times["candidates: labels, peaks, patches (xp)"] = (times.pop("candidates, all") - times["features (xp)"]
                                                            - times["band-pass and z-scores (xp)"])
        times["rest of the plug-in: clusters, SC, SR (CPU)"] = max(0.0, statistics.median(totals) - whole)
        if backend == "cupy":
            times["to host"] = to_host
        return {"workload": "mammo-cad", "what": "full-field 4096x3328 phantom", "backend": backend,
                "seconds": statistics.median(totals), "first": first, "runs": totals, "analysis": whole,
                "candidates": int(len(scores)), "stages": times}


def bone(xp, backend: str, runs: int) -> dict:
    """The bone model of a 512x512x300 CT: the plug-in's time, and its stages (its own timings)."""
    from scipy import ndimage

    import cranium
    from gpu_workers.bone.plugin import BoneModel
    from gpu_workers.local import series_of

    volume, spacing = cranium.load()
    big = ndimage.zoom(volume, (300 / volume.shape[0], 512 / volume.shape[1], 512 / volume.shape[2]), order=1)
    big_spacing = (spacing[0] * volume.shape[2] / 512, spacing[1] * volume.shape[1] / 512,
                   spacing[2] * volume.shape[0] / 300)
    del volume
    with tempfile.TemporaryDirectory(prefix="m3bench-gpu-") as tmp:
        series = series_of(cranium.write_series(Path(tmp) / "big", big, big_spacing))
        del big
        first, measured = _runs(BoneModel(), series, xp, backend, Path(tmp), runs)
        totals = [t for t, _ in measured]
        middle = sorted(measured, key=lambda m: m[0])[len(measured) // 2][1]
        names = {"load": "read and decode slices (CPU)", "smooth": "smoothing (xp)",
                 "segment": "threshold, parts (xp)", "prepare": "crop, to host", "marching_cubes":
                 "marching cubes (CPU)", "decimate": "decimation and repair (CPU)", "write": "X3D, STL, SC (CPU)"}
        stages = {label: middle.summary["seconds"][key] for key, label in names.items()}
        return {"workload": "bone-model", "what": "CT head resampled to 512x512x300", "backend": backend,
                "seconds": statistics.median(totals), "first": first, "runs": totals,
                "triangles": middle.summary["triangles"], "stages": stages}


def machine(backend: str) -> str:
    if backend == "cupy":
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(0)
        return f"{props['name'].decode()} (CuPy {cupy.__version__}), {os.cpu_count()} CPU cores"
    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), NumPy"


def measure(backends: list[str], runs: int, workloads: list[str]) -> list[dict]:
    from gpu_workers.backend import array_module

    results = []
    for backend in backends:
        xp, name = array_module(backend)
        for workload in workloads:
            print(f"{workload} with {name} ...", file=sys.stderr, flush=True)
            result = (mammo if workload == "mammo-cad" else bone)(xp, name, runs)
            result["machine"] = machine(name)
            results.append(result)
            print(json.dumps(result), flush=True)
    return results


def table(results: list[dict]) -> str:
    lines = ["| workload | backend | machine | seconds (median) | of which analysis | first run | "
             "target on the GPU |", "|---|---|---|---|---|---|---|"]
    for r in results:
        target = TARGETS[r["workload"]]
        verdict = (f"< {target} s: {'met' if r['seconds'] < target else 'missed'}" if r["backend"] == "cupy"
                   else f"< {target} s")
        if r["backend"] == "cupy" and r.get("analysis") is not None and r["seconds"] >= target:
            verdict += f" (analysis: {'met' if r['analysis'] < target else 'missed'})"
        analysis = f"{r['analysis']:.2f}" if r.get("analysis") is not None else ""
        lines.append(f"| {r['workload']} ({r['what']}) | {r['backend']} | {r['machine']} | {r['seconds']:.2f} | "
                     f"{analysis} | {r['first']:.2f} | {verdict} |")
    lines.append("")
    for workload in dict.fromkeys(r["workload"] for r in results):
        these = [r for r in results if r["workload"] == workload]
        names = list(dict.fromkeys(k for r in these for k in r["stages"]))
        lines += [f"{workload}: seconds per stage", "",
                  "| stage | " + " | ".join(r["backend"] for r in these) + " |", "|---|" + "---|" * len(these)]
        for name in names:
            lines.append(f"| {name} | " + " | ".join(f"{r['stages'][name]:.3f}" if name in r["stages"] else ""
                                                      for r in these) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in results))
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.5 * len(workloads), 4.6), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        these = [r for r in results if r["workload"] == workload]
        names = list(dict.fromkeys(k for r in these for k in r["stages"] if k != "to host"))
        left = [0.0] * len(these)
        colours = plt.get_cmap("tab10")
        for n, name in enumerate(names):
            widths = [r["stages"].get(name, 0.0) for r in these]
            ax.barh(range(len(these)), widths, left=left, color=colours(n % 10), label=name)
            left = [a + b for a, b in zip(left, widths)]
        ax.set_yticks(range(len(these)), [f"{r['backend']}\n{r['seconds']:.2f} s" for r in these])
        ax.axvline(TARGETS[workload], color="black", linestyle="--", linewidth=1)
        ax.set_title(f"{workload}: {these[0]['what']} (dashed: GPU target)", fontsize=9)
        ax.set_xlabel("seconds")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=("numpy", "cupy"))
    parser.add_argument("--workload", action="append", choices=("mammo-cad", "bone-model"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--table", nargs="+", type=Path, help="print the table of saved results")
    parser.add_argument("--plot", type=Path, help="with --table: draw the stages into this PNG")
    args = parser.parse_args(argv)
    if args.table:
        results = [r for path in args.table for r in json.loads(path.read_text())]
        print(table(results))
        if args.plot:
            plot(results, args.plot)
        return 0
    results = measure(args.backend or ["numpy"], args.runs, args.workload or ["mammo-cad", "bone-model"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
