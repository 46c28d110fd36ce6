"""Candidate micro-calcifications and their features, in millimetres, written once for NumPy and CuPy.

1. The image as attenuation (denser = higher): For Presentation as it is (MONOCHROME1
   inverted), For Processing after the usual log and inversion; spacing from Imager Pixel
   Spacing (or Pixel Spacing).
2. The breast (largest bright component, skin line eroded) and, on MLO views, the
   pectoral muscle (the bright region in the chest-wall corner) left out.
3. A band-pass at calcification scale (fine Gaussian minus a ~1 mm local mean), divided by
   the local noise: a z-score image. Regions above a low threshold whose peak passes a
   high one, and small enough to be calcifications, are the candidates.
4. Per candidate, on a small patch: geometry (area, diameter, compactness, eccentricity,
   elongation), contrast and statistics (peak and mean z, contrast against the ring around
   it, skewness, kurtosis), texture (GLCM contrast, homogeneity, energy, correlation), the
   local glandular density and the distance to the skin.
The heavy image work runs on `xp` (CuPy on a GPU); only small patches come back to NumPy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from gpu_workers.backend import to_numpy
from gpu_workers.plugin import PluginError

MAMMOGRAPHY_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.2": "FOR PRESENTATION", "1.2.840.10008.5.1.4.1.1.1.2.1": "FOR PROCESSING",
    "1.2.840.10008.5.1.4.1.1.1.1": None, "1.2.840.10008.5.1.4.1.1.1.1.1": None,   # DX, when it is a breast
}
FEATURES = ("area_mm2", "diameter_mm", "compactness", "eccentricity", "elongation", "peak_z", "mean_z",
            "ring_contrast", "skewness", "kurtosis", "glcm_contrast", "glcm_homogeneity", "glcm_energy",
            "glcm_correlation", "density", "skin_mm")
PATCH_MM = 2.4
MAX_AREA_MM2 = 1.6
MAX_CANDIDATES = 1000


def ndimage_of(xp):
    if xp.__name__ == "cupy":
        import cupyx.scipy.ndimage as ndi
        return ndi
    from scipy import ndimage as ndi
    return ndi


@dataclass
class Mammogram:
    values: object               # xp float32, attenuation-like: denser is higher, breast 0..1
    spacing: float               # mm per pixel
    laterality: str
    view: str
    monochrome1: bool
    for_processing: bool


def spacing_of(ds: Dataset) -> float:
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        value = ds.get(keyword)
        if value and len(value) == 2 and float(value[0]) > 0:
            if abs(float(value[0]) - float(value[1])) > 1e-3:
                raise PluginError(f"{keyword} {list(value)}: pixels are not square")
            return float(value[0])
    raise PluginError("the image has no Imager Pixel Spacing or Pixel Spacing: distances in mm are needed")


def load(ds: Dataset, xp) -> Mammogram:
    """Check that `ds` is a mammogram this detector can read, and bring it to attenuation values."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in MAMMOGRAPHY_CLASSES or (MAMMOGRAPHY_CLASSES[sop_class] is None and
                                                str(ds.get("BodyPartExamined", "")).upper() != "BREAST"):
        raise PluginError(f"not a mammogram (SOP class {sop_class}, modality {ds.get('Modality', '?')})")
    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise PluginError("a single-frame greyscale mammogram is needed")
    bits = int(ds.get("BitsStored", 0))
    if not 8 <= bits <= 16:
        raise PluginError(f"{bits} bits stored: 8-16 are handled")
    spacing = spacing_of(ds)
    if not 0.02 <= spacing <= 0.3:
        raise PluginError(f"pixel spacing {spacing} mm is outside what a mammogram has (0.02-0.3 mm)")
    raw = xp.asarray(ds.pixel_array, dtype=xp.float32)
    if raw.ndim != 2 or min(raw.shape) < 64:
        raise PluginError(f"image of {raw.shape} pixels: too small for a mammogram")
    low, high = float(raw.min()), float(raw.max())
    if high - low < 16:
        raise PluginError("the image is empty (no contrast)")
    intent = str(ds.get("PresentationIntentType", MAMMOGRAPHY_CLASSES[sop_class] or "FOR PRESENTATION")).upper()
    monochrome1 = str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1"
    processing = intent == "FOR PROCESSING"
    if processing:                          # raw: proportional to exposure; log, then denser is higher
        values = -xp.log(xp.maximum(raw, 1.0))
        if monochrome1:
            values = -values
    else:
        values = (high - raw) if monochrome1 else (raw - low)
    values = values - values.min()
    values = values / max(float(values.max()), 1e-6)
    laterality = str(ds.get("ImageLaterality") or ds.get("Laterality") or "")
    return Mammogram(values.astype(xp.float32), spacing, laterality, str(ds.get("ViewPosition") or ""),
                     monochrome1, processing)


