"""Images rendered on the server at the size and region the browser shows, cached.

An instance is read through the archive's one read path (decrypted, authenticated, its
SHA-256 checked), decoded once (Modality LUT applied, MONOCHROME1 inverted, colour kept)
and kept in a memory-bounded cache; each rendered view (frame, region, size, window) is
kept too, so panning and zooming back is instant. Nothing here knows HTTP.
"""
from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image

from archive import Archive
from archive.dicomfile import PixelsTooLarge, read_dataset

IMAGE_LIMIT = 4096           # pixels each way a request may ask for (the page asks for at most this)
STORAGE_CLASSES_3D = {"1.2.840.10008.5.1.4.1.1.104.3": "model/stl"}


class NotAnImage(ValueError):
    """The instance has no pixel data the viewer can show (an SR, an encapsulated model, ...)."""


class TooLargeToShow(NotAnImage):
    """Decoding the pixel data would allocate more than `ingest.max_pixel_bytes`."""


class _Cache:
    """A thread-safe least-recently-used map bounded by the bytes of what it holds."""

    def __init__(self, limit: int):
        self.limit, self.size = limit, 0
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
        return None

    def put(self, key, value, size: int) -> None:
        with self._lock:
            if key in self._items:
                self.size -= self._items.pop(key)[1]
            self._items[key] = (value, size)
            self.size += size
            while self.size > self.limit and len(self._items) > 1:
                _, (_, dropped) = self._items.popitem(last=False)
                self.size -= dropped


@dataclass
class Decoded:
    pixels: np.ndarray           # (frames, rows, columns) float32, or (frames, rows, columns, 3) uint8
    info: dict                   # rows, columns, frames, window, photometric, spacing


# ViewCodeSequence (CID 4014) for a mammogram without View Position
VIEW_CODES = {"399162004": "CC", "399368009": "MLO", "399260004": "ML", "399352003": "LM", "399099002": "XCCL",
              "399192003": "FB", "399101009": "SIO"}


def _first_code(ds, keyword: str) -> str:
    sequence = ds.get(keyword)
    try:
        return str(sequence[0].get("CodeValue", "")) if sequence else ""
    except (TypeError, IndexError, AttributeError):
        return ""


def _window_default(ds, pixels: np.ndarray) -> tuple[float, float]:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        first = (lambda v: float(v[0]) if isinstance(v, pydicom.multival.MultiValue) else float(v))
        return first(center), max(1.0, first(width))
    sample = pixels[:, ::4, ::4] if pixels.ndim == 3 else pixels
    low, high = np.percentile(sample, [0.5, 99.5])
    return float((low + high) / 2), float(max(1.0, high - low))


