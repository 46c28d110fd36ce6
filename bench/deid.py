"""De-identified copies per second for 500 small CT and 20 mammograms, next to the library used alone on the same files.

Each copy is what an export does with one instance: read the Part 10 file (pydicom's dcmread),
de-identify it, write the copy to a file (save_as, enforce_file_format=True). The reading and the
writing are the same for both engines, so only the de-identification differs:

- m3dicom: `router.deid.engine.Deidentifier` with the profile ["retain_longitudinal_modified_dates"]
  and a secret of 32 random bytes, made once (as the router does); `apply` returns a new data set.
- dicom-anonymizer (2.1.0): `anonymize_dataset(ds)` with its defaults (the 2023 tables, private
  tags removed), which changes the data set in place. Its module-level UID dictionary is
  cleared before every pass, so each pass starts as a fresh process would.

Data: `--small` CT instances made from pydicom's CT_small.dcm (10 patients, one study and series
each, distinct SOP Instance UIDs) and `--large` Digital Mammography X-Ray - For Presentation
instances of 3328x2560 16-bit pixels (17 MB) from gpu_workers/mammo/phantom.py (one phantom
image, generated once, written with a distinct patient, study and UIDs per file: the pixels are
not what is de-identified). Each workload is run `--runs` times per engine, the two engines in
alternating order; before each pass the previous copies are removed and the page cache written
out (untimed). The table gives the median. The target (issue: "within 20%" of the library) is a
ratio of copies/s, ours over the library's, of at least 0.8. The time spent in the
de-identification call alone (per copy) is given too: reading and writing, the same for both,
dominate the mammograms and vary with the disk.

Memory: one more, untimed, pass of each workload and engine under tracemalloc gives the peak of
traced memory for the first instance alone and for the whole pass: when the two are about the
same (about one file's size, not the workload's), memory is bounded by one instance.

    .venv/bin/python bench/deid.py [--runs 3] [--small 500] [--large 20] [--out DIR] [--json FILE]
    .venv/bin/python bench/deid.py --quick

Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

TARGET = 0.8                    # ours / library copies per second ("within 20%")
MG_SIZE = (3328, 2560)          # rows, columns: 17 MB of 16-bit pixels
PATIENTS = 10


# -- data ------------------------------------------------------------------------------

def small_set(directory: Path, count: int) -> list[Path]:
    """CT_small.dcm `count` times: PATIENTS patients, one study and series each, distinct instances."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    studies = [(generate_uid(), generate_uid()) for _ in range(PATIENTS)]
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        p = i % PATIENTS
        ds.PatientID, ds.PatientName = f"BENCH{p:02d}", f"Bench^Patient{p:02d}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = studies[p]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i // PATIENTS + 1
        path = directory / f"ct-{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def large_set(directory: Path, count: int) -> list[Path]:
    """`count` mammograms of MG_SIZE from one phantom image, one patient and study each."""
    from gpu_workers.mammo.phantom import Options, generate, to_dataset

    directory.mkdir(parents=True, exist_ok=True)
    if count == 0:
        return []
    opts = Options(rows=MG_SIZE[0], columns=MG_SIZE[1], spacing=0.07, bits=14, clusters=1, isolated=2)
    pixels, truth = generate(1, opts)
    paths = []
    for i in range(count):
        ds = to_dataset(pixels, truth, opts, patient_id=f"MAMMO{i:03d}", patient_name=f"Bench^Mammo{i:03d}")
        ds.AccessionNumber, ds.PatientBirthDate = f"ACC{i:05d}", "19600101"
        path = directory / f"mg-{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# -- engines -----------------------------------------------------------------------------

class Ours:
    name = "m3dicom"

    def __init__(self):
        from router.deid.engine import Deidentifier
        from router.settings import DeidProfile

        profile = DeidProfile(options=["retain_longitudinal_modified_dates"])
        profile.validate()
        self.deid = Deidentifier(profile, os.urandom(32))
        self.dropped = 0

    def reset(self) -> None:
        self.dropped = 0

    def copy(self, ds):
        made = self.deid.apply(ds)
        if made.dataset is None:
            self.dropped += 1
        return made.dataset


class Library:
    name = "dicom-anonymizer"

    def __init__(self):
        from dicomanonymizer import simpledicomanonymizer

        self.module = simpledicomanonymizer
        self.dropped = 0

    def reset(self) -> None:
        self.module.dictionary.clear()          # its UID map, kept at module level between calls

    def copy(self, ds):
        self.module.anonymize_dataset(ds)
        return ds


