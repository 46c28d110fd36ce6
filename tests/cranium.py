"""The real CT head of Debian's invesalius-examples (Cranium.inv3), as a DICOM CT series.

Cranium.inv3 is a gzip tar: main.plist (shape, spacing, dtype) and matrix.dat (raw int16
HU, 108 x 256 x 256, slices from the skull base up, rows towards the face). The series gets
the geometry that says so: Image Position along +z (superior) per slice, Image Orientation
columns +x and rows -y (towards anterior, LPS), Pixel Spacing from the project. Installed by
`make install`; never committed.
"""
from __future__ import annotations

import plistlib
import tarfile
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")


def load() -> tuple[np.ndarray, tuple[float, float, float]]:
    """(HU volume (slices, rows, columns), spacing (x, y, z) in mm)."""
    with tarfile.open(CRANIUM) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        main = plistlib.loads(tar.extractfile(members["main.plist"]).read())
        raw = tar.extractfile(members[main["matrix"]["filename"]]).read()
    volume = np.frombuffer(raw, dtype=np.dtype(main["matrix"]["dtype"]).newbyteorder("<")).reshape(main["matrix"]["shape"])
    return volume.copy(), tuple(float(s) for s in main["spacing"])


def write_series(directory: Path, volume: np.ndarray, spacing: tuple[float, float, float], *,
                 study: str | None = None, patient: str = "CRANIUM") -> list[Path]:
    """One CT Image Storage file per slice, stored as unsigned values + 1024 (Rescale Intercept -1024)."""
    directory.mkdir(parents=True, exist_ok=True)
    study, series, frame = study or generate_uid(), generate_uid(), generate_uid()
    dx, dy, dz = spacing
    rows, cols = volume.shape[1:]
    paths = []
    for k, plane in enumerate(volume):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Cranium^Example", patient, "", "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20120914"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "151208"
        ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName, ds.PositionReferenceIndicator = "", "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.StudyDescription, ds.SeriesDescription, ds.BodyPartExamined = "CT head", "Cranium", "HEAD"
        ds.Manufacturer, ds.ImageType, ds.KVP, ds.PatientPosition = "InVesalius example", ["ORIGINAL", "PRIMARY", "AXIAL"], 120, "HFS"
        ds.ImagePositionPatient = [round(-dx * cols / 2, 3), round(dy * rows / 2, 3), round(k * dz, 3)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, -1, 0]
        ds.PixelSpacing = [dy, dx]
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 400, 2000
        ds.PixelData = np.clip(plane.astype(np.int32) + 1024, 0, 4095).astype(np.uint16).tobytes()
        path = directory / f"ct{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
