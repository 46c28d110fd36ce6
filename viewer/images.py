"""Images rendered on the server at the size and region the browser shows, cached, in bounded memory.

An instance is read through the archive's one read path (decrypted, authenticated, its
SHA-256 checked) and its header read first, without its pixel data or any other large value
(a deflated data set is inflated a MiB at a time into a file next to the export, never whole
in memory). Its pixels are decoded once, into one array of their own type (no float copy;
YBR comes as RGB): the Modality LUT and the window are applied while rendering, a band of rows
at a time, and a region larger than 4096 x 4096 is averaged down by blocks band by band before
it is resized, so a thumbnail of a large image holds little more than the image itself.

Memory (docs/security.md states it): decoded images are kept in a cache of at most 80 % of
`viewer.image_cache_mb` (an image larger than that is not kept), rendered pictures in the
other 20 %; every decode and render in flight first reserves what it may hold from
`viewer.decode_memory_mb` (`MemoryBudget`): a decode twice the decoded size (the decoder's
output and the array it becomes) plus twice the compressed pixel data, a render its bands, a
region and its picture (`Images.prepare`). One that does not fit waits its turn (at most
DECODE_WAIT seconds, then `Busy`); one that could never fit is not shown (`TooLargeToShow`).
Nothing here knows HTTP.
"""
from __future__ import annotations

import asyncio
import io
import struct
import threading
import weakref
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.pixels import pixel_array

from archive import Archive, facts
from archive.dicomfile import PixelsTooLarge, check_pixels, undeflated

IMAGE_LIMIT = 4096           # pixels each way a request may ask for (the page asks for at most this)
STORAGE_CLASSES_3D = {"1.2.840.10008.5.1.4.1.1.104.3": "model/stl"}
LARGE_VALUE = 1 << 20        # values larger than this stay on disk when a header or a report is read
BAND_BYTES = 8 << 20         # float32 source pixels windowed (and averaged down) at a time
DECODE_FACTOR = 2            # a decode holds the decoder's output and the array it is copied into
PICTURE_COPIES = 12          # a render holds its picture about this many times (blocks of at most 4 times
                             # its size, as an image, the picture resized, its PNG)
WHOLE_REGION = 4096 * 4096   # a region of at most this many pixels is windowed whole, then resized
SAMPLE_PIXELS = 1 << 20      # pixels sampled for the default window
DECODE_WAIT = 30.0           # seconds a decode or render waits for memory before `Busy`
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class NotAnImage(ValueError):
    """The instance has no pixel data the viewer can show (an SR, an encapsulated model, ...)."""


class TooLargeToShow(NotAnImage):
    """Decoding the pixel data would allocate more than `ingest.max_pixel_bytes`, or more than
    the viewer's whole `viewer.decode_memory_mb`."""


class Busy(RuntimeError):
    """The memory for decoding is taken by other images for longer than DECODE_WAIT seconds."""


class _Cache:
    """A thread-safe least-recently-used map bounded by the bytes of what it holds; an item
    larger than the whole bound is not kept (it would push everything else out and still not fit)."""

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

    def put(self, key, value, size: int) -> bool:
        """Whether `value` is kept."""
        with self._lock:
            if key in self._items:
                self.size -= self._items.pop(key)[1]
            if size > self.limit:
                return False
            self._items[key] = (value, size)
            self.size += size
            while self.size > self.limit:
                _, (_, dropped) = self._items.popitem(last=False)
                self.size -= dropped
            return True


class MemoryBudget:
    """Bytes that the decodes and renders in flight may hold together (on the event loop: a
    request waiting for its turn holds no thread)."""

    def __init__(self, total: int, wait: float = DECODE_WAIT):
        self.total, self.wait, self.used = total, wait, 0
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, need: int):
        if need > self.total:
            raise TooLargeToShow(f"the image is not shown: it needs {_mib(need)} to decode and show, more than "
                                 f"the viewer's {_mib(self.total)} (viewer.decode_memory_mb)")
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.used + need <= self.total), self.wait)
                self.used += need
        except asyncio.TimeoutError:
            raise Busy("the viewer is busy decoding other large images: try again in a moment") from None
        try:
            yield
        finally:
            async with self._changed:
                self.used -= need
                self._changed.notify_all()