def one_pass(engine, paths: list[Path], out: Path) -> tuple[float, float]:
    """(seconds to read, de-identify and write every file of `paths` into `out`, of which de-identifying).

    The previous pass's copies are removed and the page cache's dirty pages written out first (untimed),
    so that a pass does not pay for writing back the one before it."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    engine.reset()
    os.sync()
    deid = 0.0
    started = time.perf_counter()
    for path in paths:
        ds = pydicom.dcmread(path)
        before = time.perf_counter()
        copy = engine.copy(ds)
        deid += time.perf_counter() - before
        if copy is not None:
            copy.save_as(out / path.name, enforce_file_format=True)
    return time.perf_counter() - started, deid


def traced_peaks(engine, paths: list[Path], out: Path) -> tuple[float, float]:
    """(MB) peak of traced memory for the first instance alone, and for the whole pass."""
    tracemalloc.start()
    try:
        one_pass(engine, paths[:1], out)
        first = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        one_pass(engine, paths, out)
        whole = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return first / 1e6, whole / 1e6


# -- main --------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--small", type=int, default=500, help="small CT instances")
    ap.add_argument("--large", type=int, default=20, help="mammograms (17 MB each)")
    ap.add_argument("--out", type=Path, help="where the data and the copies go (default: a temporary folder, "
                                             "removed at the end)")
    ap.add_argument("--quick", action="store_true", help="a tiny run: 20 small, 2 large, 1 run")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.small, args.large, args.runs = min(args.small, 20), min(args.large, 2), 1

    work = args.out or Path(tempfile.mkdtemp(prefix="m3bench-deid-"))
    try:
        print("generating data ...", file=sys.stderr, flush=True)
        data = {"small CT": small_set(work / "data" / "small", args.small),
                "mammograms": large_set(work / "data" / "large", args.large)}
        data = {k: v for k, v in data.items() if v}
        engines = [Ours(), Library()]
        for engine in engines:                                  # imports, tables, first-call costs
            for workload, paths in data.items():
                one_pass(engine, paths[:1], work / "copies" / engine.name / "warm-up")

        seconds: dict[str, dict[str, list[float]]] = {w: {e.name: [] for e in engines} for w in data}
        deid_seconds: dict[str, dict[str, list[float]]] = {w: {e.name: [] for e in engines} for w in data}
        for run in range(args.runs):
            order = engines if run % 2 == 0 else engines[::-1]
            for workload, paths in data.items():
                for engine in order:
                    took, deid = one_pass(engine, paths, work / "copies" / engine.name / workload.replace(" ", "-"))
                    seconds[workload][engine.name].append(took)
                    deid_seconds[workload][engine.name].append(deid)
                    print(f"{engine.name:17s} {workload:10s} run {run + 1}: {len(paths) / took:8.1f} copies/s "
                          f"(de-identification {1000 * deid / len(paths):.2f} ms/copy)", file=sys.stderr, flush=True)
        peaks = {w: {e.name: traced_peaks(e, paths, work / "copies" / e.name / "traced") for e in engines}
                 for w, paths in data.items()}
        dropped = {e.name: e.dropped for e in engines}
        sizes = {w: (sum(p.stat().st_size for p in paths) / 1e6, max(p.stat().st_size for p in paths) / 1e6)
                 for w, paths in data.items()}
        print(table(data, seconds, deid_seconds, peaks, sizes, args.runs))
        if any(dropped.values()):
            print(f"\nNot copied (dropped as possibly burned-in, last pass): {dropped}")
        if args.json:
            args.json.write_text(json.dumps({
                "machine": {"python": platform.python_version(), "pydicom": pydicom.__version__,
                            "cpus": os.cpu_count(), "platform": platform.platform()},
                "runs": args.runs, "target": TARGET,
                "workloads": {w: {"instances": len(data[w]), "mb": sizes[w][0], "largest_mb": sizes[w][1],
                                  "seconds": seconds[w], "deid_seconds": deid_seconds[w],
                                  "traced_peak_mb": {e: {"first": p[0], "pass": p[1]} for e, p in peaks[w].items()}}
                              for w in data}}, indent=1))
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def table(data, seconds, deid_seconds, peaks, sizes, runs: int) -> str:
    ours, lib = Ours.name, Library.name
    lines = [f"| workload | instances | MB | {ours} s | {ours} copies/s | {lib} s | {lib} copies/s | "
             f"ratio ours/library | target | de-identification alone, ms/copy ({ours}; {lib}) | "
             f"traced peak MB, 1 instance / whole pass ({ours}; {lib}) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for workload, paths in data.items():
        n = len(paths)
        s_ours, s_lib = statistics.median(seconds[workload][ours]), statistics.median(seconds[workload][lib])
        ratio = (n / s_ours) / (n / s_lib)
        verdict = "met" if ratio >= TARGET else "not met"
        po, pl = peaks[workload][ours], peaks[workload][lib]
        d_ours, d_lib = (1000 * statistics.median(deid_seconds[workload][e]) / n for e in (ours, lib))
        lines.append(f"| {workload} | {n} | {sizes[workload][0]:.3g} | {s_ours:.2f} | {n / s_ours:.1f} | "
                     f"{s_lib:.2f} | {n / s_lib:.1f} | {ratio:.2f} | >= {TARGET} (within 20%): {verdict} | "
                     f"{d_ours:.2f}; {d_lib:.2f} | "
                     f"{po[0]:.1f} / {po[1]:.1f}; {pl[0]:.1f} / {pl[1]:.1f} |")
    lines.append("")
    lines.append(f"Median of {runs} run(s); each copy is dcmread + de-identification + save_as "
                 "(enforce_file_format=True). Largest file: "
                 + ", ".join(f"{w} {sizes[w][1]:.3g} MB" for w in data) + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
