"""Synthetic full-field digital mammograms with known micro-calcifications (no real ones can be had here).

A compressed breast is drawn as what a detector records: X-ray attenuation through
fat and fibroglandular tissue (textured with a 1/f^beta power spectrum, beta 2.5-3.2 as
measured on real mammograms, density from fatty to dense), the pectoral muscle on MLO
views, and calcifications (0.1-1 mm: round, ovoid, irregular, linear) in clusters of 3 or
more within 1 cm^2 and alone. The fluence is blurred by the detector, counted with
Poisson noise, log-transformed and mapped to 12-14 bits "For Presentation" (MONOCHROME2,
or MONOCHROME1 inverted). Written as Digital Mammography X-Ray Image - For Presentation
with its ground truth. Everything follows from the seed.

From the command line (`python -m gpu_workers.mammo.phantom --help`): screening
examinations of the four standard views (RCC, LCC, RMLO, LMLO), one study per patient, one
series per view, ready to send to the node.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MU_FAT, MU_GLAND, MU_MUSCLE, MU_CALCIUM = 0.046, 0.080, 0.072, 1.40   # per mm, about 20 keV (calcium: hydroxyapatite)
SHAPES = ("round", "ovoid", "irregular", "linear")


@dataclass(frozen=True)
class Options:
    rows: int = 1600
    columns: int = 1300
    spacing: float = 0.085            # mm per pixel (0.05-0.1)
    bits: int = 12                    # 12-14
    density: float | None = None      # glandular fraction 0.05 (fatty) - 0.8 (dense); None: drawn
    view: str | None = None           # CC | MLO; None: drawn
    laterality: str | None = None     # L | R; None: drawn
    clusters: int | None = None       # None: 0-3 drawn (a quarter of images are normal)
    isolated: int | None = None       # None: 0-6 drawn
    monochrome1: bool = False
    photons: float = 5000.0           # mean quanta per pixel behind 50 mm of fat


@dataclass
class Calcification:
    x: float                          # column, pixels
    y: float                          # row, pixels
    diameter_mm: float
    shape: str
    cluster_id: int | None


@dataclass
class Cluster:
    id: int
    x: float
    y: float
    radius_mm: float                  # the extent: every calcification of it lies within
    n: int


@dataclass
class Truth:
    seed: int
    spacing: float
    view: str
    laterality: str
    density: float
    beta: float
    calcifications: list[Calcification] = field(default_factory=list)
    clusters: list[Cluster] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Truth":
        data = json.loads(text)
        data["calcifications"] = [Calcification(**c) for c in data["calcifications"]]
        data["clusters"] = [Cluster(**c) for c in data["clusters"]]
        return cls(**data)


def power_law_texture(rng: np.random.Generator, shape: tuple[int, int], beta: float,
                      cutoff: float = 0.5) -> np.ndarray:
    """Gaussian noise with a 1/f^beta power spectrum, zero mean, unit variance.

    `cutoff` (cycles per pixel) rolls the spectrum off above it: beta is measured on real
    mammograms at about 0.1-1 cycles/mm; finer than that, quantum noise is what one sees.
    """
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amplitude = f ** (-beta / 2) * np.exp(-(f / cutoff) ** 2)
    amplitude[0, 0] = 0.0
    spectrum = (rng.standard_normal(amplitude.shape) + 1j * rng.standard_normal(amplitude.shape)) * amplitude
    field_ = np.fft.irfft2(spectrum, s=shape).astype(np.float32)
    field_ -= field_.mean()
    return field_ / (field_.std() + 1e-12)


def _breast_geometry(rng, rows: int, cols: int, view: str, chest_left: bool):
    """Distance-to-edge map (0 at the skin, 1 deep inside) and the pectoral muscle mask (MLO)."""
    y = np.arange(rows, dtype=np.float32)[:, None]
    x = np.arange(cols, dtype=np.float32)[None, :]
    depth = x if chest_left else (cols - 1 - x)
    centre = rows * rng.uniform(0.45, 0.55)
    half_height = rows * rng.uniform(0.40, 0.47)
    reach = cols * rng.uniform(0.72, 0.92)
    angle = np.arctan2((y - centre) / half_height, depth / reach)
    wobble = 1 + 0.04 * np.sin(3 * angle + rng.uniform(0, 6.28)) + 0.03 * np.sin(5 * angle + rng.uniform(0, 6.28))
    radius = np.sqrt(((y - centre) / half_height) ** 2 + (depth / reach) ** 2) / wobble
    inside = np.clip(1 - radius, 0, 1)
    muscle = np.zeros((rows, cols), bool)
    if view == "MLO":
        top = rows * rng.uniform(0.45, 0.7)           # where the muscle edge meets the chest wall
        across = cols * rng.uniform(0.18, 0.32)       # and the top edge
        muscle = (depth / across + y / top) < 1
    return inside, muscle


def _calcification_patch(rng, diameter_px: float, shape: str) -> np.ndarray:
    """Path length through one calcification (in pixel units), on a small grid, supersampled 3x."""
    half = int(np.ceil(diameter_px * (1.8 if shape == "linear" else 0.9))) + 2
    s = 3
    grid = (np.arange(-half * s, half * s + s) + 0.5) / s - 0.5
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    r = diameter_px / 2

    def ellipsoid(cu, cv, a, b):
        q = 1 - ((u - cu) / a) ** 2 - ((v - cv) / b) ** 2
        return 2 * min(a, b) * np.sqrt(np.clip(q, 0, None))

    if shape == "round":
        length = ellipsoid(0, 0, r, r)
    elif shape == "ovoid":
        length = ellipsoid(0, 0, r, r * rng.uniform(0.5, 0.8))
    elif shape == "irregular":
        length = np.zeros_like(u)
        for _ in range(rng.integers(2, 5)):
            a = r * rng.uniform(0.4, 0.7)
            length = np.maximum(length, ellipsoid(rng.uniform(-r / 2, r / 2), rng.uniform(-r / 2, r / 2), a,
                                                  a * rng.uniform(0.6, 1)))
    else:  # linear: a thin rod, 2-4 times as long as it is wide
        width = r * rng.uniform(0.5, 0.8)
        length_u = r * rng.uniform(1.2, 1.8)
        length = ellipsoid(0, 0, length_u, width)
    return length.reshape(2 * half + 1, s, 2 * half + 1, s).mean(axis=(1, 3))


def _draw_calcifications(rng, opts: Options, inside: np.ndarray, muscle: np.ndarray, clusters: int,
                         isolated: int) -> tuple[np.ndarray, list[Calcification], list[Cluster]]:
    rows, cols = inside.shape
    path = np.zeros((rows, cols), np.float32)     # calcium path length, mm
    calcs, groups = [], []
    allowed = (inside > 0.12) & ~muscle
    spots = np.argwhere(allowed[::8, ::8]) * 8
    if len(spots) == 0:
        return path, calcs, groups

    def place(y: float, x: float, diameter_mm: float, shape: str, cluster_id: int | None) -> bool:
        iy, ix = int(round(y)), int(round(x))
        if not (0 <= iy < rows and 0 <= ix < cols) or not allowed[iy, ix]:
            return False
        patch = _calcification_patch(rng, diameter_mm / opts.spacing, shape) * opts.spacing
        h = patch.shape[0] // 2
        y0, x0 = iy - h, ix - h
        if y0 < 0 or x0 < 0 or y0 + patch.shape[0] > rows or x0 + patch.shape[1] > cols:
            return False
        region = path[y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]]
        np.maximum(region, patch, out=region)
        calcs.append(Calcification(float(ix), float(iy), round(float(diameter_mm), 3), shape, cluster_id))
        return True

    for cid in range(clusters):
        cy, cx = spots[rng.integers(len(spots))] + rng.uniform(0, 8, 2)
        spread_mm = rng.uniform(1.5, 4.5)                 # within a circle of 1 cm^2 (radius 5.6 mm)
        n = int(rng.integers(3, 13))
        members = []
        for _ in range(n * 4):
            if len(members) == n:
                break
            angle, distance = rng.uniform(0, 2 * np.pi), spread_mm * np.sqrt(rng.uniform(0, 1))
            y, x = cy + distance * np.sin(angle) / opts.spacing, cx + distance * np.cos(angle) / opts.spacing
            if any(np.hypot(y - c.y, x - c.x) * opts.spacing < 0.6 for c in members):
                continue
            diameter = float(np.clip(rng.lognormal(np.log(0.28), 0.45), 0.12, 1.0))
            if place(y, x, diameter, str(rng.choice(SHAPES, p=[0.35, 0.25, 0.25, 0.15])), cid):
                members.append(calcs[-1])
        if len(members) < 3:
            calcs[:] = [c for c in calcs if c.cluster_id != cid]
            continue
        mx, my = np.mean([c.x for c in members]), np.mean([c.y for c in members])
        extent = max(np.hypot(c.x - mx, c.y - my) * opts.spacing + c.diameter_mm / 2 for c in members)
        groups.append(Cluster(cid, float(mx), float(my), round(float(max(extent, 1.0)), 3), len(members)))
    for _ in range(isolated):
        y, x = spots[rng.integers(len(spots))] + rng.uniform(0, 8, 2)
        if all(np.hypot(y - c.y, x - c.x) * opts.spacing > 8 for c in calcs):
            place(y, x, float(np.clip(rng.lognormal(np.log(0.45), 0.4), 0.2, 1.0)), "round", None)
    if calcs:
        groups = [g for g in groups if any(c.cluster_id == g.id for c in calcs)]
    return path, calcs, groups


def _smooth(image: np.ndarray, sigma: float, factor: int = 8) -> np.ndarray:
    """A wide Gaussian blur, computed on a downsampled copy (the result is smooth anyway)."""
    rows, cols = image.shape
    small = image[:rows - rows % factor, :cols - cols % factor].reshape(
        rows // factor, factor, cols // factor, factor).mean(axis=(1, 3))
    small = ndimage.gaussian_filter(small, sigma / factor, mode="nearest")
    return ndimage.zoom(small, (rows / small.shape[0], cols / small.shape[1]), order=1, mode="nearest")[:rows, :cols]


def generate(seed: int, opts: Options = Options()) -> tuple[np.ndarray, Truth]:
    """(pixel array, uint16 For Presentation values; ground truth) for this seed."""
    rng = np.random.default_rng(seed)
    view = opts.view or str(rng.choice(["CC", "MLO"]))
    laterality = opts.laterality or str(rng.choice(["L", "R"]))
    density = opts.density if opts.density is not None else float(rng.choice([0.08, 0.2, 0.4, 0.65]) *
                                                                   rng.uniform(0.85, 1.15))
    beta = float(rng.uniform(2.5, 3.2))
    clusters = opts.clusters if opts.clusters is not None else int(rng.choice([0, 1, 1, 2, 3]))
    isolated = opts.isolated if opts.isolated is not None else int(rng.integers(0, 7))
    rows, cols = opts.rows, opts.columns
    inside, muscle = _breast_geometry(rng, rows, cols, view, chest_left=laterality == "L")
    breast = inside > 0
    thickness = rng.uniform(40, 65) * np.sqrt(np.clip(inside / 0.15, 0, 1))      # mm, rounded at the edge
    texture = power_law_texture(rng, (rows, cols), beta, cutoff=0.8 * opts.spacing)   # 0.8 cycles/mm
    gland_zone = np.exp(-((1 - inside) / 0.55) ** 2)                            # denser behind the nipple
    base = np.clip(density * (0.6 + 0.8 * gland_zone), 0.02, 0.95)
    gland = 1 / (1 + np.exp(-(np.log(base / (1 - base)) + 1.1 * texture)))    # textured, smoothly within 0-1
    mu = MU_FAT * (1 - gland) + MU_GLAND * gland
    mu = np.where(muscle, MU_MUSCLE + 0.004 * texture, mu)
    path, calcs, groups = _draw_calcifications(rng, opts, inside, muscle, clusters, isolated)
    attenuation = mu * thickness + MU_CALCIUM * path
    fluence = np.exp(-(attenuation - MU_FAT * 50)).astype(np.float32)           # 1.0 behind 50 mm of fat
    fluence = ndimage.gaussian_filter(fluence, 0.55)                            # detector blur
    counts = rng.poisson(opts.photons * fluence).astype(np.float32)
    line_integral = -np.log(np.maximum(counts, 1) / (opts.photons * np.exp(MU_FAT * 50)))
    # "For Presentation" processing, as a detector's would: thickness equalisation (the rounded edge
    # brought up), then the breast's own range stretched over most of the output range
    background = _smooth(np.where(breast, line_integral, 0), 12 / opts.spacing)
    weight = _smooth(breast.astype(np.float32), 12 / opts.spacing)
    processed = line_integral - 0.7 * (background / np.maximum(weight, 1e-3))
    tissue = breast & ~muscle & (inside > 0.05)
    low, high = np.percentile(processed[tissue], [0.5, 99.8]) if tissue.any() else (0.0, 1.0)
    top = 2 ** opts.bits - 1
    values = np.clip(0.08 * top + (processed - low) / max(high - low, 1e-6) * 0.8 * top, 1, top)
    values[~breast] = 0
    values = np.round(values).astype(np.uint16)
    if opts.monochrome1:
        values = (2 ** opts.bits - 1 - values).astype(np.uint16)
    truth = Truth(seed, opts.spacing, view, laterality, round(density, 3), round(beta, 3), calcs, groups)
    return values, truth


def to_dataset(pixels: np.ndarray, truth: Truth, opts: Options = Options(), *, patient_id: str | None = None,
               study_uid: str | None = None, patient_name: str | None = None, series_number: int = 1) -> Dataset:
    """A Digital Mammography X-Ray Image - For Presentation data set."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MG_FOR_PRESENTATION
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID = patient_name or f"Phantom^{truth.seed}", patient_id or f"PH{truth.seed:06d}"
    ds.PatientBirthDate, ds.PatientSex = "", "F"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "", "1", ""
    ds.StudyDescription = "Synthetic mammography phantom"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MG", series_number, 1
    ds.SeriesDescription = f"{truth.laterality} {truth.view}"
    ds.Manufacturer, ds.ManufacturerModelName = "m3dicom", "phantom"
    ds.BodyPartExamined = "BREAST"
    ds.ImageLaterality, ds.ViewPosition = truth.laterality, truth.view
    orientation = {("L", "CC"): ["A", "R"], ("L", "MLO"): ["A", "FR"], ("R", "CC"): ["P", "L"],
                   ("R", "MLO"): ["P", "FL"]}[(truth.laterality, truth.view)]
    ds.PatientOrientation = orientation
    view_code = Dataset()
    view_code.CodeValue, view_code.CodingSchemeDesignator = {"CC": ("399162004", "SCT"),
                                                            "MLO": ("399368009", "SCT")}[truth.view]
    view_code.CodeMeaning = {"CC": "cranio-caudal", "MLO": "medio-lateral oblique"}[truth.view]
    view_code.ViewModifierCodeSequence = []
    ds.ViewCodeSequence = [view_code]
    anatomy = Dataset()
    anatomy.CodeValue, anatomy.CodingSchemeDesignator, anatomy.CodeMeaning = "76752008", "SCT", "Breast"
    ds.AnatomicRegionSequence = [anatomy]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    ds.DetectorType = "DIRECT"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.DistanceSourceToDetector, ds.DistanceSourceToPatient = 660.0, 640.0
    ds.EstimatedRadiographicMagnificationFactor = round(660.0 / 640.0, 4)
    ds.OrganExposed = "BREAST"
    ds.AcquisitionContextSequence = []
    ds.BodyPartThickness = 50.0
    ds.CompressionForce = 100.0
    ds.KVP, ds.ExposureInuAs, ds.AnodeTargetMaterial, ds.FilterMaterial = 28.0, 80000, "TUNGSTEN", "RHODIUM"
    ds.ImagerPixelSpacing = [opts.spacing, opts.spacing]
    ds.PixelSpacing = [opts.spacing, opts.spacing]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "Phantom: spacing at the detector"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if opts.monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, opts.bits, opts.bits - 1, 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1 if opts.monochrome1 else 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationLUTShape = "INVERSE" if opts.monochrome1 else "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.QualityControlImage = "NO"
    ds.WindowCenter, ds.WindowWidth = 2 ** (opts.bits - 1), 2 ** opts.bits
    ds.VOILUTFunction = "LINEAR"
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def write(directory: Path, seed: int, opts: Options = Options(), **ids) -> tuple[Path, Truth]:
    """`directory/phantom-SEED.dcm` and its truth `phantom-SEED.json`."""
    directory.mkdir(parents=True, exist_ok=True)
    pixels, truth = generate(seed, opts)
    path = directory / f"phantom-{seed:06d}.dcm"
    to_dataset(pixels, truth, opts, **ids).save_as(path, enforce_file_format=True)
    (directory / f"phantom-{seed:06d}.json").write_text(truth.to_json())
    return path, truth


