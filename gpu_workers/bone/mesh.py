"""Bone segmentation and its surface: threshold, clean-up, largest parts, marching cubes, decimation.

Segmentation: a threshold in HU (default 300), or for a CBCT whose values are not HU an
automatic one (Otsu, or the histogram valley) unless the user sets one; light Gaussian
smoothing first; the largest connected components are kept (the table, the head rest and
specks fall away). Surface: marching cubes (scikit-image) on the smoothed
values at the threshold, only around the kept parts and padded so the surface is closed;
then quadric decimation to a triangle budget (fast-simplification, through trimesh), a
25k level for phones, light Taubin smoothing, vertex normals; vertices in patient mm.
The volume work runs on `xp` (CuPy on a GPU); the mesh work on the CPU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from gpu_workers.backend import to_numpy
from gpu_workers.plugin import PluginError

from .volume import Volume

MODES = ("auto", "hu", "otsu", "valley")


def ndimage_of(xp):
    if xp.__name__ == "cupy":
        import cupyx.scipy.ndimage as ndi
        return ndi
    from scipy import ndimage as ndi
    return ndi


@dataclass
class Segmentation:
    field: np.ndarray                 # smoothed values, outside the kept parts pushed below the threshold
    threshold: float
    mode: str                         # how the threshold was chosen
    parts: int                        # connected components kept
    crop: tuple[slice, slice, slice]  # of the volume, around the kept parts
    timings: dict = field(default_factory=dict)


def choose_threshold(volume: Volume, threshold: float, mode: str) -> tuple[float, str]:
    if mode not in MODES:
        raise PluginError(f"threshold mode {mode!r}: one of {', '.join(MODES)}")
    if mode == "hu" or (mode == "auto" and volume.calibrated):
        if not volume.calibrated and mode == "hu":
            raise PluginError("the values are not Hounsfield units (no air near -1000): use threshold mode "
                              "otsu or valley, or calibrate")
        return float(threshold), "hu"
    from skimage.filters import threshold_minimum, threshold_otsu

    sample = volume.values[:: max(1, len(volume.values) // 64), ::2, ::2].ravel()
    if mode == "valley":
        try:
            return float(threshold_minimum(sample)), "valley"
        except RuntimeError:
            raise PluginError("the histogram has no valley between tissue and bone: use otsu or a threshold") from None
    # Otsu twice: background vs body, then within the body, soft tissue vs bone
    body = sample[sample > threshold_otsu(sample)]
    return float(threshold_otsu(body)), "otsu"


def segment(volume: Volume, xp, *, threshold: float = 300.0, mode: str = "auto", smoothing_mm: float = 0.5,
            keep_fraction: float = 0.1, max_parts: int = 8) -> Segmentation:
    ndi = ndimage_of(xp)
    timings = {}
    started = time.perf_counter()
    level, how = choose_threshold(volume, threshold, mode)
    values = xp.asarray(volume.values)
    if smoothing_mm > 0:
        values = _smooth(values, [smoothing_mm / s for s in volume.spacing], xp)
    _sync(xp)
    timings["smooth"] = time.perf_counter() - started
    started = time.perf_counter()
    mask = values > level
    labels, count = ndi.label(mask)
    if count == 0:
        raise PluginError(f"nothing above the threshold ({level:.0f}{' HU' if how == 'hu' else ''}): no bone found")
    # sizes only need comparing: every second voxel each way is enough (and 8 times cheaper)
    sizes = to_numpy(xp.bincount(labels[::2, ::2, ::2].ravel(), minlength=count + 1))[1:] * 8
    ranked = np.argsort(-sizes)[:max_parts]
    kept = [int(i) + 1 for i in ranked if sizes[i] >= max(1, keep_fraction * sizes[ranked[0]])]
    keep = xp.isin(labels, xp.asarray(kept))
    _sync(xp)
    timings["segment"] = time.perf_counter() - started
    started = time.perf_counter()
    where = [to_numpy(xp.nonzero(keep.any(axis=tuple(a for a in range(3) if a != axis)))[0]) for axis in range(3)]
    crop = tuple(slice(max(0, int(w[0]) - 2), int(w[-1]) + 3) for w in where)
    # the surface sees the kept parts and everything below the threshold, never the other parts
    other = mask[crop] & ~keep[crop]
    del labels, mask
    lowest = float(level) - 1000.0
    cropped = xp.where(other, xp.float32(lowest), values[crop]).astype(xp.float32)
    del other, values
    padded = xp.pad(cropped, 1, mode="constant", constant_values=lowest)   # closed surfaces at the edges
    timings["prepare"] = time.perf_counter() - started
    return Segmentation(to_numpy(padded), level, how, len(kept), crop, timings)


def _sync(xp) -> None:
    """Wait for the GPU's queued work (CuPy runs asynchronously), so that each stage's time is its own."""
    if xp.__name__ == "cupy":
        xp.cuda.get_current_stream().synchronize()


def _smooth(values, sigma: list[float], xp):
    """A 3-D Gaussian blur; with NumPy each axis's pass split in two halves for two threads."""
    ndi = ndimage_of(xp)
    if xp.__name__ != "numpy":
        return ndi.gaussian_filter(values, sigma, truncate=3.0)
    from concurrent.futures import ThreadPoolExecutor

    out = values.astype(np.float32, copy=True)
    with ThreadPoolExecutor(2) as pool:
        for axis, s in enumerate(sigma):
            split = 1 if axis == 0 else 0                 # cut across an axis the pass does not run along
            half = out.shape[split] // 2
            parts = [tuple(slice(None) if a != split else part for a in range(3))
                     for part in (slice(0, half), slice(half, None))]

            def run(index, axis=axis, s=s):
                out[index] = ndi.gaussian_filter1d(out[index], s, axis=axis, truncate=3.0)
            list(pool.map(run, parts))
    return out


