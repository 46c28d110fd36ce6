"""Result objects every plug-in shares, built with highdicom: Secondary Capture and TID 1500 SR.

Results join the source study in a new series; their UIDs come from the job (`ctx.uid`), so a
job run again after a crash makes the very same objects. Each names the algorithm that made
it (name, version, parameters): the SR as its observer device and Algorithm Identification,
the SC in Derivation Description and Contributing Equipment.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .plugin import Context

if TYPE_CHECKING:
    import highdicom as hd

MANUFACTURER = "m3dicom"
ABSENT = codes.cid240.Absent           # (272519000, SCT, "Absent"): CID 240 Present-Absent


def encode(dataset: Dataset) -> bytes:
    """A result data set as a Part 10 file."""
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def _equipment(ctx: Context) -> list[hd.ContributingEquipment]:
    import highdicom as hd

    return [hd.ContributingEquipment(manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
                                     manufacturer_model_name=ctx.algorithm.name[:64],
                                     software_versions=ctx.algorithm.version[:64])]


def _orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation, each value reduced to its first (dominant) letter:
    DICOM allows "FL" on an oblique view, highdicom's SC takes single directions."""
    value = source.get("PatientOrientation")
    if value and len(value) == 2 and all(value):
        letters = tuple(str(v).strip()[:1].upper() for v in value)
        if all(letter in "APLRHF" and letter for letter in letters):
            return letters
    return None


def secondary_capture(source: Dataset, pixels: np.ndarray, ctx: Context, *, name: str, description: str,
                      series_number: int = 900, instance_number: int = 1,
                      pixel_spacing: tuple[float, float] | None = None) -> Dataset:
    """A Secondary Capture image derived from `source`, in its study, patient and frame.

    `pixels`: uint8 (rows, columns) grey or (rows, columns, 3) RGB, or uint16 grey.
    """
    import highdicom as hd   # here: every process that loads the plug-ins (the node's, at start) paid 0.2 s for it
    pixels = np.ascontiguousarray(pixels)
    rgb = pixels.ndim == 3
    if pixels.dtype not in (np.uint8, np.uint16) or (rgb and pixels.dtype != np.uint8):
        raise ValueError(f"secondary capture pixels must be uint8 (grey or RGB) or uint16 grey, not {pixels.dtype}")
    orientation = _orientation(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels, photometric_interpretation="RGB" if rgb else "MONOCHROME2",
        bits_allocated=pixels.dtype.itemsize * 8, coordinate_system="PATIENT",
        series_instance_uid=ctx.uid(name, "series"), series_number=series_number,
        sop_instance_uid=ctx.uid(name, instance_number), instance_number=instance_number,
        manufacturer=MANUFACTURER, pixel_spacing=pixel_spacing,
        patient_orientation=orientation or ("L", "F"),
        laterality=source.get("ImageLaterality") or source.get("Laterality") or None,
        transfer_syntax_uid=ExplicitVRLittleEndian, contributing_equipment=_equipment(ctx))
    sc.SeriesDescription = description[:64]
    if "Laterality" not in sc and "ImageLaterality" not in sc:
        sc.Laterality = ""             # Type 2C (paired body parts): unknown
    sc.DerivationDescription = f"{ctx.algorithm.name} {ctx.algorithm.version} {ctx.algorithm.parameters_text}"[:1024]
    sc.BurnedInAnnotation = "YES"
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    return sc


@dataclass
class NothingFound:
    """A TID 1501 measurement group that states that the algorithm looked for `finding_type` on
    `sources` and found none: its Finding is `finding_type`, its qualitative evaluation
    `finding_type` = Absent (CID 240), with the algorithm (TID 4019) and the images examined.
    A reader tells it from a finding by that evaluation (and by having no image region)."""
    tracking_id: str                   # e.g. "no cluster found"
    finding_type: Code
    sources: Sequence[Dataset]         # the images examined


@dataclass
class Finding:
    """One measurement group of a TID 1500 report: a region on a source image and its values."""
    tracking_id: str                   # short id, the same as burned into the SC and in findings.json
    finding_type: Code
    source: Dataset                    # the image the region is on
    graphic_type: str                  # POINT | CIRCLE | POLYLINE | ELLIPSE
    points: np.ndarray                 # (n, 2) column, row in source pixels (CIRCLE: centre, then a point on it)
    measurements: list[tuple[Code, float, Code]] = field(default_factory=list)   # (name, value, unit)
    evaluations: list[tuple[Code, Code]] = field(default_factory=list)           # (name, coded value)


