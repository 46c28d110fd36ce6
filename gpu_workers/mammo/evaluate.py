"""Detection on phantoms and FROC analysis: shared by training (operating points) and bench/mammo_froc.py.

Hits, as the issue defines them: a detected cluster whose centre lies within a true
cluster's extent; a detected calcification within 1 mm of a true one's centre. Each true
finding is found once (the best-scoring mark); any other mark is a false positive.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import detect, phantom
from .model import clusters


@dataclass
class ImageResult:
    """One phantom: its truth, and every candidate with its features (and later its score)."""
    seed: int
    spacing: float
    truth: phantom.Truth
    x: np.ndarray
    y: np.ndarray
    features: np.ndarray
    labels: np.ndarray            # 1 where the candidate is a true calcification
    seconds: float = 0.0
    scores: np.ndarray | None = None


def phantom_options(seed: int, base: phantom.Options = phantom.Options()) -> phantom.Options:
    """Varied acquisitions: pixel spacing 0.05-0.1 mm (same field in mm), 12 or 14 bits, MONOCHROME1 now and then."""
    rng = np.random.default_rng(seed + 7_000_000)
    spacing = float(rng.choice([0.05, 0.065, 0.085, 0.1]))
    return phantom.Options(rows=int(round(base.rows * base.spacing / spacing)),
                           columns=int(round(base.columns * base.spacing / spacing)), spacing=spacing,
                           bits=int(rng.choice([12, 14])), monochrome1=bool(rng.random() < 0.15))


NORMAL_KINDS = ("no calcification", "isolated calcifications only", "very dense")


def normal_options(seed: int) -> phantom.Options:
    """A normal image (no cluster) of one of three kinds in turn: no calcification at all,
    isolated calcifications only (2-6, each more than 8 mm from the others: no cluster), or very
    dense tissue (glandular fraction 0.8) without calcification; acquisitions varied as above."""
    kind = seed % 3
    opts = phantom_options(seed)
    if kind == 0:
        return replace(opts, clusters=0, isolated=0)
    if kind == 1:
        return replace(opts, clusters=0, isolated=2 + seed % 5)
    return replace(opts, clusters=0, isolated=0, density=0.8)


def analyse_normal(seed: int) -> "ImageResult":
    return analyse(seed, normal_options(seed))


def label(x: np.ndarray, y: np.ndarray, truth: phantom.Truth) -> np.ndarray:
    labels = np.zeros(len(x), dtype=np.int8)
    for calc in truth.calcifications:
        distance = np.hypot(x - calc.x, y - calc.y) * truth.spacing
        labels[distance <= max(0.3, calc.diameter_mm / 2 + 0.2)] = 1
    return labels


def analyse(seed: int, opts: phantom.Options | None = None) -> ImageResult:
    """Generate the phantom for `seed` and find its candidates (NumPy)."""
    import time

    opts = opts or phantom_options(seed)
    pixels, truth = phantom.generate(seed, opts)
    dataset = phantom.to_dataset(pixels, truth, opts)
    started = time.perf_counter()
    image = detect.load(dataset, np)
    mask, _, skin = detect.masks(image, np)
    found = detect.candidates(image, mask, skin, np)
    seconds = time.perf_counter() - started
    return ImageResult(seed, opts.spacing, truth, found.x, found.y, found.features, label(found.x, found.y, truth),
                       seconds)


# -- FROC ---------------------------------------------------------------------------------

@dataclass
class Marks:
    """Per image: the score of every mark and which true finding (index) it hits, or -1."""
    scores: list[np.ndarray]
    hits: list[np.ndarray]
    truths: list[int]             # true findings per image


def cluster_marks(results: list[ImageResult], calc_threshold: float, min_size: int = 3) -> Marks:
    scores, hits, truths = [], [], []
    for r in results:
        found = clusters(r.x, r.y, r.scores, r.spacing, threshold=calc_threshold, min_size=min_size)
        s = np.array([c.score for c in found])
        h = np.full(len(found), -1)
        taken = set()
        for i in np.argsort(-s) if len(s) else []:
            for j, true in enumerate(r.truth.clusters):
                if j not in taken and np.hypot(found[i].x - true.x, found[i].y - true.y) * r.spacing <= true.radius_mm:
                    h[i] = j
                    taken.add(j)
                    break
        scores.append(s)
        hits.append(h)
        truths.append(len(r.truth.clusters))
    return Marks(scores, hits, truths)


def calcification_marks(results: list[ImageResult]) -> Marks:
    scores, hits, truths = [], [], []
    for r in results:
        s = r.scores
        h = np.full(len(s), -1)
        taken = set()
        for i in np.argsort(-s):
            distance = [np.hypot(r.x[i] - c.x, r.y[i] - c.y) * r.spacing for c in r.truth.calcifications]
            for j in np.argsort(distance) if distance else []:
                if distance[j] > 1.0:
                    break
                if j not in taken:
                    h[i] = j
                    taken.add(j)
                    break
        scores.append(s)
        hits.append(h)
        truths.append(len(r.truth.calcifications))
    return Marks(scores, hits, truths)


def froc(marks: Marks, images: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, false positives per image, sensitivity), over every distinct score."""
    images = np.arange(len(marks.scores)) if images is None else images
    scores = np.concatenate([marks.scores[i] for i in images]) if len(images) else np.zeros(0)
    hit = np.concatenate([marks.hits[i] >= 0 for i in images]) if len(images) else np.zeros(0, bool)
    total = sum(marks.truths[i] for i in images)
    order = np.argsort(-scores)
    tp = np.cumsum(hit[order])
    fp = np.cumsum(~hit[order])
    return scores[order], fp / max(len(images), 1), tp / max(total, 1)


