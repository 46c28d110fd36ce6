"""The classifier that keeps true calcifications among the candidates, and clusters of them.

The trained model ships with the package: `model.skops` (a scikit-learn pipeline, loaded
with skops so that only the listed types can be built: no pickle, no code from the file)
and `model.json` (how it was trained, its features, and the thresholds of its operating
points, measured on validation phantoms). `python -m gpu_workers.mammo.train` makes them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .detect import FEATURES

SINGLE_THREAD_ROWS = 20000

HERE = Path(__file__).resolve().parent
MODEL_FILE, META_FILE = HERE / "model.skops", HERE / "model.json"
TRUSTED_TYPES = [   # what skops may build from model.skops: nothing else
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
]


class ModelError(RuntimeError):
    """The shipped model is missing or does not match this code."""


@dataclass
class Model:
    classifier: object
    meta: dict

    @classmethod
    def load(cls, model_file: Path = MODEL_FILE, meta_file: Path = META_FILE) -> "Model":
        import skops.io as sio

        if not model_file.exists() or not meta_file.exists():
            raise ModelError(f"no trained model at {model_file}: run `python -m gpu_workers.mammo.train`")
        meta = json.loads(meta_file.read_text())
        if list(meta.get("features", [])) != list(FEATURES):
            raise ModelError("the shipped model was trained on other features than the detector computes")
        untrusted = sio.get_untrusted_types(file=model_file)
        unexpected = sorted(set(untrusted) - set(TRUSTED_TYPES))
        if unexpected:
            raise ModelError(f"{model_file} holds types that are not trusted: {unexpected}")
        return cls(sio.load(model_file, trusted=untrusted), meta)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        if len(features) == 0:
            return np.zeros(0)
        from threadpoolctl import threadpool_limits

        # an image's thousand candidates: one thread (OpenMP's team of 16 took 70 ms on a GPU machine, one 4)
        with threadpool_limits(1 if len(features) <= SINGLE_THREAD_ROWS else None, user_api="openmp"):
            return self.classifier.predict_proba(np.nan_to_num(features))[:, 1]

    def operating_point(self, fp_per_image: float) -> tuple[float, float]:
        """(calcification threshold, cluster threshold) expected to give `fp_per_image` false
        positive clusters per image (interpolated between the validated points)."""
        table = sorted(self.meta["operating_points"], key=lambda p: p["fp_per_image"])
        fps = [p["fp_per_image"] for p in table]
        thresholds = [p["cluster_threshold"] for p in table]
        return self.meta["calc_threshold"], float(np.interp(fp_per_image, fps, thresholds))


@dataclass
class Cluster:
    id: int
    x: float
    y: float
    radius_mm: float
    n: int
    score: float
    members: list[int]


def clusters(x: np.ndarray, y: np.ndarray, scores: np.ndarray, spacing: float, *, threshold: float,
             min_size: int = 3, area_cm2: float = 1.0) -> list[Cluster]:
    """Groups of at least `min_size` calcifications (score >= threshold) within `area_cm2`.

    A calcification with `min_size - 1` others within the radius of a disc of that area is a
    core; cores and what lies within that radius of them form a cluster (DBSCAN). A cluster's
    score is the mean of its three best calcification scores.
    """
    from sklearn.cluster import DBSCAN

    keep = np.nonzero(scores >= threshold)[0]
    if len(keep) < min_size:
        return []
    radius_mm = float(np.sqrt(area_cm2 * 100 / np.pi))
    points = np.column_stack([x[keep], y[keep]]) * spacing
    labels = DBSCAN(eps=radius_mm, min_samples=min_size).fit_predict(points)
    found = []
    for label in sorted(set(labels) - {-1}):
        members = keep[labels == label]
        mx, my = float(x[members].mean()), float(y[members].mean())
        extent = float(np.max(np.hypot(x[members] - mx, y[members] - my)) * spacing) + 0.5
        best = np.sort(scores[members])[::-1][:3]
        found.append(Cluster(0, mx, my, round(extent, 2), int(len(members)), float(best.mean()),
                             [int(m) for m in members]))
    found.sort(key=lambda c: -c.score)
    for number, cluster in enumerate(found, start=1):
        cluster.id = number
    return found