@dataclass
class Mesh:
    vertices: np.ndarray              # (n, 3) patient mm
    faces: np.ndarray                 # (m, 3) int
    normals: np.ndarray               # (n, 3) unit vertex normals

    @property
    def trimesh(self):
        import trimesh
        return trimesh.Trimesh(self.vertices, self.faces, vertex_normals=self.normals, process=False)


def surface(volume: Volume, seg: Segmentation, *, resolution_mm: float = 1.0, step: int | None = None
            ) -> tuple[Mesh, dict]:
    """The surface (in patient mm) of the kept parts, marching cubes every `step` voxels: by default
    as many as make about `resolution_mm` (a triangle budget of 100k on a skull means ~2 mm
    triangles: sampling finer only makes decimation slower)."""
    from skimage.measure import marching_cubes

    timings = {}
    started = time.perf_counter()
    if step is None:
        step = max(1, int(round(resolution_mm / min(volume.spacing)))) if resolution_mm > 0 else 1
    verts, faces, _, _ = marching_cubes(seg.field, level=seg.threshold, spacing=volume.spacing, step_size=step,
                                        allow_degenerate=False)
    timings["marching_cubes"] = time.perf_counter() - started
    offset = np.array([(c.start - 1) * s for c, s in zip(seg.crop, volume.spacing)])   # the crop and the padding
    vertices = volume.to_patient(verts + offset)   # winding is made consistent and outward by `simplify`
    return Mesh(vertices, faces.astype(np.int64), np.zeros_like(vertices)), {**timings, "step": step}


SPECK = 0.002      # bodies with less than this share of the surface are specks (noise, tiny cavities)


def simplify(mesh: Mesh, triangles: int, smooth: bool = True) -> Mesh:
    """Quadric decimation to about `triangles`, light Taubin smoothing, a closed and consistently
    outward surface per body (MeshFix mends what decimation breaks where thin bone brings two
    surfaces together), vertex normals. Specks (under SPECK of the surface) are dropped."""
    import fast_simplification
    import trimesh

    vertices, faces = mesh.vertices, mesh.faces
    if len(faces) > triangles:
        vertices, faces = fast_simplification.simplify(vertices.astype(np.float32), faces.astype(np.int32),
                                                       target_count=triangles, agg=9)   # faster, area within 0.1%
    tm = trimesh.Trimesh(vertices.astype(np.float64), faces, process=True, validate=False)
    if smooth:
        trimesh.smoothing.filter_taubin(tm, lamb=0.5, nu=-0.53, iterations=6)
    bodies = [b for b in tm.split(only_watertight=False) if len(b.faces) >= max(4, SPECK * len(tm.faces))]
    if not bodies:
        raise PluginError("the surface fell apart into specks: lower the threshold or raise the triangle budget")
    parts = [_closed(body) for body in bodies]
    tm = _closed(trimesh.util.concatenate(parts)) if len(parts) > 1 else parts[0]   # bodies may touch once joined
    return Mesh(np.asarray(tm.vertices), np.asarray(tm.faces, dtype=np.int64), np.asarray(tm.vertex_normals))