def froc_on_normals(marks: Marks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, false positives per normal image, sensitivity): the false positives counted on
    the images without a true finding only (what a screening reader meets most), sensitivity on
    the others, over every distinct score."""
    normal = [i for i, truths in enumerate(marks.truths) if truths == 0]
    scores = np.concatenate(marks.scores) if marks.scores else np.zeros(0)
    hit = np.concatenate([h >= 0 for h in marks.hits]) if marks.hits else np.zeros(0, bool)
    on_normal = np.concatenate([np.full(len(s), marks.truths[i] == 0) for i, s in enumerate(marks.scores)]) \
        if marks.scores else np.zeros(0, bool)
    order = np.argsort(-scores)
    return (scores[order], np.cumsum(on_normal[order]) / max(len(normal), 1),
            np.cumsum(hit[order]) / max(sum(marks.truths), 1))


def marks_at(marks: Marks, threshold: float, normal_only: bool = True) -> np.ndarray:
    """Marks scoring at least `threshold` per image (per normal image with `normal_only`)."""
    return np.array([int(np.sum(s >= threshold)) for s, t in zip(marks.scores, marks.truths)
                     if t == 0 or not normal_only])


def sensitivity_at(marks: Marks, fp_targets, images: np.ndarray | None = None) -> np.ndarray:
    """Sensitivity at each false-positive rate (the best reached without exceeding it)."""
    _, fps, sens = froc(marks, images)
    out = []
    for target in fp_targets:
        allowed = sens[fps <= target]
        out.append(float(allowed.max()) if allowed.size else 0.0)
    return np.array(out)


def bootstrap(marks: Marks, fp_targets, rounds: int = 1000, seed: int = 1) -> np.ndarray:
    """95% intervals of sensitivity at each false-positive rate, images resampled: shape (2, n)."""
    rng = np.random.default_rng(seed)
    n = len(marks.scores)
    samples = np.array([sensitivity_at(marks, fp_targets, rng.integers(0, n, n)) for _ in range(rounds)])
    return np.percentile(samples, [2.5, 97.5], axis=0)


def threshold_for(marks: Marks, fp_per_image: float) -> float:
    """The lowest score threshold whose false positives per image stay within `fp_per_image`."""
    thresholds, fps, _ = froc(marks)
    ok = thresholds[fps <= fp_per_image]
    return float(ok.min()) if ok.size else 1.0