def _mib(count: int) -> str:
    return f"{count / (1 << 20):,.0f} MiB"


@dataclass(frozen=True)
class Header:
    """What the pages need of an instance, read without its pixel data (a few hundred bytes)."""
    sop_class_uid: str
    modality: str
    facts: dict                 # laterality, view, orientation, body part (Images.facts)
    image: bool                 # it has pixel data
    why: str                    # why it is not shown, when it is not ("" otherwise)
    pixel_bytes: int            # its decoded size as declared (Rows x Columns x Frames x Samples x bytes)
    samples: int
    compressed_bytes: int       # bytes of encapsulated pixel data read to decode it (0: native)


@dataclass
class Decoded:
    pixels: np.ndarray           # (frames, rows, columns) as stored, or (frames, rows, columns, 3) uint8
    info: dict                   # rows, columns, frames, window, photometric, spacing
    slope: float = 1.0           # the Modality LUT, applied while rendering
    intercept: float = 0.0


# ViewCodeSequence (CID 4014) for a mammogram without View Position
VIEW_CODES = {"399162004": "CC", "399368009": "MLO", "399260004": "ML", "399352003": "LM", "399099002": "XCCL",
              "399192003": "FB", "399101009": "SIO"}


def _first_code(ds, keyword: str) -> str:
    sequence = ds.get(keyword)
    try:
        return str(sequence[0].get("CodeValue", "")) if sequence else ""
    except (TypeError, IndexError, AttributeError):
        return ""


def _facts(ds) -> dict:
    view = ds.get("ViewPosition") or ""
    if not view and _first_code(ds, "ViewCodeSequence"):
        view = VIEW_CODES.get(_first_code(ds, "ViewCodeSequence"), "")
    return {"laterality": str(ds.get("ImageLaterality") or ds.get("Laterality") or "").upper(),
            "view": str(view).upper(), "orientation": [str(v) for v in ds.get("PatientOrientation") or []][:2],
            "body_part": str(ds.get("BodyPartExamined") or "")}


def _declared(ds) -> tuple[int, int]:
    """(decoded bytes, samples per pixel) the pixel data declares (PixelsTooLarge for no Rows or Columns)."""
    def number(keyword, default):
        try:
            return int(ds.get(keyword, default) or default)
        except (TypeError, ValueError):
            return default
    rows, columns = number("Rows", 0), number("Columns", 0)
    if rows <= 0 or columns <= 0:
        raise PixelsTooLarge("the pixel data has no valid Rows and Columns")
    frames, samples, bits = max(number("NumberOfFrames", 1), 1), max(number("SamplesPerPixel", 1), 1), \
        max(number("BitsAllocated", 8), 1)
    return rows * columns * frames * samples * ((bits + 7) // 8), samples


def _read(plain: Path) -> tuple[pydicom.Dataset, int | None]:
    """The data set up to its pixel data, without any value over LARGE_VALUE bytes (they would be
    read from a file that is gone by the time anyone asks), and how many bytes of the file its
    pixel data takes (None: it has none). Encapsulated pixel data (undefined length) is not read."""
    size = plain.stat().st_size
    with open(plain, "rb") as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=True, defer_size=LARGE_VALUE)
        position = fh.tell()                      # pydicom stops at the pixel data's tag
        head = fh.read(4)
    order = "<" if ds.file_meta.TransferSyntaxUID.is_little_endian else ">"
    pixels = None
    if len(head) == 4:
        group, element = struct.unpack(order + "HH", head)
        if group == 0x7FE0 and element in (0x0008, 0x0009, 0x0010):
            pixels = size - position
    for tag in list(ds.keys()):
        value = ds.get_item(tag, keep_deferred=True)
        if isinstance(value, RawDataElement) and value.value is None and value.length:
            del ds[tag]
    return ds, pixels


