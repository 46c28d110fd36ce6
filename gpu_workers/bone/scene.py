"""What the clinician sees of a bone model: an X3D scene (X3DOM loads it) and a rendered key image."""
from __future__ import annotations

import numpy as np

from .mesh import Mesh
from .volume import Volume

BONE = "0.89 0.85 0.78"


def _numbers(array: np.ndarray, decimals: int) -> str:
    return " ".join(np.char.mod(f"%.{decimals}f", array.ravel()).tolist())


def _shape(mesh: Mesh) -> str:
    return (f'<Shape><Appearance><Material diffuseColor="{BONE}" specularColor="0.2 0.2 0.2" shininess="0.15"/>'
            f'</Appearance><IndexedTriangleSet solid="false" normalPerVertex="true" '
            f'index="{" ".join(map(str, mesh.faces.ravel().tolist()))}">'
            f'<Coordinate point="{_numbers(mesh.vertices, 2)}"/>'
            f'<Normal vector="{_numbers(mesh.normals, 3)}"/></IndexedTriangleSet></Shape>')


def x3d(levels: list[Mesh], title: str) -> bytes:
    """An X3D scene (XML encoding): the levels of detail (finest first), a viewpoint framing them
    from the front (patient anterior, head up), examine navigation. Coordinates to 0.01 mm."""
    low, high = levels[0].vertices.min(axis=0), levels[0].vertices.max(axis=0)
    centre = (low + high) / 2
    radius = float(np.linalg.norm(high - low) / 2) or 1.0
    distance = radius / np.sin(0.785398 / 2) * 1.05
    position = centre - np.array([0.0, distance, 0.0])   # LPS: anterior is -y; look towards +y, up +z
    switch_at = radius * 4
    shapes = "".join(_shape(mesh) for mesh in levels)
    ranges = " ".join(f"{switch_at * (i + 1):.0f}" for i in range(len(levels) - 1))
    body = (f'<LOD center="{_numbers(centre, 2)}" range="{ranges}">{shapes}</LOD>' if len(levels) > 1 else shapes)
    text = (f'<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<X3D profile="Interchange" version="3.3" xmlns:xsd="http://www.w3.org/2001/XMLSchema-instance">'
            f'<head><meta name="title" content="{title}"/><meta name="generator" content="m3dicom bone-model"/></head>'
            f'<Scene><NavigationInfo type=\'"EXAMINE" "ANY"\'/>'
            f'<Background skyColor="0.12 0.14 0.17"/>'
            f'<Viewpoint description="front" position="{_numbers(position, 2)}" orientation="1 0 0 1.5708" '
            f'centerOfRotation="{_numbers(centre, 2)}" fieldOfView="0.785398"/>'
            f'{body}</Scene></X3D>\n')
    return text.encode()


def key_image(volume: Volume, keep: np.ndarray, size: int = 512) -> np.ndarray:
    """A shaded front view (uint8 grey) of the kept bone (`keep`: a mask in the volume's axes): the
    first bone voxel along each line of sight from the patient's anterior, lit from the viewer;
    head up, patient left on the right."""
    from scipy import ndimage

    axes = volume.axes
    anterior_axis = int(np.argmax(np.abs(axes[:, 1])))      # the volume axis closest to patient y
    toward_posterior = axes[anterior_axis, 1] > 0
    mask = keep if toward_posterior else np.flip(keep, axis=anterior_axis)
    hit = mask.any(axis=anterior_axis)
    depth = np.argmax(mask, axis=anterior_axis).astype(np.float32) * volume.spacing[anterior_axis]
    others = [a for a in range(3) if a != anterior_axis]
    spacing = [volume.spacing[a] for a in others]
    step = min(spacing)
    depth = ndimage.zoom(depth, [s / step for s in spacing], order=1)
    hit = ndimage.zoom(hit.astype(np.float32), [s / step for s in spacing], order=1) > 0.5
    dzdu, dzdv = np.gradient(ndimage.gaussian_filter(depth, 0.7), step)
    shade = 1 / np.sqrt(1 + np.minimum(dzdu ** 2 + dzdv ** 2, 9.0))   # light from the viewer; depth jumps grey
    image = np.where(hit, 40 + 215 * shade, 0)
    # head up: patient z increasing upwards; patient left (+x) on the image's right
    vertical = max(others, key=lambda a: abs(axes[a, 2]))
    if vertical != others[0]:
        image = image.T
        others = others[::-1]
    if axes[others[0], 2] > 0:
        image = image[::-1]
    if axes[others[1], 0] < 0:
        image = image[:, ::-1]
    scale = size / max(image.shape)
    return np.clip(ndimage.zoom(image, scale, order=1), 0, 255).astype(np.uint8)