class Images:
    def __init__(self, archive: Archive, cache_mb: int = 512):
        self.archive = archive
        self.decoded = _Cache(int(cache_mb * 0.8) << 20)
        self.rendered = _Cache(int(cache_mb * 0.2) << 20)
        self.headers = _Cache(4 << 20)                   # facts(): about 8000 images
        self._decoding: dict[str, threading.Lock] = {}   # one decode per instance, however many ask at once
        self._decoding_lock = threading.Lock()

    def _row(self, sop_instance_uid: str):
        rows = self.archive.index.query("SELECT blob_id, sha256, sop_class_uid FROM instances WHERE sop_instance_uid=?",
                                        (sop_instance_uid,))
        if not rows:
            raise KeyError(sop_instance_uid)
        return rows[0]

    def exported(self, sop_instance_uid: str):
        """The stored Part 10 file, decrypted and verified (a context manager giving its path)."""
        row = self._row(sop_instance_uid)
        return self.archive.exported(row["blob_id"], row["sha256"])

    def dataset(self, sop_instance_uid: str, pixels: bool = False) -> pydicom.Dataset:
        """The stored data set; read within the archive's limits (a stored deflate bomb or a data set
        nested too deep raises `archive.InvalidInstance` before pydicom inflates or walks it)."""
        with self.exported(sop_instance_uid) as path:
            return read_dataset(path, self.archive.limits, pixels=pixels)

    def facts(self, sop_instance_uid: str) -> dict:
        """What the study page needs to name and hang an image (laterality, view, orientation), from
        its header only; kept (a few hundred bytes each) so a study page reads each header once."""
        found = self.headers.get(sop_instance_uid)
        if found is None:
            ds = self.dataset(sop_instance_uid)
            view = ds.get("ViewPosition") or ""
            if not view and _first_code(ds, "ViewCodeSequence"):
                view = VIEW_CODES.get(_first_code(ds, "ViewCodeSequence"), "")
            found = {"laterality": str(ds.get("ImageLaterality") or ds.get("Laterality") or "").upper(),
                     "view": str(view).upper(), "orientation": [str(v) for v in ds.get("PatientOrientation") or []][:2],
                     "body_part": str(ds.get("BodyPartExamined") or "")}
            self.headers.put(sop_instance_uid, found, 512)
        return found

    def decode(self, sop_instance_uid: str) -> Decoded:
        found = self.decoded.get(sop_instance_uid)
        if found is not None:
            return found
        with self._decoding_lock:
            lock = self._decoding.setdefault(sop_instance_uid, threading.Lock())
        try:
            with lock:                               # a page asks for the thumbnail and the view together
                found = self.decoded.get(sop_instance_uid)
                return found if found is not None else self._decode(sop_instance_uid)
        finally:
            with self._decoding_lock:
                if not lock.locked():
                    self._decoding.pop(sop_instance_uid, None)

    def _decode(self, sop_instance_uid: str) -> Decoded:
        try:                                     # the declared pixel size is checked before any decoder runs
            ds = self.dataset(sop_instance_uid, pixels=True)
        except PixelsTooLarge as exc:
            raise TooLargeToShow(f"the image is not shown: {exc}") from None
        if "PixelData" not in ds and "FloatPixelData" not in ds:
            raise NotAnImage(f"{ds.SOPClassUID.name if hasattr(ds.SOPClassUID, 'name') else ds.SOPClassUID} "
                             "has no image")
        raw = ds.pixel_array
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        colour = int(ds.get("SamplesPerPixel", 1)) == 3
        if colour:
            if photometric.startswith("YBR"):
                from pydicom.pixels import convert_color_space
                raw = convert_color_space(raw, photometric, "RGB")
            pixels = np.asarray(raw, dtype=np.uint8).reshape(frames, ds.Rows, ds.Columns, 3)
            window = (127.5, 255.0)
        else:
            pixels = raw.reshape(frames, ds.Rows, ds.Columns).astype(np.float32)
            slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
            if slope != 1 or intercept != 0:
                pixels = pixels * np.float32(slope) + np.float32(intercept)
            window = _window_default(ds, pixels)
        spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
        info = {"rows": int(ds.Rows), "columns": int(ds.Columns), "frames": frames, "colour": colour,
                "window_center": window[0], "window_width": window[1], "photometric": photometric,
                "invert": photometric == "MONOCHROME1",
                "pixel_spacing": [float(v) for v in spacing] if spacing else None,
                "modality": str(ds.get("Modality", "")), "sop_class_uid": str(ds.SOPClassUID)}
        decoded = Decoded(pixels, info)
        self.decoded.put(sop_instance_uid, decoded, pixels.nbytes)
        return decoded

    def render(self, sop_instance_uid: str, *, frame: int = 0, region: tuple[int, int, int, int] | None = None,
               size: tuple[int, int] | None = None, window: tuple[float, float] | None = None,
               fmt: str = "png") -> bytes:
        """The image (or `region` x, y, width, height of it, in source pixels) at `size`, windowed."""
        decoded = self.decode(sop_instance_uid)
        info = decoded.info
        if not 0 <= frame < info["frames"]:
            raise ValueError(f"frame {frame} is not in 0-{info['frames'] - 1}")
        x, y, w, h = region or (0, 0, info["columns"], info["rows"])
        x, y = max(0, int(x)), max(0, int(y))
        w, h = min(int(w), info["columns"] - x), min(int(h), info["rows"] - y)
        if w <= 0 or h <= 0:
            raise ValueError("the region is outside the image")
        out_w, out_h = size or (w, h)
        if out_w is None and out_h is None:
            out_w, out_h = w, h
        elif out_h is None:                       # keep the aspect
            out_h = max(1, round(h * out_w / w))
        elif out_w is None:
            out_w = max(1, round(w * out_h / h))
        if not (1 <= out_w <= IMAGE_LIMIT and 1 <= out_h <= IMAGE_LIMIT):
            raise ValueError(f"image size must be 1-{IMAGE_LIMIT} pixels each way")
        center, width = window or (info["window_center"], info["window_width"])
        key = (sop_instance_uid, frame, x, y, w, h, out_w, out_h, round(center, 3), round(width, 3), fmt)
        cached = self.rendered.get(key)
        if cached is not None:
            return cached
        part = decoded.pixels[frame, y:y + h, x:x + w]
        if info["colour"]:
            image = Image.fromarray(np.ascontiguousarray(part), "RGB")
        else:
            grey = (part - (center - width / 2)) * (255.0 / max(width, 1e-6))
            grey = np.clip(grey, 0, 255).astype(np.uint8)
            if info["invert"]:
                grey = 255 - grey
            image = Image.fromarray(grey, "L")
        if (out_w, out_h) != (w, h):
            shrinking = out_w < w
            image = image.resize((out_w, out_h), Image.Resampling.BOX if shrinking else Image.Resampling.NEAREST
                                 if out_w >= 4 * w else Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        if fmt == "jpeg":
            image.save(buffer, "JPEG", quality=90)
        else:
            image.save(buffer, "PNG", compress_level=1)
        data = buffer.getvalue()
        self.rendered.put(key, data, len(data))
        return data