def measurement_report(findings: Sequence[Finding], evidence: Sequence[Dataset], ctx: Context, *, name: str,
                       title: str, procedure: Code, series_number: int = 901,
                       nothing_found: Sequence[NothingFound] = ()) -> Dataset:
    """A Comprehensive 3D SR with a TID 1500 Measurement Report: one group per finding, and one
    per `nothing_found` statement (a report of a normal image is one such group, never an
    empty report: TID 1500 needs at least one group).

    An earlier job's report that this one supersedes is listed in the Predecessor Documents
    Sequence (`ctx.predecessors`).
    """
    import highdicom as hd
    if not findings and not nothing_found:
        raise ValueError("a measurement report needs a finding or a statement that none was found "
                         "(pass nothing_found=[NothingFound(...)] for a normal result)")
    algorithm = hd.sr.AlgorithmIdentification(name=ctx.algorithm.name, version=ctx.algorithm.version,
                                              parameters=[f"{k}={v}" for k, v in sorted(ctx.algorithm.params.items())])
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=ctx.uid("device"), name=ctx.algorithm.name[:64], manufacturer_name=MANUFACTURER,
            model_name=ctx.algorithm.version[:64]))
    groups = []
    for finding in findings:
        region = hd.sr.ImageRegion(
            graphic_type=finding.graphic_type, graphic_data=np.asarray(finding.points, dtype=float) + 0.5,
            source_image=hd.sr.SourceImageForRegion(finding.source.SOPClassUID, finding.source.SOPInstanceUID))
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=ctx.uid(name, "finding", finding.tracking_id),
                                                         identifier=finding.tracking_id),
            referenced_region=region, finding_type=finding.finding_type, algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(name=n, value=float(v), unit=u, algorithm_id=algorithm)
                          for n, v, u in finding.measurements] or None,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=n, value=v)
                                     for n, v in finding.evaluations] or None))
    for statement in nothing_found:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=ctx.uid(name, "nothing", statement.tracking_id),
                                                         identifier=statement.tracking_id),
            finding_type=statement.finding_type, algorithm_id=algorithm,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=statement.finding_type, value=ABSENT)],
            source_images=[hd.sr.SourceImageForMeasurementGroup(s.SOPClassUID, s.SOPInstanceUID)
                           for s in statement.sources]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure, imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport)
    previous = []
    for ref in ctx.predecessors:
        item = Dataset()
        item.StudyInstanceUID, item.SeriesInstanceUID = ref["study_uid"], ref["series_uid"]
        item.SOPClassUID, item.SOPInstanceUID = ref["sop_class_uid"], ref["sop_instance_uid"]
        previous.append(item)
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(evidence), content=report[0], series_instance_uid=ctx.uid(name, "series"),
        series_number=series_number, sop_instance_uid=ctx.uid(name, 1), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, previous_versions=previous or None,
        contributing_equipment=_equipment(ctx))
    sr.SeriesDescription = title[:64]
    return sr


ENCAPSULATED_STL = "1.2.840.10008.5.1.4.1.1.104.3"


def encapsulated_stl(source: Dataset, stl: bytes, ctx: Context, *, name: str, title: str, series_number: int = 902,
                     frame_of_reference: str | None = None) -> Dataset:
    """Encapsulated STL Storage (PS3.3 A.85): the mesh in the source study, in the source's frame of
    reference (coordinates in mm), so that a PACS keeps the model with the images."""
    from datetime import datetime

    from pydicom.dataset import FileMetaDataset

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ENCAPSULATED_STL
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = ctx.uid(name, 1)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
                    "SpecificCharacterSet"):
        if keyword in source:
            setattr(ds, keyword, source.get(keyword))
        elif keyword != "SpecificCharacterSet" and keyword != "StudyDescription":
            setattr(ds, keyword, "")
    now = datetime.now()
    ds.Modality = "M3D"
    ds.SeriesInstanceUID = ctx.uid(name, "series")
    ds.SeriesNumber, ds.InstanceNumber = series_number, 1
    ds.SeriesDescription = title[:64]
    ds.FrameOfReferenceUID = frame_of_reference or source.get("FrameOfReferenceUID") or generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer, ds.ManufacturerModelName = MANUFACTURER, ctx.algorithm.name[:64]
    ds.DeviceSerialNumber = ctx.uid("device")[-16:]
    ds.SoftwareVersions = ctx.algorithm.version[:64]
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "NO"
    ds.DocumentTitle = title[:64]
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "model/stl"
    ds.EncapsulatedDocument = stl + (b"\0" if len(stl) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(stl)
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    ds.SourceInstanceSequence = [reference]
    series = Dataset()                           # Common Instance Reference: where the source lies
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ReferencedInstanceSequence = [reference]
    ds.ReferencedSeriesSequence = [series]
    unit = Dataset()
    unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = "mm", "UCUM", "millimeter"
    ds.MeasurementUnitsCodeSequence = [unit]
    return ds