def _window_default(ds, pixels: np.ndarray, slope: float, intercept: float) -> tuple[float, float]:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        first = (lambda v: float(v[0]) if isinstance(v, pydicom.multival.MultiValue) else float(v))
        try:
            return first(center), max(1.0, first(width))
        except (TypeError, ValueError, IndexError):
            pass
    frames, rows, columns = pixels.shape[:3]
    frame_step = max(1, -(-frames // 16))
    step = max(4, int(np.ceil(np.sqrt(-(-frames // frame_step) * rows * columns / SAMPLE_PIXELS))))
    low, high = np.percentile(pixels[::frame_step, ::step, ::step], [0.5, 99.5])
    low, high = sorted((float(low) * slope + intercept, float(high) * slope + intercept))
    return (low + high) / 2, max(1.0, high - low)


def _picture(part: np.ndarray, step_x: int, step_y: int, scale: float | None, offset: float,
             invert: bool) -> np.ndarray:
    """`part` (rows, columns[, 3]) as uint8, windowed (value * scale + offset, clipped to 0-255;
    colour as it is) and averaged over blocks of step_y x step_x pixels (the last ones of a row or
    column may be smaller): a band of source rows at a time (BAND_BYTES of float32), never the
    whole part as float."""
    h, w = part.shape[:2]
    channels = part.shape[2] if part.ndim == 3 else 1
    out_h, out_w = -(-h // step_y), -(-w // step_x)
    out = np.empty((out_h, out_w, channels) if channels > 1 else (out_h, out_w), np.uint8)
    xs = np.arange(0, w, step_x)
    x_counts = np.diff(np.append(xs, w)).astype(np.float32)
    x_counts = x_counts[:, None] if channels > 1 else x_counts
    rows_per_band = max(1, BAND_BYTES // (w * channels * 4) // step_y) * step_y
    for top in range(0, h, rows_per_band):
        bottom = min(top + rows_per_band, h)
        first, last = top // step_y, -(-bottom // step_y)
        if scale is None and step_x == step_y == 1:
            out[first:last] = part[top:bottom]
            continue
        band = part[top:bottom].astype(np.float32)
        if scale is not None:
            band *= np.float32(scale)
            band += np.float32(offset)
            np.clip(band, 0, 255, out=band)
        if step_y > 1:
            starts = np.arange(0, bottom - top, step_y)
            band = np.add.reduceat(band, starts, axis=0)
            band /= np.diff(np.append(starts, bottom - top)).astype(np.float32).reshape(
                (-1,) + (1,) * (band.ndim - 1))
        if step_x > 1:
            band = np.add.reduceat(band, xs, axis=1)
            band /= x_counts
        if step_x > 1 or step_y > 1:
            band += np.float32(0.5)
        out[first:last] = band.astype(np.uint8)
    if invert and channels == 1:
        np.subtract(255, out, out=out)
    return out


class Images:
    def __init__(self, archive: Archive, cache_mb: int = 512, decode_memory_mb: int = 2560):
        self.archive = archive
        self.decoded = _Cache(int(cache_mb * 0.8) << 20)
        self.rendered = _Cache(int(cache_mb * 0.2) << 20)
        self.headers = _Cache(8 << 20)                   # Header: about 8000 images
        self.budget = MemoryBudget(decode_memory_mb << 20)
        self._live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()   # decoded, still in use
        self._decoding: dict[str, threading.Lock] = {}   # one decode per instance, however many ask at once
        self._decoding_lock = threading.Lock()

    def exported(self, sop_instance_uid: str):
        """The stored Part 10 file, decrypted and verified (a context manager giving its path)."""
        stored = facts.stored_instance(self.archive.index, sop_instance_uid)
        if stored is None:
            raise KeyError(sop_instance_uid)
        return self.archive.exported(stored.blob_id, stored.sha256)

    def dataset(self, sop_instance_uid: str) -> pydicom.Dataset:
        """The stored data set without its pixel data or any other value over LARGE_VALUE bytes (a
        report, a header), read within the archive's limits: a stored deflate bomb or a data set
        nested too deep raises `archive.InvalidInstance` before pydicom reads it."""
        with self.exported(sop_instance_uid) as path, undeflated(path, self.archive.limits) as plain:
            return _read(plain)[0]

    def header(self, sop_instance_uid: str) -> Header:
        """What the pages need to name, hang and size an image; kept (a few hundred bytes each), so
        a study page reads each header once."""
        found = self.headers.get(sop_instance_uid)
        if found is not None:
            return found
        with self.exported(sop_instance_uid) as path, undeflated(path, self.archive.limits) as plain:
            ds, pixel_bytes = _read(plain)
        why, size, samples = "", 0, 1
        if pixel_bytes is None:
            why = f"{getattr(ds.get('SOPClassUID'), 'name', None) or ds.get('SOPClassUID', 'this object')} has no image"
        else:
            try:
                size, samples = _declared(ds)
            except PixelsTooLarge as exc:
                why = f"the image is not shown: {exc}"
            if size > self.archive.limits.max_pixel_bytes:
                why = (f"the image is not shown: the pixel data declares {_mib(size)} decoded, over "
                       f"{_mib(self.archive.limits.max_pixel_bytes)} (ingest.max_pixel_bytes)")
        compressed = ds.file_meta.TransferSyntaxUID.is_compressed and pixel_bytes is not None
        found = Header(str(ds.get("SOPClassUID", "")), str(ds.get("Modality", "")), _facts(ds), pixel_bytes is not None,
                       why, size, samples, pixel_bytes if compressed else 0)
        self.headers.put(sop_instance_uid, found, 1024)
        return found

    def facts(self, sop_instance_uid: str) -> dict:
        """Laterality, view, orientation and body part (the study page names and hangs images by them)."""
        return self.header(sop_instance_uid).facts

    def held(self, sop_instance_uid: str) -> Decoded | None:
        """The decoded image if it is in memory (cached, or being shown)."""
        return self.decoded.get(sop_instance_uid) or self._live.get(sop_instance_uid)

    def prepare(self, sop_instance_uid: str, picture_pixels: int = 0) -> tuple[int, Decoded | None]:
        """(bytes to reserve from `budget` before decoding and rendering a picture of `picture_pixels`,
        the decoded image if it is already in memory). NotAnImage / TooLargeToShow when it is not shown."""
        header = self.header(sop_instance_uid)
        if not header.image or header.why:
            raise (TooLargeToShow if header.image else NotAnImage)(header.why)
        render = 4 * BAND_BYTES + (3 * WHOLE_REGION + PICTURE_COPIES * picture_pixels) * header.samples
        decoded = self.held(sop_instance_uid)
        if decoded is not None:
            return render, decoded
        return DECODE_FACTOR * header.pixel_bytes + 2 * header.compressed_bytes + render, None

    def decode(self, sop_instance_uid: str) -> Decoded:
        found = self.held(sop_instance_uid)
        if found is not None:
            return found
        with self._decoding_lock:
            lock = self._decoding.setdefault(sop_instance_uid, threading.Lock())
        try:
            with lock:                               # a page asks for the thumbnail and the view together
                found = self.held(sop_instance_uid)
                return found if found is not None else self._decode(sop_instance_uid)
        finally:
            with self._decoding_lock:
                if not lock.locked():
                    self._decoding.pop(sop_instance_uid, None)

    def _decode(self, sop_instance_uid: str) -> Decoded:
        with self.exported(sop_instance_uid) as path, undeflated(path, self.archive.limits) as plain:
            ds = pydicom.dcmread(plain, defer_size=LARGE_VALUE)      # the pixel data stays on disk
            if not any(k in ds for k in PIXEL_KEYWORDS):
                raise NotAnImage(f"{getattr(ds.SOPClassUID, 'name', None) or ds.SOPClassUID} has no image")
            try:                                  # the declared size (and each codestream's) before any decoder
                check_pixels(ds, self.archive.limits.max_pixel_bytes)
            except PixelsTooLarge as exc:
                raise TooLargeToShow(f"the image is not shown: {exc}") from None
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            rows, columns = int(ds.Rows), int(ds.Columns)
            photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
            colour = int(ds.get("SamplesPerPixel", 1)) == 3
            bits_stored = int(ds.get("BitsStored", 8) or 8)
            slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
            spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
            info = {"rows": rows, "columns": columns, "frames": frames, "colour": colour, "photometric": photometric,
                    "invert": photometric == "MONOCHROME1",
                    "pixel_spacing": [float(v) for v in spacing] if spacing else None,
                    "modality": str(ds.get("Modality", "")), "sop_class_uid": str(ds.SOPClassUID)}
            window_attributes = pydicom.Dataset()
            for keyword in ("WindowCenter", "WindowWidth"):
                if keyword in ds:
                    window_attributes[keyword] = ds[keyword]
            del ds                                # compressed pixel data read by the check: let it go
            raw = pixel_array(str(plain))         # one array, frame by frame; YBR comes as RGB
        if colour:
            pixels = raw.reshape(frames, rows, columns, 3)
            if pixels.dtype != np.uint8:
                pixels = (pixels >> max(0, bits_stored - 8)).astype(np.uint8)
            window = (127.5, 255.0)
        else:
            pixels = raw.reshape(frames, rows, columns)
            window = _window_default(window_attributes, pixels, slope, intercept)
        info.update(window_center=window[0], window_width=window[1])
        decoded = Decoded(pixels, info, slope, intercept)
        self._live[sop_instance_uid] = decoded
        self.decoded.put(sop_instance_uid, decoded, pixels.nbytes)
        return decoded

    def render(self, sop_instance_uid: str, *, frame: int = 0, region: tuple[int, int, int, int] | None = None,
               size: tuple[int, int] | None = None, window: tuple[float, float] | None = None,
               fmt: str = "png", decoded: Decoded | None = None) -> bytes:
        """The image (or `region` x, y, width, height of it, in source pixels) at `size`, windowed."""
        decoded = decoded or self.decode(sop_instance_uid)
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
            scale, offset = None, 0.0
        else:                                     # (stored * slope + intercept - low) * 255 / width
            unit = 255.0 / max(width, 1e-6)
            scale, offset = decoded.slope * unit, (decoded.intercept - (center - width / 2)) * unit
        # a larger region is averaged down by whole blocks first (at most twice the picture's size is
        # left), then resized; a smaller one is windowed whole and resized (exactly as it always was)
        step_x, step_y = (1, 1) if w * h <= WHOLE_REGION else (max(1, w // out_w), max(1, h // out_h))
        picture = _picture(part, step_x, step_y, scale, offset, info["invert"])
        image = Image.fromarray(picture, "RGB" if info["colour"] else "L")
        if (out_w, out_h) != image.size:
            shrinking = out_w < w
            image = image.resize((out_w, out_h), Image.Resampling.BOX if shrinking else Image.Resampling.NEAREST
                                 if out_w >= 4 * w else Image.Resampling.BILINEAR, box=(0, 0, w / step_x, h / step_y))
        buffer = io.BytesIO()
        if fmt == "jpeg":
            image.save(buffer, "JPEG", quality=90)
        else:
            image.save(buffer, "PNG", compress_level=1)
        data = buffer.getvalue()
        self.rendered.put(key, data, len(data))
        return data
