"""A CT (or CBCT) series as a volume in patient space: ordered, rescaled, with its true geometry.

Slices are ordered by Image Position along the slice normal (the cross product of the
Image Orientation's row and column directions); the slice spacing comes from those
positions, not from Slice Thickness; Rescale Slope / Intercept are applied per slice.
Multi-frame Enhanced CT (and Legacy Converted Enhanced CT) read their per-frame and shared
functional groups. Geometry that cannot make one regular volume (a single slice, two
slices at one position, a tilted gantry, uneven spacing, mixed sizes or orientations) is a
clear PluginError, never a distorted model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from gpu_workers.plugin import PluginError

ENHANCED_CT = {"1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}
MIN_SLICES = 8
TOLERANCE_MM = 0.05


@dataclass
class Volume:
    values: np.ndarray          # (slices, rows, columns), rescaled (HU when calibrated), float32
    spacing: tuple[float, float, float]   # mm: between slices, between rows, between columns
    origin: np.ndarray          # patient position (mm) of the first voxel's centre
    axes: np.ndarray            # (3, 3): patient directions of increasing slice, row and column index
    frame_of_reference: str | None
    calibrated: bool            # values are Hounsfield units (air near -1000)

    def to_patient(self, points_mm: np.ndarray) -> np.ndarray:
        """(n, 3) offsets in mm along (slice, row, column) -> patient coordinates (mm)."""
        return self.origin + np.asarray(points_mm, dtype=np.float64) @ self.axes


def _orientation(value) -> tuple[np.ndarray, np.ndarray]:
    cosines = np.array([float(v) for v in value], dtype=np.float64)
    if cosines.shape != (6,):
        raise PluginError("Image Orientation (Patient) must have six values")
    row, col = cosines[:3], cosines[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise PluginError("Image Orientation (Patient) is not two orthogonal unit vectors")
    return row, col


def _rescaled(pixels: np.ndarray, slope, intercept) -> np.ndarray:
    return pixels.astype(np.float32) * np.float32(float(slope or 1)) + np.float32(float(intercept or 0))


def _stack(planes: list[tuple[np.ndarray, object]], row: np.ndarray, col: np.ndarray, pixel_spacing,
           frame: str | None) -> Volume:
    """planes: (image position, a function giving the rescaled pixels); one orientation and pixel
    spacing for all. The geometry is checked before any pixels are decoded; then each slice is
    decoded straight into its place in the volume (one copy of the data in memory)."""
    if len(planes) < MIN_SLICES:
        raise PluginError(f"{len(planes)} slice(s): a volume needs at least {MIN_SLICES} (a single image "
                          "cannot make a 3D model)")
    shapes = {shape for _, (shape, _) in planes}
    if len(shapes) != 1:
        raise PluginError(f"the slices have different sizes: {sorted(shapes)}")
    normal = np.cross(row, col)
    positions = np.array([position for position, _ in planes])
    depth = positions @ normal
    order = np.argsort(depth)
    depth, positions = depth[order], positions[order]
    steps = np.diff(depth)
    if np.any(steps < TOLERANCE_MM):
        raise PluginError("two slices share one position along the slice normal (duplicated slices)")
    if steps.max() - steps.min() > max(TOLERANCE_MM * 4, 0.05 * np.median(steps)):
        raise PluginError(f"uneven slice spacing ({steps.min():.2f}-{steps.max():.2f} mm): missing or extra slices")
    sideways = np.diff(positions, axis=0) - np.outer(steps, normal)
    if np.abs(sideways).max() > max(0.5, 0.05 * np.median(steps)):
        raise PluginError("the slices are shifted sideways along the stack (gantry tilt or a sheared series): "
                          "resample it to an orthogonal volume first")
    values = np.empty((len(planes), *shapes.pop()), dtype=np.float32)
    for k, i in enumerate(order):
        values[k] = planes[i][1][1]()
    row_spacing, col_spacing = float(pixel_spacing[0]), float(pixel_spacing[1])
    if row_spacing <= 0 or col_spacing <= 0:
        raise PluginError("Pixel Spacing must be positive")
    sample = values[:: max(1, len(values) // 16), ::4, ::4]
    calibrated = float(np.percentile(sample, 1)) < -850
    return Volume(values, (float(np.median(steps)), row_spacing, col_spacing), positions[0],
                  np.vstack([normal, col, row]), frame, calibrated)


def load(datasets: list[Dataset]) -> Volume:
    """The volume of one series (single-frame slices, or one multi-frame Enhanced CT)."""
    if not datasets:
        raise PluginError("no images in the series")
    if len(datasets) == 1 and str(datasets[0].SOPClassUID) in ENHANCED_CT:
        return _enhanced(datasets[0])
    modalities = {str(ds.get("Modality", "")) for ds in datasets}
    if modalities - {"CT"}:
        raise PluginError(f"not a CT series (modality {', '.join(sorted(modalities))})")
    orientations = {tuple(round(float(v), 4) for v in ds.get("ImageOrientationPatient", [])) for ds in datasets}
    spacings = {tuple(round(float(v), 4) for v in ds.get("PixelSpacing", [])) for ds in datasets}
    if len(orientations) != 1 or () in orientations:
        raise PluginError("the slices have no single Image Orientation (Patient)")
    if len(spacings) != 1 or () in spacings:
        raise PluginError("the slices have no single Pixel Spacing")
    row, col = _orientation(datasets[0].ImageOrientationPatient)   # the sets above are rounded: use the values
    planes = []
    for ds in datasets:
        if "ImagePositionPatient" not in ds:
            raise PluginError("a slice has no Image Position (Patient)")
        planes.append((np.array([float(v) for v in ds.ImagePositionPatient]),
                       ((int(ds.Rows), int(ds.Columns)),
                        lambda ds=ds: _rescaled(ds.pixel_array, ds.get("RescaleSlope"), ds.get("RescaleIntercept")))))
    frames = {ds.get("FrameOfReferenceUID") for ds in datasets}
    return _stack(planes, row, col, datasets[0].PixelSpacing, frames.pop() if len(frames) == 1 else None)


def _group(ds: Dataset, frame: int, sequence: str, attribute: str):
    """An attribute from a frame's functional group, else the shared one."""
    for groups in (ds.get("PerFrameFunctionalGroupsSequence", [None] * (frame + 1))[frame:frame + 1],
                   ds.get("SharedFunctionalGroupsSequence", [])):
        for group in groups or []:
            if group is not None and sequence in group and attribute in group.get(sequence)[0]:
                return group.get(sequence)[0].get(attribute)
    return None


def _enhanced(ds: Dataset) -> Volume:
    frames = int(ds.get("NumberOfFrames", 1))
    pixels = ds.pixel_array.reshape(frames, ds.Rows, ds.Columns)
    orientation = _group(ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient")
    spacing = _group(ds, 0, "PixelMeasuresSequence", "PixelSpacing")
    if orientation is None or spacing is None:
        raise PluginError("the multi-frame CT has no plane orientation or pixel measures")
    row, col = _orientation(orientation)
    planes = []
    for i in range(frames):
        position = _group(ds, i, "PlanePositionSequence", "ImagePositionPatient")
        if position is None:
            raise PluginError(f"frame {i + 1} has no plane position")
        planes.append((np.array([float(v) for v in position]),
                       ((int(ds.Rows), int(ds.Columns)),
                        lambda i=i: _rescaled(pixels[i], _group(ds, i, "PixelValueTransformationSequence", "RescaleSlope"),
                                              _group(ds, i, "PixelValueTransformationSequence", "RescaleIntercept")))))
    return _stack(planes, row, col, spacing, ds.get("FrameOfReferenceUID"))
