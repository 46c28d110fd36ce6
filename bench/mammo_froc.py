"""Mammography CAD evaluation: FROC on held-out phantoms, full-field time and memory.

Phantoms from seeds 20000 on (training used 0-9999, validation 10000-19999): pixel
spacing 0.05-0.1 mm, fatty to dense, CC and MLO, one in five normal. Cluster-level and
calcification-level sensitivity at 0.25, 0.5, 1 and 2 false positives per image, with
bootstrap 95% intervals (images resampled); the FROC curves saved as a PNG.

Normal images, most of a screening: the held-out ones without a cluster and more normal
phantoms from seeds 21000 on (in turn: no calcification, isolated calcifications only, very
dense). False positive clusters per normal image, sensitivity against them (the dashed
curve), and the plug-in as shipped (operating point 0.5): how many normal images it reports
as "no cluster found". Then the plug-in on full-field 4096x3328 images (0.07 mm), one with
clusters and one normal and very dense, in a process of its own: wall time of the analysis
and peak memory (NumPy here; CuPy when a GPU is there). Not a test.

    .venv/bin/python bench/mammo_froc.py [--images 100] [--normals 60] [--png docs/mammo_froc.png]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpu_workers.mammo import evaluate, phantom  # noqa: E402
from gpu_workers.mammo.model import Model  # noqa: E402

FP_POINTS = (0.25, 0.5, 1.0, 2.0)
NORMAL_FP_POINTS = (0.05, 0.1, 0.25, 0.5)
FULL_FIELD = phantom.Options(rows=4096, columns=3328, spacing=0.07, clusters=2, isolated=3)
FULL_FIELD_NORMAL = phantom.Options(rows=4096, columns=3328, spacing=0.07, clusters=0, isolated=0, density=0.8)


def scored_results(seeds, analyse=evaluate.analyse, what: str = "phantoms") -> list[evaluate.ImageResult]:
    model = Model.load()
    results, seeds = [], list(seeds)
    with get_context("spawn").Pool(2) as pool:
        for result in pool.imap(analyse, seeds):
            result.scores = model.probabilities(result.features)
            results.append(result)
            print(f"\r  {what} {len(results)}/{len(seeds)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return results


def full_field(work: Path, opts: phantom.Options = FULL_FIELD, seed: int = 20999) -> dict:
    """Time and peak memory of the plug-in on a full-field image, measured in a child process."""
    path, _ = phantom.write(work, seed, opts)
    code = f"""
import json, resource, sys, time
sys.path.insert(0, {str(ROOT)!r})
import numpy as np, pydicom
from pathlib import Path
from gpu_workers.local import series_of
from gpu_workers.mammo.plugin import MammoCad
from gpu_workers.plugin import Algorithm, Context, check_params
from gpu_workers.backend import array_module
plugin = MammoCad()
params = check_params(plugin, {{}})
xp, backend = array_module()
series = series_of([Path({str(path)!r})])
plugin.run(series, params, Context("warm", Algorithm("mammo-cad", "1", params), xp, backend, Path(".")))  # load the model
times = []
for run in range(3):
    started = time.perf_counter()
    result = plugin.run(series, params, Context(f"bench{{run}}", Algorithm("mammo-cad", "1", params), xp, backend, Path(".")))
    times.append(time.perf_counter() - started)
