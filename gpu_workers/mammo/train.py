"""Train the calcification classifier on phantoms: `python -m gpu_workers.mammo.train`.

Reproducible: the phantoms follow from their seeds (training 0..N-1, validation from
10000; bench/mammo_froc.py tests on seeds from 20000, never used here). Two classifiers are
fitted on the same candidates: Fisher's linear discriminant (the founding paper's baseline)
and gradient-boosted trees; the one with the better cluster sensitivity at 0.5 false
positives per image on the validation phantoms becomes the default. The calcification
threshold used to form clusters, and the cluster thresholds of the operating points, are
read off the validation FROC. Writes model.skops and model.json (what was done, with which
versions, and the validation figures).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from . import evaluate
from .detect import FEATURES
from .model import META_FILE, MODEL_FILE

FP_POINTS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
CALC_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6)


def candidates_of(seeds, workers: int = 2, progress=None) -> list[evaluate.ImageResult]:
    results = []
    with get_context("spawn").Pool(workers) as pool:
        for result in pool.imap(evaluate.analyse, seeds):
            results.append(result)
            if progress:
                progress(len(results), len(seeds))
    return results


def classifiers(seed: int = 0) -> dict:
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {"fisher-lda": make_pipeline(StandardScaler(), LinearDiscriminantAnalysis()),
            "boosted-trees": make_pipeline(StandardScaler(), HistGradientBoostingClassifier(
                max_iter=300, learning_rate=0.06, max_leaf_nodes=31, l2_regularization=1.0,
                class_weight="balanced", random_state=seed))}


def choose_operating(validation: list[evaluate.ImageResult]) -> tuple[float, float, list[dict]]:
    """(calcification threshold, sensitivity at 0.5 FP/image, operating points) on validation."""
    best = None
    for calc_threshold in CALC_THRESHOLDS:
        marks = evaluate.cluster_marks(validation, calc_threshold)
        sens = evaluate.sensitivity_at(marks, FP_POINTS)
        key = (sens[list(FP_POINTS).index(0.5)], sens.mean())
        if best is None or key > best[0]:
            best = (key, calc_threshold, marks, sens)
    (_, _), calc_threshold, marks, sens = best
    points = [{"fp_per_image": fp, "cluster_threshold": round(evaluate.threshold_for(marks, fp), 4),
               "validation_sensitivity": round(float(s), 3)} for fp, s in zip(FP_POINTS, sens)]
    return calc_threshold, float(sens[list(FP_POINTS).index(0.5)]), points


def train(n_train: int, n_validation: int, out_model: Path, out_meta: Path, workers: int = 2) -> dict:
    import sklearn
    import skops
    import skops.io as sio

    started = time.time()

    def show(done, total):
        print(f"\r  phantoms {done}/{total}", end="", file=sys.stderr, flush=True)

    print("training phantoms", file=sys.stderr)
    training = candidates_of(list(range(n_train)), workers, show)
    print("\nvalidation phantoms", file=sys.stderr)
    validation = candidates_of(list(range(10000, 10000 + n_validation)), workers, show)
    print(file=sys.stderr)
    X = np.vstack([r.features for r in training])
    y = np.concatenate([r.labels for r in training])
    report, fitted = {}, {}
    for name, classifier in classifiers().items():
        classifier.fit(np.nan_to_num(X), y)
        for r in validation:
            r.scores = classifier.predict_proba(np.nan_to_num(r.features))[:, 1] if len(r.features) else np.zeros(0)
        calc_threshold, at_half, points = choose_operating(validation)
        calc_marks = evaluate.calcification_marks(validation)
        report[name] = {"calc_threshold": calc_threshold, "cluster_sensitivity_at_0.5": round(at_half, 3),
                        "operating_points": points,
                        "calcification_sensitivity": dict(zip(map(str, FP_POINTS), np.round(
                            evaluate.sensitivity_at(calc_marks, FP_POINTS), 3).tolist()))}
        fitted[name] = classifier
        print(f"{name}: cluster sensitivity {at_half:.3f} at 0.5 FP/image (calcification threshold "
              f"{calc_threshold})", file=sys.stderr)
    default = max(report, key=lambda n: (report[n]["cluster_sensitivity_at_0.5"], n == "boosted-trees"))
    sio.dump(fitted[default], out_model)
    meta = {
        "classifier": default, "features": list(FEATURES),
        "calc_threshold": report[default]["calc_threshold"],
        "operating_points": report[default]["operating_points"],
        "validation": report,
        "training": {
            "command": f"python -m gpu_workers.mammo.train --train {n_train} --validation {n_validation}",
            "training_seeds": [0, n_train - 1], "validation_seeds": [10000, 10000 + n_validation - 1],
            "candidates": int(len(y)), "positives": int(y.sum()),
            "phantom": "gpu_workers.mammo.phantom (pixel spacing 0.05-0.1 mm, 12/14 bits, MONOCHROME1 at 15%)",
            "python": platform.python_version(), "numpy": np.__version__, "scikit-learn": sklearn.__version__,
            "skops": skops.__version__, "date": time.strftime("%Y-%m-%d"),
            "seconds": round(time.time() - started, 1)},
    }
    out_meta.write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=160, help="training phantoms (seeds 0..N-1)")
    parser.add_argument("--validation", type=int, default=60, help="validation phantoms (seeds from 10000)")
    parser.add_argument("--out", type=Path, default=MODEL_FILE.parent, help="folder for model.skops and model.json")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = train(args.train, args.validation, args.out / MODEL_FILE.name, args.out / META_FILE.name, args.workers)
    print(f"wrote {args.out / MODEL_FILE.name} ({meta['classifier']}) and {args.out / META_FILE.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