# -- command line ---------------------------------------------------------------------------

VIEWS = ("RCC", "LCC", "RMLO", "LMLO")      # a screening examination, in its hanging order
DENSITIES = {"fatty": 0.08, "scattered": 0.2, "heterogeneous": 0.4, "dense": 0.65, "extremely-dense": 0.8}
FULL_FIELD = {"rows": 4096, "columns": 3328, "spacing": 0.07}   # a 24x29 cm detector, 27 MB an image


def _density(text: str) -> float:
    value = DENSITIES.get(text.lower())
    if value is None:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give one of {', '.join(DENSITIES)} or a glandular "
                                             "fraction between 0.05 and 0.8") from None
    if not 0.05 <= value <= 0.8:
        raise argparse.ArgumentTypeError(f"{value}: the glandular fraction must lie between 0.05 (fatty) and 0.8 "
                                         "(extremely dense)")
    return value


def _views(given: list[str] | None) -> list[str]:
    if not given:
        return list(VIEWS)
    views = []
    for item in given:
        for view in filter(None, (v.strip().upper() for v in item.split(","))):
            if view == "ALL":
                views.extend(VIEWS)
            elif view in VIEWS:
                views.append(view)
            else:
                raise argparse.ArgumentTypeError(f"view {view!r}: give RCC, LCC, RMLO, LMLO or all")
    return [v for v in VIEWS if v in views]