print(json.dumps({{"seconds": sorted(times)[1], "backend": backend, "clusters": result.summary["clusters"],
                  "outcome": result.summary["outcome"],
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(cluster_curve, calc_curve, cluster_ci, calc_ci, path: Path, images: int, normal_curve=None,
         normals: int = 0, shipped=None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    if normal_curve is not None:
        axes[0].plot(*normal_curve, color="#2e8b57", lw=1.6, ls="--", zorder=3,
                     label=f"false positives per normal image ({normals})")
    if shipped is not None:
        axes[0].plot(*shipped, marker="*", ms=13, color="#2e8b57", ls="none", zorder=4,
                     label="as shipped (operating point 0.5), per normal image")
    for ax, (fps, sens), ci, title in ((axes[0], cluster_curve, cluster_ci, "Clusters"),
                                       (axes[1], calc_curve, calc_ci, "Calcifications")):
        ax.plot(fps, sens, color="#1f5f99", lw=2, label="false positives per image")
        points = [float(sens[fps <= p].max()) if (fps <= p).any() else 0 for p in FP_POINTS]
        ax.errorbar(FP_POINTS, points, yerr=[np.array(points) - ci[0], ci[1] - np.array(points)], fmt="o",
                    color="#c0392b", capsize=4, label="95% bootstrap interval")
        ax.set_xscale("log")
        ax.set_xlim(0.01, 8)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("false positives per image" + (" (dashed: per normal image)"
                                                     if normal_curve is not None and title == "Clusters" else ""))
        ax.set_ylabel("sensitivity")
        ax.set_title(f"{title} ({images} held-out phantoms" + (f", {normals} normal images)" if normal_curve
                                                               is not None and title == "Clusters" else ")"))
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="lower right", fontsize=7)
    fig.suptitle("m3dicom mammo-cad: FROC")
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--normals", type=int, default=60, help="normal phantoms besides the held-out ones")
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "mammo_froc.png")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args(argv)
    model = Model.load()
    results = scored_results(range(20000, 20000 + args.images))
    extra = scored_results(range(21000, 21000 + args.normals), evaluate.analyse_normal, "normal phantoms")
    calc_threshold, shipped_threshold = model.operating_point(0.5)
    clusters = evaluate.cluster_marks(results, calc_threshold)
    calcs = evaluate.calcification_marks(results)
    rows = []
    for name, marks in (("clusters", clusters), ("calcifications", calcs)):
        sens = evaluate.sensitivity_at(marks, FP_POINTS)
        ci = evaluate.bootstrap(marks, FP_POINTS)
        rows.append((name, sens, ci, sum(marks.truths)))
    # the held-out images with clusters (sensitivity) against every normal image (false positives)
    every = evaluate.cluster_marks(results + extra, calc_threshold)
    normal_thresholds, normal_fps, normal_sens = evaluate.froc_on_normals(every)
    normals = sum(1 for t in every.truths if t == 0)
    hit_scores = np.concatenate([s[h >= 0] for s, h in zip(every.scores, every.hits)])
    shipped = (float(evaluate.marks_at(every, shipped_threshold).mean()),
               float(np.sum(hit_scores >= shipped_threshold) / sum(every.truths)))
    plot(evaluate.froc(clusters)[1:], evaluate.froc(calcs)[1:], rows[0][2], rows[1][2], args.png, args.images,
         (normal_fps, normal_sens), normals, shipped)
    normal = sum(1 for r in results if not r.truth.clusters)
    print(f"\nFROC on {args.images} held-out phantoms (seeds 20000-{20000 + args.images - 1}, {normal} without "
          f"clusters), model {model.meta['classifier']}, calcification threshold {calc_threshold}\n")
    print("| level | true findings | " + " | ".join(f"sensitivity at {p:g} FP/image" for p in FP_POINTS) + " |")
    print("|---|---|" + "---|" * len(FP_POINTS))
    for name, sens, ci, truths in rows:
        cells = [f"{s:.2f} ({lo:.2f}-{hi:.2f})" for s, lo, hi in zip(sens, ci[0], ci[1])]
        print(f"| {name} | {truths} | " + " | ".join(cells) + " |")

    print(f"\nNormal images: {normal} held-out without clusters and {args.normals} normal phantoms (seeds "
          f"21000-{21000 + args.normals - 1}); sensitivity on the {sum(every.truths)} clusters of the held-out "
          f"images against false positive clusters per normal image\n")
    print("| " + " | ".join(f"sensitivity at {p:g} FP/normal image" for p in NORMAL_FP_POINTS) + " |")
    print("|" + "---|" * len(NORMAL_FP_POINTS))
    cells = []
    for target in NORMAL_FP_POINTS:
        allowed = normal_sens[normal_fps <= target]
        cells.append(f"{float(allowed.max()) if allowed.size else 0.0:.2f}")
    print("| " + " | ".join(cells) + " |")
    print(f"\nThe plug-in as shipped (operating point 0.5: calcification threshold {calc_threshold}, cluster "
          f"threshold {shipped_threshold:.4f}); sensitivity {shipped[1]:.2f}\n")
    print("| normal images | images | false positive clusters | FPs per normal image | reported \"no cluster "
          "found\" |")
    print("|---|---|---|---|---|")
    groups = [("held-out without clusters", [r for r in results if not r.truth.clusters])]
    groups += [(kind, [r for r in extra if r.seed % 3 == k]) for k, kind in enumerate(evaluate.NORMAL_KINDS)]
    groups.append(("all", [r for r in results if not r.truth.clusters] + extra))
    for name, members in groups:
        if not members:
            continue
        per_image = evaluate.marks_at(evaluate.cluster_marks(members, calc_threshold), shipped_threshold)
        print(f"| {name} | {len(members)} | {int(per_image.sum())} | {per_image.mean():.3f} | "
              f"{int(np.sum(per_image == 0))} ({np.mean(per_image == 0):.0%}) |")
    print(f"\nFROC curves: {args.png}")
    analysis = np.median([r.seconds for r in results + extra])
    print(f"candidate detection per phantom (median): {analysis:.2f} s")
    if not args.skip_timing:
        for label, opts, seed in (("with 2 clusters", FULL_FIELD, 20999), ("normal, very dense", FULL_FIELD_NORMAL,
                                                                           21999)):
            with tempfile.TemporaryDirectory() as tmp:
                timing = full_field(Path(tmp), opts, seed)
            print(f"\nfull-field 4096x3328 image {label} ({timing['backend']}): {timing['seconds']:.2f} s for the "
                  f"analysis (detection, classification, clusters, SC and SR built; median of 3), peak memory "
                  f"{timing['peak_mb']:.0f} MB, {timing['clusters']} clusters ({timing['outcome']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