def _otsu(values: np.ndarray) -> float:
    histogram, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(histogram)
    mean = np.cumsum(histogram * centres)
    total_weight, total_mean = weight[-1], mean[-1]
    between = (total_mean * weight - mean * total_weight) ** 2 / np.maximum(weight * (total_weight - weight), 1e-9)
    return float(centres[np.argmax(between)])


def masks(image: Mammogram, xp, factor: int = 4) -> tuple[object, object, np.ndarray]:
    """(breast mask without skin and pectoral muscle, on xp; chest wall side; skin distance in mm, downsampled)."""
    from scipy import ndimage

    rows, cols = image.values.shape
    small = to_numpy(image.values[: rows - rows % factor, : cols - cols % factor]
                     .reshape(rows // factor, factor, cols // factor, factor).mean(axis=(1, 3)))
    small = ndimage.gaussian_filter(small, 1.0)
    threshold = 0.5 * _otsu(small[small > 0.01]) if (small > 0.01).any() else 0.0
    labels, count = ndimage.label(small > max(threshold, 0.02))
    if count == 0:
        raise PluginError("no breast found in the image")
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, count + 1))
    breast = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
    if breast.sum() < 0.02 * breast.size:
        raise PluginError("no breast found in the image (too small a bright region)")
    chest_left = breast[:, : breast.shape[1] // 10].sum() >= breast[:, -breast.shape[1] // 10:].sum()
    skin = ndimage.distance_transform_edt(breast) * image.spacing * factor
    keep = skin > 1.5
    if image.view.upper().startswith("MLO"):
        keep &= ~_pectoral(small, breast, chest_left)
    full = xp.repeat(xp.repeat(xp.asarray(keep), factor, axis=0), factor, axis=1)
    mask = xp.zeros((rows, cols), dtype=bool)
    mask[: full.shape[0], : full.shape[1]] = full
    return mask, chest_left, skin


def _pectoral(small: np.ndarray, breast: np.ndarray, chest_left: bool) -> np.ndarray:
    """The pectoral muscle on an MLO view: the bright region reaching the upper chest-wall corner."""
    from scipy import ndimage

    rows, cols = small.shape
    corner = np.zeros_like(breast)
    band = slice(0, int(cols * 0.45)) if chest_left else slice(int(cols * 0.55), cols)
    corner[: int(rows * 0.7), band] = True
    region = breast & corner
    if region.sum() < 20:
        return np.zeros_like(breast)
    bright = region & (small > _otsu(small[region]))
    labels, _ = ndimage.label(bright)
    x = 0 if chest_left else cols - 1
    seeds = {int(v) for v in labels[: max(2, rows // 20), :][:, max(0, x - 3): x + 4].ravel() if v}
    seeds |= {int(v) for v in labels[:3, band].ravel() if v and np.any(labels[:, x] == v)}
    muscle = np.isin(labels, sorted(seeds)) if seeds else np.zeros_like(breast)
    if muscle.sum() > 0.35 * breast.sum():         # not a muscle: too big a share of the breast
        return np.zeros_like(breast)
    return ndimage.binary_dilation(muscle, iterations=2)


@dataclass
class Candidates:
    x: np.ndarray                 # column (pixels)
    y: np.ndarray                 # row (pixels)
    features: np.ndarray          # (n, len(FEATURES))


SCALES_MM = (0.05, 0.09, 0.15)   # Gaussian widths matched to calcifications of about 0.1-0.6 mm
SURROUND = 3.0                   # each scale minus a blur SURROUND times as wide (a difference of Gaussians)
NOISE_MM = 4.0                   # window of the local noise estimate
_STRIPE = 64
BOX_SIGMA = 2.5                  # from this width on, a Gaussian blur is three box passes


def _columns(image: np.ndarray, filter1d, **kwargs) -> np.ndarray:
    """A 1-D filter along axis 0, in contiguous column stripes (strided access is ~2x slower)."""
    out = np.empty_like(image)
    for j in range(0, image.shape[1], _STRIPE):
        out[:, j:j + _STRIPE] = filter1d(np.ascontiguousarray(image[:, j:j + _STRIPE]), axis=0, **kwargs)
    return out


def _box_width(sigma: float) -> int:
    """The width of the box filter whose three passes make a Gaussian of width `sigma` (odd)."""
    return int(round((4 * sigma * sigma + 1) ** 0.5)) | 1


def _blur_numpy(image: np.ndarray, sigma: float) -> np.ndarray:
    """A separable Gaussian blur (three box passes when wide), the two halves in two threads."""
    from concurrent.futures import ThreadPoolExecutor

    from scipy import ndimage

    if sigma < BOX_SIGMA:
        def rows(part):
            return ndimage.gaussian_filter1d(part, sigma, axis=1, truncate=3.0)

        def cols(part):
            return _columns(part, ndimage.gaussian_filter1d, sigma=sigma, truncate=3.0)
    else:
        width = _box_width(sigma)

        def rows(part):
            for _ in range(3):
                part = ndimage.uniform_filter1d(part, width, axis=1)
            return part

        def cols(part):
            for _ in range(3):
                part = _columns(part, ndimage.uniform_filter1d, size=width)
            return part
    half_r, half_c = image.shape[0] // 2, image.shape[1] // 2 // _STRIPE * _STRIPE or image.shape[1]
    with ThreadPoolExecutor(2) as pool:
        top, bottom = pool.map(rows, (image[:half_r], image[half_r:]))
        across = np.concatenate([top, bottom])
        left, right = pool.map(cols, (across[:, :half_c], across[:, half_c:]))
    return np.concatenate([left, right], axis=1) if right.size else left


def blur(image, sigma: float, xp):
    """A Gaussian blur of width `sigma` pixels, on either backend: the same passes on both (rows,
    then columns; three box passes when wide), so that CuPy finds what NumPy finds."""
    if xp.__name__ == "numpy":
        return _blur_numpy(image, sigma)
    ndi = ndimage_of(xp)
    if sigma < BOX_SIGMA:
        rows = ndi.gaussian_filter1d(image, sigma, axis=1, truncate=3.0)
        return ndi.gaussian_filter1d(rows, sigma, axis=0, truncate=3.0)
    width = _box_width(sigma)
    for axis in (1, 0):
        for _ in range(3):
            image = ndi.uniform_filter1d(image, width, axis=axis)
    return image


def _coarse(image, factor: int, xp):
    """Block means: the image `factor` (a power of 2) times smaller each way (an odd edge dropped)."""
    while factor > 1:
        rows, cols = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
        image = (image[0:rows:2, 0:cols:2] + image[1:rows:2, 0:cols:2] + image[0:rows:2, 1:cols:2]
                 + image[1:rows:2, 1:cols:2]) * 0.25
        factor //= 2
    return image


def _upsample2(small, shape: tuple[int, int], xp):
    """Bilinear x2 of a block-mean half-resolution image, to `shape` (edges repeated)."""
    rows, cols = small.shape
    left = xp.concatenate([small[:, :1], small[:, :-1]], axis=1)
    right = xp.concatenate([small[:, 1:], small[:, -1:]], axis=1)
    wide = xp.empty((rows, cols, 2), dtype=small.dtype)
    wide[:, :, 0] = 0.75 * small + 0.25 * left
    wide[:, :, 1] = 0.75 * small + 0.25 * right
    wide = wide.reshape(rows, 2 * cols)
    up = xp.empty((2 * rows, 2 * cols), dtype=small.dtype)
    up[0::2] = 0.75 * wide
    up[1::2] = up[0::2]
    up[2::2] += 0.25 * wide[:-1]
    up[0] += 0.25 * wide[0]
    up[1:-1:2] += 0.25 * wide[1:]
    up[-1] += 0.25 * wide[-1]
    full = xp.empty(shape, dtype=small.dtype)
    r, c = min(shape[0], up.shape[0]), min(shape[1], up.shape[1])
    full[:r, :c] = up[:r, :c]
    full[r:, :c] = up[r - 1:r, :c]
    full[:, c:] = full[:, c - 1:c]
    return full


def zscores(image: Mammogram, mask, xp) -> tuple[object, object, float]:
    """(band-pass, z-score, noise) at calcification scale.

    At each scale a difference of Gaussians (a cascade of five blurs serves all three); each
    scale divided by its own noise (median absolute deviation in the breast); the best scale
    per pixel (the band-pass returned is in those noise units); then divided by the local
    noise around (NOISE_MM, on a coarse grid).
    """
    ndi = ndimage_of(xp)
    p = image.spacing
    widths = sorted({round(w, 6) for scale in SCALES_MM for w in (scale, SURROUND * scale)})
    blurred, current, done, half = {}, image.values, 0.0, None
    for width in widths:
        sigma = max(0.5, width / p)
        missing = (sigma * sigma - done * done) ** 0.5       # the cascade: add what is missing
        if half is None and done >= 1.5 and missing >= 2.0:
            half = _coarse(current, 2, xp)                   # band-limited by now: go on at half resolution
        if half is None:
            current = blur(current, missing, xp)
            blurred[width] = current
        else:
            half = blur(half, missing / 2, xp)
            blurred[width] = _upsample2(half, image.values.shape, xp)
        done = sigma
    step = max(1, int(mask.sum()) // 200000)
    best = None
    noise_fine = 1e-3
    for scale in SCALES_MM:
        band = blurred[round(scale, 6)] - blurred[round(SURROUND * scale, 6)]
        sample = band[mask][::step]
        noise = max(float(1.4826 * xp.median(xp.abs(sample - xp.median(sample)))) if sample.size else 1e-3, 1e-6)
        band *= 1.0 / noise
        if best is None:
            best, noise_fine = band, noise
        else:
            xp.maximum(best, band, out=best)
    factor = 4
    coarse = _coarse(xp.minimum(best * best, 9.0), factor, xp)
    local = xp.sqrt(xp.maximum(ndi.uniform_filter(coarse, int(round(NOISE_MM / p / factor)) | 1), 0.25))
    local = xp.pad(local, ((0, 1), (0, 1)), mode="edge")
    local = xp.repeat(xp.repeat(local, factor, axis=0), factor, axis=1)[: best.shape[0], : best.shape[1]]
    return best, best / local, noise_fine


def _bounds(mask, xp, margin: int) -> tuple[slice, slice]:
    rows = xp.nonzero(mask.any(axis=1))[0]
    cols = xp.nonzero(mask.any(axis=0))[0]
    if rows.size == 0:
        return slice(0, 0), slice(0, 0)
    return (slice(max(0, int(rows[0]) - margin), int(rows[-1]) + margin + 1),
            slice(max(0, int(cols[0]) - margin), int(cols[-1]) + margin + 1))


def candidates(image: Mammogram, mask, skin_small: np.ndarray, xp, *, seed: float = 4.0, low: float = 2.5,
               limit: int = MAX_CANDIDATES) -> Candidates:
    """Candidate regions and their features (see FEATURES), in full-image pixel coordinates."""
    ndi = ndimage_of(xp)
    margin = int(round(2.0 / image.spacing))
    box_rows, box_cols = _bounds(mask, xp, margin)
    empty = Candidates(np.zeros(0), np.zeros(0), np.zeros((0, len(FEATURES))))
    if box_rows.stop - box_rows.start < 8:
        return empty
    crop = Mammogram(xp.ascontiguousarray(image.values[box_rows, box_cols]), image.spacing, image.laterality,
                     image.view, image.monochrome1, image.for_processing)
    crop_mask = mask[box_rows, box_cols]
    band, z, noise = zscores(crop, crop_mask, xp)
    labels, count = ndi.label((z > low) & crop_mask)
    if count == 0:
        return empty
    seeds = xp.nonzero((z >= seed) & (labels > 0))
    seed_labels = labels[seeds]
    peaks = xp.zeros(count + 1, dtype=xp.float32)
    if xp.__name__ == "numpy":
        np.maximum.at(peaks, seed_labels, z[seeds])
    else:  # cupy
        import cupyx
        cupyx.scatter_max(peaks, seed_labels, z[seeds])
    areas = xp.bincount(labels.ravel(), minlength=count + 1) * image.spacing ** 2
    chosen = xp.nonzero((peaks > 0) & (areas <= MAX_AREA_MM2))[0]
    order = chosen[xp.argsort(-peaks[chosen])][:limit]
    if order.size == 0:
        return empty
    # the peak pixel of each chosen region: the best seed of its label
    by_z = xp.argsort(-z[seeds])
    first = to_numpy(xp.unique(seed_labels[by_z], return_index=True)[1])
    peak_label = to_numpy(seed_labels[by_z])[first]
    peak_y, peak_x = to_numpy(seeds[0][by_z])[first], to_numpy(seeds[1][by_z])[first]
    where = {int(label): i for i, label in enumerate(peak_label)}
    order = to_numpy(order)
    index = np.array([where[int(label)] for label in order])
    half = int(round(PATCH_MM / 2 / image.spacing))
    offsets = np.arange(-half, half + 1)
    rows, cols = crop.values.shape
    ys = np.clip(peak_y[index][:, None] + offsets, 0, rows - 1)
    xs = np.clip(peak_x[index][:, None] + offsets, 0, cols - 1)
    take = (xp.asarray(ys[:, :, None]), xp.asarray(xs[:, None, :]))   # patches, where the image is
    regions = labels[take] == xp.asarray(order)[:, None, None]
    density = to_numpy(_coarse(crop.values, 8, xp))
    dens = density[np.minimum(peak_y[index] // 8, density.shape[0] - 1), np.minimum(peak_x[index] // 8,
                                                                                    density.shape[1] - 1)]
    full_rows, full_cols = image.values.shape
    shape, cy, cx = (to_numpy(a) for a in _features(crop.values[take], z[take], regions, image.spacing, xp))
    iy, ix = peak_y[index] + box_rows.start, peak_x[index] + box_cols.start
    sy = np.minimum((iy * skin_small.shape[0] / full_rows).astype(int), skin_small.shape[0] - 1)
    sx = np.minimum((ix * skin_small.shape[1] / full_cols).astype(int), skin_small.shape[1] - 1)
    features = np.column_stack([shape, dens, skin_small[sy, sx]])
    return Candidates(cx + box_cols.start + peak_x[index] - half, cy + box_rows.start + peak_y[index] - half, features)


_LEVELS = 16
_I, _J = np.meshgrid(np.arange(_LEVELS), np.arange(_LEVELS), indexing="ij")
_OFFSETS = ((0, 1), (1, 1), (1, 0), (1, -1))     # distance 1 at 0, 45, 90 and 135 degrees (as skimage's)


def textures(patches, xp=np):
    """GLCM contrast, homogeneity, energy and correlation of each patch (n, p, p): 16 grey levels,
    distance 1, the four directions' symmetric, normalised matrices averaged. The same values as
    skimage's `graycomatrix` patch by patch, counted for all patches at once (on `xp`)."""
    n, rows, cols = patches.shape
    if n == 0:
        return xp.zeros((0, 4))
    low = patches.min(axis=(1, 2), keepdims=True)
    span = patches.max(axis=(1, 2), keepdims=True) - low
    levels = xp.clip(((patches - low) / (span + 1e-9) * (_LEVELS - 1)).astype(xp.uint8), 0, _LEVELS - 1)
    base = (xp.arange(n) * _LEVELS * _LEVELS)[:, None, None]
    glcm = xp.zeros((n, _LEVELS, _LEVELS))
    for dr, dc in _OFFSETS:
        first = levels[:, :rows - dr, max(0, -dc):cols - max(0, dc)].astype(xp.int64)
        second = levels[:, dr:, max(0, dc):cols + min(0, dc)].astype(xp.int64)
        counts = xp.bincount((base + first * _LEVELS + second).ravel(), minlength=n * _LEVELS * _LEVELS)
        counts = counts.reshape(n, _LEVELS, _LEVELS).astype(xp.float64)
        counts += counts.transpose(0, 2, 1)
        glcm += counts / xp.maximum(counts.sum(axis=(1, 2), keepdims=True), 1)
    glcm /= len(_OFFSETS)
    i, j = xp.asarray(_I), xp.asarray(_J)
    mean_i = (glcm * i).sum(axis=(1, 2))
    std_i = xp.sqrt((glcm * (i - mean_i[:, None, None]) ** 2).sum(axis=(1, 2))) + 1e-12
    difference = (i - j) ** 2
    centred = (i - mean_i[:, None, None]) * (j - mean_i[:, None, None])
    return xp.column_stack([(glcm * difference).sum(axis=(1, 2)), (glcm / (1 + difference)).sum(axis=(1, 2)),
                            xp.sqrt((glcm ** 2).sum(axis=(1, 2))), (glcm * centred).sum(axis=(1, 2)) / std_i ** 2])


def _features(patches, zpatches, regions, spacing: float, xp):
    """The FEATURES of every candidate but the last two (density, skin distance), from stacked
    patches (n, p, p) centred on their peaks, on `xp` (float64, as on the CPU).

    Returns (features, centroid row, centroid column), the centroids in patch coordinates.
    """
    n, size, _ = patches.shape
    patches = patches.astype(xp.float64)
    count = regions.sum(axis=(1, 2)).astype(xp.float64)
    gy, gx = (a.astype(xp.float64) for a in xp.mgrid[0:size, 0:size])
    weight = xp.maximum(zpatches, 0) * regions
    total = weight.sum(axis=(1, 2)) + 1e-12
    cy = (weight * gy).sum(axis=(1, 2)) / total
    cx = (weight * gx).sum(axis=(1, 2)) / total
    # shape: second moments of the region (each pixel adds 1/12 of variance each way)
    my = (regions * gy).sum(axis=(1, 2)) / count
    mx = (regions * gx).sum(axis=(1, 2)) / count
    dy, dx = gy - my[:, None, None], gx - mx[:, None, None]
    syy = (regions * dy * dy).sum(axis=(1, 2)) / count + 1 / 12
    sxx = (regions * dx * dx).sum(axis=(1, 2)) / count + 1 / 12
    sxy = (regions * dy * dx).sum(axis=(1, 2)) / count
    mean_s, root = (syy + sxx) / 2, xp.sqrt(((syy - sxx) / 2) ** 2 + sxy ** 2)
    large, small = mean_s + root, xp.maximum(mean_s - root, 1e-9)
    eccentricity = xp.sqrt(xp.clip(1 - small / large, 0, 1))
    elongation = xp.sqrt(large / small)
    padded = xp.pad(regions, ((0, 0), (1, 1), (1, 1)))
    interior = padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:]
    perimeter = xp.maximum((regions & ~interior).sum(axis=(1, 2)), 1) * spacing
    area = count * spacing ** 2
    # contrast against a ring around the region
    radius = xp.hypot(dy, dx)
    ring = ~regions & (radius > (xp.sqrt(count / np.pi) + 1.5)[:, None, None])
    ring_n = xp.maximum(ring.sum(axis=(1, 2)), 1)
    ring_mean = (patches * ring).sum(axis=(1, 2)) / ring_n
    ring_std = xp.sqrt(xp.maximum(((patches - ring_mean[:, None, None]) ** 2 * ring).sum(axis=(1, 2)) / ring_n, 0))
    inside_mean = (patches * regions).sum(axis=(1, 2)) / count
    ring_contrast = (inside_mean - ring_mean) / (ring_std + 1e-6)
    # statistics of the patch
    flat = patches.reshape(n, -1)
    centred = flat - flat.mean(axis=1, keepdims=True)
    variance = (centred ** 2).mean(axis=1) + 1e-12
    skewness = (centred ** 3).mean(axis=1) / variance ** 1.5
    kurtosis = (centred ** 4).mean(axis=1) / variance ** 2 - 3
    peak_z = xp.where(regions, zpatches, -xp.inf).reshape(n, -1).max(axis=1)
    mean_z = (zpatches * regions).sum(axis=(1, 2)) / count
    features = xp.column_stack([area, 2 * xp.sqrt(area / np.pi), perimeter ** 2 / (4 * np.pi * area), eccentricity,
                                elongation, peak_z, mean_z, ring_contrast, skewness, kurtosis, textures(patches, xp)])
    return features, cy, cx