def _count(text: str, low: int = 0) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value}: at least {low}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Write screening examinations of phantom mammograms to a folder."""
    parser = argparse.ArgumentParser(
        prog="python -m gpu_workers.mammo.phantom",
        description="Synthetic screening mammograms (Digital Mammography X-Ray Image - For Presentation), "
                    "one study per patient with the four standard views (one series each), to try the "
                    "mammo-cad plug-in and the viewer's hanging. Everything follows from the seed.",
        epilog="Example: python -m gpu_workers.mammo.phantom --out phantoms --n 2 --density dense; "
               "then: .venv/bin/m3dicom send phantoms/")
    parser.add_argument("--out", type=Path, required=True, help="folder to write into (made if missing)")
    parser.add_argument("--n", type=lambda t: _count(t, 1), default=1, metavar="N",
                        help="examinations (patients) to write, each a study of the views asked (default 1)")
    parser.add_argument("--seed", type=_count, default=0,
                        help="first seed (default 0): examination k, view v is seed + 4k + v (RCC 0, LCC 1, "
                             "RMLO 2, LMLO 3), so a view is the same whichever others are asked")
    parser.add_argument("--view", action="append", metavar="VIEW",
                        help="RCC, LCC, RMLO, LMLO or all (repeatable or comma separated; default all four)")
    parser.add_argument("--density", type=_density, metavar="DENSITY",
                        help="fatty, scattered, heterogeneous, dense, extremely-dense or a glandular fraction "
                             "0.05-0.8 (default: drawn per examination)")
    parser.add_argument("--no-calcifications", action="store_true",
                        help="normal images: no calcification at all (no cluster, no isolated one)")
    parser.add_argument("--clusters", type=_count, metavar="N", help="clusters per image (default: 0-3 drawn)")
    parser.add_argument("--isolated", type=_count, metavar="N",
                        help="isolated calcifications per image (default: 0-6 drawn)")
    parser.add_argument("--full-field", action="store_true",
                        help="4096x3328 pixels at 0.07 mm (27 MB each) instead of 1600x1300 at 0.085 mm")
    parser.add_argument("--truth", type=Path, metavar="DIR",
                        help="also write each image's ground truth (calcifications, clusters) as JSON into DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        views = _views(args.view)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.no_calcifications and (args.clusters or args.isolated):
        parser.error("--no-calcifications contradicts --clusters/--isolated")
    from pydicom.uid import generate_uid
    from tqdm import tqdm

    base = Options(**FULL_FIELD) if args.full_field else Options()
    if args.no_calcifications:
        base = replace(base, clusters=0, isolated=0)
    else:
        base = replace(base, clusters=args.clusters, isolated=args.isolated)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.truth:
        args.truth.mkdir(parents=True, exist_ok=True)
    total, clusters = args.n * len(views), 0
    with tqdm(total=total, unit="image", disable=args.quiet or total <= 4, file=sys.stderr) as bar:
        for exam in range(args.n):
            exam_seed = args.seed + 4 * exam
            rng = np.random.default_rng([exam_seed, 1])        # one breast density for the four views
            density = args.density if args.density is not None else float(
                rng.choice([0.08, 0.2, 0.4, 0.65]) * rng.uniform(0.85, 1.15))
            study_uid, patient_id = generate_uid(), f"PH{exam_seed:06d}"
            for view in views:
                seed = exam_seed + VIEWS.index(view)
                opts = replace(base, laterality=view[0], view=view[1:], density=density)
                pixels, truth = generate(seed, opts)
                ds = to_dataset(pixels, truth, opts, patient_id=patient_id, study_uid=study_uid,
                                patient_name=f"Phantom^{exam_seed}", series_number=VIEWS.index(view) + 1)
                name = f"{patient_id}_{view}"
                ds.save_as(args.out / f"{name}.dcm", enforce_file_format=True)
                if args.truth:
                    (args.truth / f"{name}.json").write_text(truth.to_json())
                clusters += len(truth.clusters)
                bar.update()
    counted = lambda n, one, many: f"{n} {one if n == 1 else many}"      # noqa: E731
    print(f"wrote {counted(total, 'mammogram', 'mammograms')} ({counted(args.n, 'study', 'studies')}: {', '.join(views)}; "
          f"{counted(clusters, 'true cluster', 'true clusters')}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