def _closed(body):
    """The body as a closed, consistently wound surface facing outward, at float32 precision (an
    STL reader joins vertices by their float32 coordinates: nearly coincident ones must already be one)."""
    import trimesh

    for attempt in range(4):
        body = trimesh.Trimesh(np.asarray(body.vertices, dtype=np.float32).astype(np.float64), body.faces,
                               process=True)
        body.update_faces(body.nondegenerate_faces())
        body.remove_unreferenced_vertices()
        if body.is_watertight or attempt == 3:      # the last pass only rounds what the third repaired
            break
        mended = _mend_locally(body)
        if mended is not None:
            body = mended
            continue
        import pymeshfix

        fixer = pymeshfix.MeshFix(np.asarray(body.vertices, dtype=np.float64), np.asarray(body.faces, dtype=np.int32))
        fixer.repair(joincomp=False, remove_smallest_components=False)
        body = trimesh.Trimesh(fixer.points, fixer.faces, process=True)
    trimesh.repair.fix_normals(body, multibody=True)
    return body


MEND_SHARE = 0.01   # mend locally while the triangles to cut out are at most this share of the surface


def _mend_locally(body, rounds: int = 4):
    """Where decimation brought two surfaces together (edges of more than two triangles: a few
    dozen in a skull), cut out the triangles around those edges and close each hole with a fan
    around its centre, wound like its rim; again where two holes touched at a vertex (their fans
    then share an edge too). Milliseconds, where MeshFix's whole repair takes seconds (MeshFix
    stays the fall-back). None when that does not give a closed, consistently wound surface."""
    import trimesh
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    vertices, faces = np.asarray(body.vertices, dtype=np.float64), np.asarray(body.faces, dtype=np.int64)
    budget, first = MEND_SHARE * len(faces), True
    for _ in range(rounds):
        n = len(vertices)
        edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
        unique, counts = np.unique(edges[:, 0] * n + edges[:, 1], return_counts=True)
        bad = unique[counts > 2]
        if not len(bad):
            break
        if first and (counts == 1).any():
            return None                        # open before any cut (a hole): MeshFix's business
        first = False
        cut = np.isin(faces, np.concatenate([bad // n, bad % n])).any(axis=1)
        budget -= cut.sum()
        if budget < 0:
            return None                    # not a few local defects
        faces = faces[~cut]
        directed = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
        rim = directed[~np.isin(directed[:, 0] * n + directed[:, 1], directed[:, 1] * n + directed[:, 0])]
        if not len(rim):
            continue
        graph = coo_matrix((np.ones(len(rim)), (rim[:, 0], rim[:, 1])), shape=(n, n))
        _, component = connected_components(graph, directed=False)
        _, hole = np.unique(component[rim[:, 0]], return_inverse=True)
        centres = np.zeros((hole.max() + 1, 3))
        np.add.at(centres, hole, vertices[rim[:, 0]])
        centres /= np.bincount(hole)[:, None]
        # each rim edge reversed, to the hole's centre (where two sheets met, the fan bridges them: the surface
        # is closed and consistently wound, not free of folds; the skull's volume is within 0.1% of MeshFix's)
        faces = np.vstack([faces, np.column_stack([rim[:, 1], rim[:, 0], n + hole])])
        vertices = np.vstack([vertices, centres])
    else:
        return None
    if len(faces) == len(body.faces) and np.array_equal(faces, body.faces):
        return None                        # nothing joined: open (holes) or otherwise broken, MeshFix's business
    mended = trimesh.Trimesh(vertices, faces, process=True)
    mended.remove_unreferenced_vertices()
    return mended if mended.is_watertight and mended.is_winding_consistent else None
