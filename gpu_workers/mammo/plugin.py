"""The mammography CAD plug-in: micro-calcifications found, marked, reported.

For each mammogram of the series: candidates (`detect`), their probabilities (the shipped
classifier, `model`), clusters of at least `min_cluster_size` within `cluster_area_cm2`,
kept above the operating point's threshold. Results:
- a Secondary Capture of the mammogram with every cluster circled, an arrow pointing at it
  and its id burned in (isolated calcifications too when asked), as the founding paper's
  figure 4, visible at the image's default window;
- a Comprehensive 3D SR (TID 1500): one measurement group per cluster (and per isolated
  calcification), its region a circle on the source image, its finding type, the number of
  calcifications, its score, the same tracking id as burned into the SC, the algorithm;
- findings.json for the viewer's overlay (x = column, y = row, in source pixels), and per
  image analysed its outcome.

A normal image (most screening mammograms) is a result like any other: its SR holds a group
"no cluster found" (Finding: calcification cluster; calcification cluster = Absent; the
algorithm with its version and parameters; the image examined), its SC is the image without
a mark under a banner that says no cluster was found, and the job succeeds with
`outcome: "no cluster found"` in its summary. A failed job has no summary: its state is
"failed" and its errors say why.
"""
from __future__ import annotations

import functools
import json
import time

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from gpu_workers.backend import to_numpy
from gpu_workers.plugin import Accepts, Context, OutputFile, Param, PluginError, Result, Series
from gpu_workers.results import Finding, NothingFound, measurement_report, secondary_capture

from . import detect
from .model import Model, clusters

CLUSTER = Code("129769006", "SCT", "Calcification cluster")
INDIVIDUAL = Code("129770007", "SCT", "Individual calcification")
NUMBER = Code("111038", "DCM", "Number of calcifications")
CERTAINTY = Code("111012", "DCM", "Certainty of Finding")
MAMMOGRAPHY = Code("71651007", "SCT", "Mammography")
COUNT_UNIT = Code("1", "UCUM", "no units")
PERCENT = Code("%", "UCUM", "percent")
NO_CLUSTER = "no cluster found"         # summary outcome, findings.json outcome, SR tracking identifier
CLUSTERS_FOUND = "clusters found"


@functools.lru_cache(maxsize=1)
def _model() -> Model:
    return Model.load()


class MammoCad:
    name = "mammo-cad"
    version = "1.0.0"
    title = "Micro-calcification detection in mammograms"
    accepts = Accepts(modalities=("MG",), sop_classes=tuple(detect.MAMMOGRAPHY_CLASSES), per="series")
    params = (
        Param("operating_point", "float", 0.5, "False-positive clusters expected per image (the FROC operating "
              "point the thresholds were validated at).", 0.1, 4.0, unit="FP/image",
              label="False positives per image"),
        Param("threshold", "float", 0.0, "Cluster score threshold (0-1) instead of the operating point; 0: use "
              "the operating point.", 0.0, 1.0, label="Cluster score threshold"),
        Param("min_cluster_size", "int", 3, "Calcifications a cluster needs.", 2, 20,
              label="Calcifications per cluster"),
        Param("cluster_area_cm2", "float", 1.0, "Area the calcifications of a cluster lie within.", 0.25, 4.0,
              unit="cm2", label="Cluster area"),
        Param("report_isolated", "bool", False, "Also mark and report calcifications outside clusters.",
              label="Report isolated calcifications"),
    )
    wants_gpu = True

    def run(self, inputs: list[Series], params: dict, ctx: Context) -> Result:
        started = time.perf_counter()
        model = _model()
        calc_threshold, cluster_threshold = model.operating_point(params["operating_point"])
        if params["threshold"]:
            cluster_threshold = params["threshold"]
        images = [i for series in inputs for i in series.instances]
        if not images:
            raise PluginError("no mammogram in the series")
        datasets, sr_findings, sources, normal = [], [], [], []
        findings = {"calcifications": [], "clusters": [], "images": []}
        for number, instance in enumerate(images, start=1):
            ctx.progress((number - 1) / len(images), f"image {number} of {len(images)}: finding candidates")
            source = instance.dataset()
            image = detect.load(source, ctx.xp)
            mask, _, skin = detect.masks(image, ctx.xp)
            found = detect.candidates(image, mask, skin, ctx.xp)
            ctx.progress((number - 0.4) / len(images), f"image {number}: classifying {len(found.x)} candidates")
            scores = model.probabilities(found.features)
            groups = [c for c in clusters(found.x, found.y, scores, image.spacing, threshold=calc_threshold,
                                          min_size=params["min_cluster_size"], area_cm2=params["cluster_area_cm2"])
                      if c.score >= cluster_threshold]
            prefix = f"{number}." if len(images) > 1 else ""
            listed = len(findings["calcifications"])
            marks = self._findings(found, scores, groups, prefix, params["report_isolated"], cluster_threshold,
                                   image.spacing, source, findings, sr_findings)
            findings["images"].append({"sop_instance_uid": str(source.SOPInstanceUID), "clusters": len(groups),
                                       "calcifications": len(findings["calcifications"]) - listed,
                                       "outcome": CLUSTERS_FOUND if groups else NO_CLUSTER})
            if not groups:
                normal.append(NothingFound(f"image {number}: {NO_CLUSTER}" if len(images) > 1 else NO_CLUSTER,
                                           CLUSTER, [source]))
            sc = secondary_capture(source, render(image, source, marks, ctx.xp), ctx, name="sc",
                                   description=f"CAD{_view(source)}: micro-calcifications", instance_number=number)
            datasets.append(sc)
            sources.append(source)
        views = "".join(dict.fromkeys(_view(source) for source in sources))    # "R MLO", or each image's
        sr = measurement_report(sr_findings, sources, ctx, name="sr", title=f"CAD{views}: micro-calcifications",
                                procedure=MAMMOGRAPHY, nothing_found=normal)
        datasets.append(sr)
        outcome = CLUSTERS_FOUND if findings["clusters"] else NO_CLUSTER
        ctx.progress(1.0, f"{len(findings['clusters'])} clusters" if findings["clusters"] else NO_CLUSTER)
        summary = {"outcome": outcome, "clusters": len(findings["clusters"]),
                   "calcifications": len(findings["calcifications"]), "images": len(images),
                   "images_without_clusters": len(normal), "operating_point": params["operating_point"],
                   "cluster_threshold": round(cluster_threshold, 4), "seconds": round(time.perf_counter() - started, 2),
                   "backend": ctx.backend, "model": model.meta["classifier"]}
        return Result(datasets, [OutputFile("findings.json", "application/json",
                                            json.dumps(findings, indent=1).encode())], summary)

    @staticmethod
    def _findings(found, scores, groups, prefix, isolated, threshold, spacing, source, findings, sr_findings):
        """Fill findings.json and the SR groups; return what to draw: (kind, id, x, y, radius px)."""
        marks = []
        in_cluster = set()
        uid = str(source.SOPInstanceUID)
        for cluster in groups:
            cluster_id = f"{prefix}C{cluster.id}"
            radius_px = cluster.radius_mm / spacing
            findings["clusters"].append({"id": cluster_id, "x": round(cluster.x, 1), "y": round(cluster.y, 1),
                                         "radius_mm": cluster.radius_mm, "n": cluster.n,
                                         "score": round(cluster.score, 4), "sop_instance_uid": uid})
            for k, member in enumerate(sorted(cluster.members, key=lambda m: -scores[m]), start=1):
                in_cluster.add(member)
                findings["calcifications"].append({"id": f"{cluster_id}.{k}", "x": round(float(found.x[member]), 1),
                                                   "y": round(float(found.y[member]), 1),
                                                   "score": round(float(scores[member]), 4), "cluster_id": cluster_id,
                                                   "sop_instance_uid": uid})
            sr_findings.append(Finding(cluster_id, CLUSTER, source, "CIRCLE",
                                       np.array([[cluster.x, cluster.y], [cluster.x + radius_px, cluster.y]]),
                                       [(NUMBER, cluster.n, COUNT_UNIT), (CERTAINTY, round(100 * cluster.score, 1),
                                                                          PERCENT)]))
            marks.append(("cluster", cluster_id, cluster.x, cluster.y, radius_px))
        if isolated:
            loose = [i for i in np.argsort(-scores) if scores[i] >= threshold and i not in in_cluster]
            for k, i in enumerate(loose, start=1):
                calc_id = f"{prefix}I{k}"
                x, y = float(found.x[i]), float(found.y[i])
                findings["calcifications"].append({"id": calc_id, "x": round(x, 1), "y": round(y, 1),
                                                   "score": round(float(scores[i]), 4), "cluster_id": None,
                                                   "sop_instance_uid": uid})
                radius_px = max(4.0, 0.6 / spacing)
                sr_findings.append(Finding(calc_id, INDIVIDUAL, source, "CIRCLE",
                                           np.array([[x, y], [x + radius_px, y]]),
                                           [(CERTAINTY, round(100 * float(scores[i]), 1), PERCENT)]))
                marks.append(("calcification", calc_id, x, y, radius_px))
        return marks


def _window(values, source: Dataset, monochrome1: bool, xp=np) -> np.ndarray:
    """The mammogram as 8-bit grey at its default window (or its breast's range), bright = dense
    (computed on `xp`: only the 8-bit image comes back)."""
    center, width = source.get("WindowCenter"), source.get("WindowWidth")
    if center is not None and width is not None:
        raw = xp.asarray(source.pixel_array, dtype=xp.float32)
        center = float(center[0] if hasattr(center, "__len__") and not isinstance(center, str) else center)
        width = float(width[0] if hasattr(width, "__len__") and not isinstance(width, str) else width)
        grey = xp.clip((raw - (center - width / 2)) / max(width, 1.0), 0, 1)
        if monochrome1:
            grey = 1 - grey
    else:
        inside = values[values > 0.02]
        low, high = (float(v) for v in xp.percentile(inside, xp.asarray([1, 99.5]))) if inside.size else (0.0, 1.0)
        grey = xp.clip((values - low) / max(high - low, 1e-6), 0, 1)
    return to_numpy((grey * 255).astype(xp.uint8))


def render(image: detect.Mammogram, source: Dataset, marks: list[tuple], xp=np) -> np.ndarray:
    """RGB: the mammogram with each finding circled, an arrow pointing at it and its id written."""
    from PIL import Image, ImageDraw, ImageFont

    grey = _window(image.values, source, image.monochrome1, xp)
    canvas = Image.fromarray(grey).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    rows, cols = grey.shape
    scale = max(rows, cols) / 1000                               # marks that stay readable on any size
    font = ImageFont.load_default(size=max(12, int(22 * scale)))
    line = max(2, int(2.5 * scale))
    for kind, mark_id, x, y, radius in marks:
        colour = (255, 220, 0) if kind == "cluster" else (0, 220, 255)
        r = max(radius, 6 * scale)
        draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=line)
        # an arrow from the side with more room, pointing at the circle
        direction = -1 if x > cols / 2 else 1
        tip = (x + direction * r * 0.75, y - r * 0.75)
        tail = (tip[0] + direction * 45 * scale, tip[1] - 45 * scale)
        draw.line([tail, tip], fill=colour, width=line)
        for angle in (np.pi / 7, -np.pi / 7):
            dx, dy = tail[0] - tip[0], tail[1] - tip[1]
            length = np.hypot(dx, dy)
            c, s = np.cos(angle), np.sin(angle)
            head = (tip[0] + (dx * c - dy * s) / length * 14 * scale, tip[1] + (dx * s + dy * c) / length * 14 * scale)
            draw.line([tip, head], fill=colour, width=line)
        draw.text((tail[0] + direction * 4 * scale, tail[1] - 12 * scale), mark_id, fill=colour, font=font,
                  anchor="lm" if direction > 0 else "rm", stroke_width=max(1, line // 2), stroke_fill=(0, 0, 0))
    count = sum(m[0] == "cluster" for m in marks)
    banner = (f"m3dicom mammo-cad: {count} cluster(s) - CAD marks, not a diagnosis" if count else
              f"m3dicom mammo-cad: {NO_CLUSTER} - CAD, not a diagnosis")
    draw.text((10 * scale, 10 * scale), banner, fill=(255, 255, 255), font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    return np.asarray(canvas)


def _view(source) -> str:
    """' R MLO': the image's laterality and view, to tell the CAD's series of a four-view study apart (OHIF lists
    them by description, cut after some 20 characters: the view comes first); '' when the image says neither."""
    side = source.get("ImageLaterality") or source.get("Laterality") or ""
    view = " ".join(str(v) for v in (side, source.get("ViewPosition") or "") if v)
    return f" {view}" if view else ""
