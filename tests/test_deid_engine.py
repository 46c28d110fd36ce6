"""The de-identification engine (router/deid/engine.py) on its own: no node, no network.

Every byte of a copy is searched for the identifying values planted in the original; pseudonyms, UIDs
and date shifts are checked for consistency; burned-in text, the options and the table are checked
against PS3.15 Annex E (Table E.1-1).
"""
from __future__ import annotations

import datetime
from datetime import date
from io import BytesIO

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from router.deid.engine import Deidentifier
from router.deid.table import OPTION_CODES, load
from router.settings import DeidProfile

SECRET = b"0123456789abcdef0123456789abcdef"
OTHER_SECRET = b"fedcba9876543210fedcba9876543210"
STRICT = ["retain_longitudinal_modified_dates", "clean_descriptors", "clean_structured_content"]
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"

# the identifying values planted in the originals: none may be found in a copy
PATIENT_NAME = "Wrzesniewski^Bartholomew^Quincey"
PATIENT_ID = "PID7731942X"
OTHER_IDS = ["OTHERID55821", "OTHERID99104"]
BIRTH_DATE = "19610823"
STUDY_DATE = "20230314"
LATER_DATE = "20230911"             # the same patient's later study
ACCESSION = "ACC88412077"
INSTITUTION = "Krolewska Infirmary Zgorzelec"
ADDRESS = "17 Pflaumenallee Oberschleissheim"
REFERRING = "H\u00e4berle^Zo\u00eb^Mirabelle"
PERFORMING = "Ogunbanjo^Thaddeus"
OPERATOR = "Castellanos^Perpetua"
SERIAL = "SN7740021993"
STATION = "RADSTATION-QX9"
SOURCE_AE = "WRZAETITLE"
STUDY_ID = "STUDYID5531"
REQUESTED_PROCEDURE_ID = "RQPROC60217"
STEP_ID = "SPSTEP80413"
PRIVATE_CREATOR = "ACME 1.0"
PRIVATE_SAFE = "ACMESAFEVALUE"
DESCRIBED = f"Wrzesniewski {PATIENT_ID} on 2023-03-14 ({STUDY_DATE})"
IDENTIFYING = [PATIENT_ID, *OTHER_IDS, ACCESSION, INSTITUTION, ADDRESS, SERIAL, STATION, SOURCE_AE, STUDY_ID,
               REQUESTED_PROCEDURE_ID, STEP_ID, BIRTH_DATE, STUDY_DATE, "2023-03-14"]
# the parts of every name, searched case-insensitively in the bytes read as latin-1
NAME_PARTS = ["Wrzesniewski", "Bartholomew", "Quincey", "H\u00e4berle", "Zo\u00eb", "Mirabelle", "Ogunbanjo",
              "Thaddeus", "Castellanos", "Perpetua"]

ORG = "1.2.826.0.1.3680043.10.1137."        # root of the originals' UIDs: every one must be replaced


def profile(*options, **more) -> DeidProfile:
    found = DeidProfile(options=list(options), **more)
    found.validate()
    return found


def image(patient_id: str = PATIENT_ID, study: str = "1", study_date: str = STUDY_DATE) -> Dataset:
    """CT_small with identifying values in every place the tests search."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    for elem in list(ds):
        if elem.tag.group == 0x0009:        # GEMS' block at (0009,0010): the private block below takes its place
            del ds[elem.tag]
    for elem in ds.iterall():
        if elem.VR == "DA":
            elem.value = study_date
    ds.file_meta.SourceApplicationEntityTitle = SOURCE_AE
    ds.PatientName = PATIENT_NAME if patient_id == PATIENT_ID else f"Other^Person^{patient_id}"
    ds.PatientID = patient_id
    ds.OtherPatientIDs = OTHER_IDS
    for item, other in zip(ds.OtherPatientIDsSequence, OTHER_IDS):
        item.PatientID = other
    ds.PatientBirthDate = BIRTH_DATE
    ds.PatientSex = "F"
    ds.PatientAge = "061Y"
    ds.AccessionNumber = ACCESSION
    ds.InstitutionName = INSTITUTION
    ds.InstitutionAddress = ADDRESS
    ds.ReferringPhysicianName = REFERRING
    ds.PerformingPhysicianName = PERFORMING
    ds.OperatorsName = OPERATOR
    ds.DeviceSerialNumber = SERIAL
    ds.StationName = STATION
    ds.StudyID = STUDY_ID
    ds.StudyDescription = f"CT chest {DESCRIBED}"
    ds.SeriesDescription = f"Axial of Bartholomew {PATIENT_ID}"
    ds.ImageComments = f"Patient Wrzesniewski^Bartholomew seen {STUDY_DATE} at {INSTITUTION}"
    root = f"{ORG}{int.from_bytes(patient_id.encode()[-4:], 'big')}.{study}"
    ds.StudyInstanceUID = f"{root}.1"
    ds.SeriesInstanceUID = f"{root}.2"
    ds.SOPInstanceUID = f"{root}.3"
    ds.FrameOfReferenceUID = f"{root}.4"
    ds.InstanceCreatorUID = f"{root}.5"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    request = Dataset()
    request.AccessionNumber = ACCESSION
    request.RequestedProcedureID = REQUESTED_PROCEDURE_ID
    request.ScheduledProcedureStepID = STEP_ID
    request.RequestedProcedureDescription = f"Chest CT for Wrzesniewski {PATIENT_ID}"
    request.ScheduledProcedureStepDescription = f"Bartholomew {STUDY_DATE}"
    procedure = Dataset()
    procedure.CodeValue, procedure.CodingSchemeDesignator, procedure.CodeMeaning = "CTCHEST", "99ACME", "CT chest"
    request.RequestedProcedureCodeSequence = [procedure]
    ds.RequestAttributesSequence = [request]
    referenced = Dataset()
    referenced.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    referenced.ReferencedSOPInstanceUID = f"{root}.6"
    ds.ReferencedStudySequence = [referenced]
    block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    assert block.block_start == 0x1000
    block.add_new(0x10, "LO", PRIVATE_SAFE)
    block.add_new(0x11, "LO", f"{PATIENT_NAME} {PATIENT_ID}")
    return ds


def report(ct: Dataset) -> Dataset:
    """A Comprehensive 3D SR about `ct` (highdicom): PNAME, TEXT, DATE and IMAGE content items."""
    root = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurementReport)
    root.ContentSequence = hd.sr.ContentSequence([
        hd.sr.PnameContentItem(name=codes.DCM.PersonObserverName, value=REFERRING,
                               relationship_type="HAS OBS CONTEXT"),
        hd.sr.PnameContentItem(name=codes.DCM.PersonObserverName, value=PATIENT_NAME,
                               relationship_type="HAS OBS CONTEXT"),
        hd.sr.TextContentItem(name=codes.DCM.Finding, value=f"{DESCRIBED}; {ACCESSION}; {INSTITUTION}",
                              relationship_type="CONTAINS"),
        hd.sr.DateContentItem(name=codes.DCM.StudyDate, value=STUDY_DATE, relationship_type="CONTAINS"),
        hd.sr.ImageContentItem(name=codes.DCM.SourceImageForSegmentation, referenced_sop_class_uid=ct.SOPClassUID,
                               referenced_sop_instance_uid=ct.SOPInstanceUID, relationship_type="CONTAINS"),
    ], is_root=False)
    sr = hd.sr.Comprehensive3DSR(evidence=[ct], content=root, series_instance_uid=f"{ORG}9.1",
                                 series_number=900, sop_instance_uid=f"{ORG}9.2", instance_number=1,
                                 manufacturer="ACME", institution_name=INSTITUTION)
    sr.file_meta.SourceApplicationEntityTitle = SOURCE_AE
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    return sr


def saved(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def original_uids(*datasets: Dataset) -> set[str]:
    """Every UID of the originals that is not one of the standard's (those are kept)."""
    found = set()
    for ds in datasets:
        for elem in [*ds.file_meta, *ds.iterall()]:
            if elem.VR == "UI" and elem.value:
                values = elem.value if elem.VM > 1 else [elem.value]
                found.update(str(v) for v in values if not str(v).startswith("1.2.840.10008."))
    return found


def walk(ds: Dataset):
    """Every element at every depth."""
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from walk(item)


@pytest.fixture(scope="module")
def originals():
    ct = image()
    return ct, report(ct)


# 1. nothing identifying in any byte of a copy

@pytest.mark.parametrize("options", [[], STRICT], ids=["basic", "modified-dates+clean"])
def test_no_identifying_value_in_any_byte(originals, options):
    ct, sr = originals
    deid = Deidentifier(profile(*options), SECRET)
    uids = original_uids(ct, sr)
    assert {ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID, ct.FrameOfReferenceUID,
            ct.ReferencedStudySequence[0].ReferencedSOPInstanceUID, sr.SOPInstanceUID} <= uids
    before = saved(ct)
    for original in (ct, sr):
        copy = deid.apply(original)
        assert not copy.dropped and copy.dataset is not None
        data = saved(copy.dataset)
        for value in IDENTIFYING + list(uids):
            assert value.encode("latin-1") not in data, (original.Modality, value)
        text = data.decode("latin-1").lower()
        for part in NAME_PARTS:
            assert part.lower() not in text, (original.Modality, part)
        again = dcmread(BytesIO(data))
        assert again.PatientID == again.PatientName == copy.patient.pseudonym
        assert again.file_meta.MediaStorageSOPInstanceUID == again.SOPInstanceUID
        assert "SourceApplicationEntityTitle" not in again.file_meta
        assert not any(elem.tag.is_private for elem in walk(again))
    assert saved(ct) == before                          # the original is left as it was
    # the planted values are really there: the search above can fail
    data = saved(ct) + saved(sr)
    for value in IDENTIFYING + list(uids):
        assert value.encode("latin-1") in data, value
    for part in NAME_PARTS:
        assert part.lower() in data.decode("latin-1").lower(), part


def test_cleaned_text_keeps_what_is_not_identifying(originals):
    """clean_descriptors masks the identifying values and keeps the rest of the text."""
    ct, sr = originals
    out = Deidentifier(profile(*STRICT), SECRET).apply(ct).dataset
    assert out.StudyDescription.startswith("CT chest ")
    assert "***" in out.StudyDescription and "***" in out.ImageComments
    request = out.RequestAttributesSequence[0]
    assert request.RequestedProcedureDescription.startswith("Chest CT for ")
    assert "RequestedProcedureID" not in request
    basic = Deidentifier(profile(), SECRET).apply(ct).dataset
    assert "StudyDescription" not in basic and "RequestAttributesSequence" not in basic
    # clean_structured_content: the SR's TEXT item keeps its non-identifying words
    texts = [e.value for e in walk(Deidentifier(profile(*STRICT), SECRET).apply(sr).dataset) if e.tag == 0x0040A160]
    assert texts and all("***" in t for t in texts)


# 2. consistency: per patient, per secret

def shifted_days(first: str, second: str) -> int:
    def day(value):
        return date(int(value[:4]), int(value[4:6]), int(value[6:8]))
    return (day(second) - day(first)).days


def test_same_patient_same_pseudonym_and_intervals():
    deid = Deidentifier(profile("retain_longitudinal_modified_dates"), SECRET)
    first = deid.apply(image(study="1", study_date=STUDY_DATE))
    later = deid.apply(image(study="2", study_date=LATER_DATE))
    other = deid.apply(image(patient_id="PID4410087Y"))
    assert first.patient.pseudonym == later.patient.pseudonym == first.dataset.PatientID == later.dataset.PatientID
    assert first.patient.pseudonym.startswith("ANON-")
    assert other.patient.pseudonym != first.patient.pseudonym
    assert other.dataset.PatientID != first.dataset.PatientID
    assert first.dataset.StudyInstanceUID != later.dataset.StudyInstanceUID
    a, b = first.dataset.StudyDate, later.dataset.StudyDate
    assert a != STUDY_DATE and b != LATER_DATE
    assert shifted_days(a, b) == shifted_days(STUDY_DATE, LATER_DATE) == 181
    assert shifted_days(a, STUDY_DATE) == first.patient.shift_days == later.patient.shift_days
    assert 1 <= first.patient.shift_days <= 3650
    assert first.dataset.SeriesDate == a                # every date moves by the same amount
    assert "PatientBirthDate" in first.dataset and not first.dataset.PatientBirthDate   # not longitudinal: Z
    assert LATER_DATE.encode() not in saved(later.dataset) and STUDY_DATE.encode() not in saved(first.dataset)
    assert first.dataset.LongitudinalTemporalInformationModified == "MODIFIED"


def test_same_secret_same_uids_other_secret_others():
    ct = image()
    uids = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "InstanceCreatorUID")
    one = Deidentifier(profile(), SECRET).apply(ct)
    two = Deidentifier(profile(), SECRET).apply(ct)
    other = Deidentifier(profile(), OTHER_SECRET).apply(ct)
    for keyword in uids:
        assert one.dataset[keyword].value == two.dataset[keyword].value != ct[keyword].value
        assert one.dataset[keyword].value != other.dataset[keyword].value
        assert one.dataset[keyword].value.startswith("2.25.") and len(one.dataset[keyword].value) <= 64
    assert len({one.dataset[k].value for k in uids}) == len(uids)
    assert saved(one.dataset) == saved(two.dataset)
    assert one.patient.pseudonym == two.patient.pseudonym != other.patient.pseudonym
    assert one.dataset.SOPClassUID == ct.SOPClassUID    # the standard's UIDs are kept


# 3. references between the copies still resolve

def test_references_resolve(originals):
    ct, sr = originals
    for options in ([], STRICT):
        deid = Deidentifier(profile(*options), SECRET)
        image_copy, report_copy = deid.apply(ct).dataset, deid.apply(sr).dataset
        assert report_copy.StudyInstanceUID == image_copy.StudyInstanceUID
        assert report_copy.PatientID == image_copy.PatientID
        items = [e for e in walk(report_copy) if e.tag == 0x00081199]       # ReferencedSOPSequence
        assert items
        for sequence in items:
            assert sequence.value[0].ReferencedSOPInstanceUID == image_copy.SOPInstanceUID
            assert sequence.value[0].ReferencedSOPClassUID == ct.SOPClassUID
        evidence = report_copy.CurrentRequestedProcedureEvidenceSequence[0]
        assert evidence.StudyInstanceUID == image_copy.StudyInstanceUID
        series = evidence.ReferencedSeriesSequence[0]
        assert series.SeriesInstanceUID == image_copy.SeriesInstanceUID
        assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == image_copy.SOPInstanceUID
    # another instance of the same series and frame of reference maps to the same UIDs
    deid = Deidentifier(profile(), SECRET)
    sibling = image()
    sibling.SOPInstanceUID = f"{ORG}942.1.77"
    first, second = deid.apply(ct).dataset, deid.apply(sibling).dataset
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert first.FrameOfReferenceUID == second.FrameOfReferenceUID
    assert first.SOPInstanceUID != second.SOPInstanceUID


# 4. burned-in text

def test_burned_in_images_dropped():
    deid = Deidentifier(profile(), SECRET)
    marked = image()
    marked.BurnedInAnnotation = "YES"
    copy = deid.apply(marked)
    assert copy.dataset is None and "BurnedInAnnotation" in copy.dropped
    assert copy.patient.pseudonym                       # the patient is known, for the export's record
    capture = image()
    capture.SOPClassUID = capture.file_meta.MediaStorageSOPClassUID = SC_CLASS
    copy = deid.apply(capture)
    assert copy.dataset is None and "Secondary Capture" in copy.dropped
    kept = deid.apply(capture, trusted=True)
    assert not kept.dropped and kept.dataset.SOPClassUID == SC_CLASS
    assert np.array_equal(dcmread(BytesIO(saved(kept.dataset))).pixel_array, capture.pixel_array)
    plain = image()
    plain.BurnedInAnnotation = "NO"
    assert deid.apply(plain).dataset is not None


def test_burned_in_blackout():
    deid = Deidentifier(profile(burned_in="blackout", blackout=[[0, 0, 10, 10]]), SECRET)
    marked = image()
    marked.BurnedInAnnotation = "YES"
    before = marked.pixel_array.copy()
    copy = deid.apply(marked)
    assert not copy.dropped
    out = dcmread(BytesIO(saved(copy.dataset)))
    assert out.BurnedInAnnotation == "NO"
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    pixels = out.pixel_array
    assert pixels.shape == before.shape == (128, 128)
    black = np.iinfo(pixels.dtype).min if out.PixelRepresentation == 1 else 0
    assert (pixels[:10, :10] == black).all()
    assert not (before[:10, :10] == black).all()        # the region was not black before
    outside = np.ones(before.shape, bool)
    outside[:10, :10] = False
    assert np.array_equal(pixels[outside], before[outside])
    assert np.array_equal(marked.pixel_array, before)  # the original is untouched


# 5. options

def test_retain_patient_characteristics():
    ct = image()
    kept = Deidentifier(profile("retain_patient_characteristics"), SECRET).apply(ct).dataset
    assert kept.PatientSex == "F" and kept.PatientAge == "061Y"
    basic = Deidentifier(profile(), SECRET).apply(ct).dataset
    assert not basic.get("PatientSex")                  # Z: emptied
    assert "PatientAge" not in basic                    # X: removed


def test_retain_device_identity():
    ct = image()
    kept = Deidentifier(profile("retain_device_identity"), SECRET).apply(ct).dataset
    assert kept.DeviceSerialNumber == SERIAL and kept.StationName == STATION
    basic = Deidentifier(profile(), SECRET).apply(ct).dataset
    assert basic.get("DeviceSerialNumber") in (None, "", "REMOVED")
    assert SERIAL.encode() not in saved(basic)


def test_retain_safe_private():
    ct = image()
    deid = Deidentifier(profile("retain_safe_private", safe_private=["0009,ACME 1.0,10"]), SECRET)
    out = deid.apply(ct).dataset
    assert out[0x00090010].value == PRIVATE_CREATOR
    assert out[0x00091010].value == PRIVATE_SAFE
    assert 0x00091011 not in out
    private = [elem.tag for elem in out if elem.tag.is_private]
    assert private == [0x00090010, 0x00091010]
    block = dcmread(BytesIO(saved(out))).private_block(0x0009, PRIVATE_CREATOR)
    assert block[0x10].value == PRIVATE_SAFE
    # the allow-list names the creator: the same element under another creator goes
    other = image()
    other[0x00090010].value = "OTHER 2.0"
    assert not [e for e in deid.apply(other).dataset if e.tag.is_private]
    assert not [e for e in Deidentifier(profile(), SECRET).apply(ct).dataset if e.tag.is_private]


# 6. the table, against the standard's text (PS3.15 Table E.1-1)

def test_table_rows_of_the_standard():
    table = load()

    def action(tag, *options):
        return table.row(tag).action(frozenset(options))
    assert action(0x00100010) == "Z"                    # Patient's Name
    assert action(0x00080050) == "Z"                    # Accession Number
    assert action(0x0020000D) == "U"                    # Study Instance UID
    assert action(0x00080018) == "U"                    # SOP Instance UID
    assert action(0x00081155) == "U"                    # Referenced SOP Instance UID
    assert action(0x00101010) == "X"                    # Patient's Age
    assert action(0x00101010, "retain_patient_characteristics") == "K"
    assert action(0x00100040, "retain_patient_characteristics") == "K"  # Patient's Sex
    assert action(0x00080080) == "X/Z/D"                # Institution Name
    assert action(0x00080080, "retain_institution_identity") == "K"
    assert action(0x00181000) == "X/Z/D"                # Device Serial Number
    assert action(0x00181000, "retain_device_identity") == "K"
    assert action(0x00080020) == "Z"                    # Study Date
    assert action(0x00080020, "retain_longitudinal_modified_dates") == "C"
    assert action(0x00080020, "retain_longitudinal_full_dates") == "K"
    assert action(0x00081030) == "X"                    # Study Description
    assert action(0x00081030, "clean_descriptors") == "C"
    assert action(0x0040A730) == "D"                    # Content Sequence
    assert action(0x0040A730, "clean_structured_content") == "C"
    assert action(0x00100030) == "Z"                    # Patient's Birth Date
    assert action(0x00101000) == "X"                    # Other Patient IDs
    # the repeating groups: Overlay Data (60xx,3000), through the mask
    for tag in (0x60003000, 0x60023000, 0x601E3000):
        assert action(tag) == "X"
    assert table.row(0x60020010) is None                # Overlay Rows: not in the table
    assert table.row(0x00280010) is None                # Rows: kept
    assert len(table.exact) > 600


def test_overlay_data_removed():
    ct = image()
    ct.add_new(0x60020010, "US", 128)
    ct.add_new(0x60023000, "OW", b"\xff" * (128 * 128 // 8))
    out = Deidentifier(profile(), SECRET).apply(ct).dataset
    assert 0x60023000 not in out


# 7. what the copy says about itself (PS3.15 E.1.1)

@pytest.mark.parametrize("options, longitudinal", [
    ([], "REMOVED"),
    (STRICT, "MODIFIED"),
    (["retain_longitudinal_full_dates", "retain_device_identity"], "UNMODIFIED"),
])
def test_deidentification_method(originals, options, longitudinal):
    for original in originals:
        out = dcmread(BytesIO(saved(Deidentifier(profile(*options), SECRET).apply(original).dataset)))
        assert out.PatientIdentityRemoved == "YES"
        found = [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
        assert found[0] == "113100"
        assert sorted(found[1:]) == sorted(OPTION_CODES[o][0] for o in options)
        assert all(item.CodingSchemeDesignator == "DCM" for item in out.DeidentificationMethodCodeSequence)
        assert out.LongitudinalTemporalInformationModified == longitudinal
        method = out.DeidentificationMethod
        assert method.startswith("m3dicom: PS3.15 E.1-1 2026c Basic Profile") and len(method) <= 64
        assert method.endswith(f"and {len(options)} options") if options else method.endswith("Profile")


# 8. what a hostile source or a careless operator brings

def test_public_tag_no_edition_defines_is_removed():
    """(0010,9999) is in no dictionary: a sender's own data outside any private block, removed like private data;
    the standard attributes that the table does not list stay."""
    ct = image()
    ct.add_new(0x00109999, "UN", PATIENT_NAME.encode())
    ct.add_new(0x00231234 & 0xFFFEFFFF, "LO", PATIENT_ID)         # (0022,1234): even group, no attribute either
    out = Deidentifier(profile(), SECRET).apply(ct).dataset
    assert 0x00109999 not in out and 0x00221234 not in out
    assert out.Rows == ct.Rows and out.SOPClassUID == ct.SOPClassUID
    assert PATIENT_ID.encode() not in saved(out) and b"Wrzesniewski" not in saved(out)


def test_blackout_region_outside_the_image_drops_it():
    """A region made for a larger image would paint nothing (or not all of it): the image is left out, never sent
    marked BurnedInAnnotation NO with its text."""
    marked = image()                                    # 128 x 128
    marked.BurnedInAnnotation = "YES"
    for region in ([200, 200, 10, 10], [120, 0, 20, 10]):
        copy = Deidentifier(profile(burned_in="blackout", blackout=[[0, 0, 4, 4], region]), SECRET).apply(marked)
        assert copy.dataset is None and "outside the 128x128 image" in copy.dropped
    assert Deidentifier(profile(burned_in="blackout", blackout=[[0, 0, 128, 128]]), SECRET).apply(marked).dataset


@pytest.mark.parametrize("name, planar", [("SC_rgb.dcm", 1), ("SC_ybr_full_uncompressed.dcm", 0)])
def test_blackout_keeps_colour_images_right(name, planar):
    """pixel_array is RGB with each pixel's samples together: the copy must say so (Planar Configuration 0,
    RGB), or every pixel outside the region comes out scrambled."""
    ds = dcmread(get_testdata_file(name))
    if planar:
        ds.PlanarConfiguration = 1
        ds.PixelData = np.ascontiguousarray(ds.pixel_array.transpose(2, 0, 1)).tobytes()
    before = ds.pixel_array.copy()                      # RGB
    ds.BurnedInAnnotation = "YES"
    copy = Deidentifier(profile(burned_in="blackout", blackout=[[0, 0, 5, 5]]), SECRET).apply(ds)
    out = dcmread(BytesIO(saved(copy.dataset)))
    assert out.PhotometricInterpretation == "RGB" and out.PlanarConfiguration == 0
    pixels = out.pixel_array
    assert (pixels[:5, :5] == 0).all()
    outside = np.ones(pixels.shape[:2], bool)
    outside[:5, :5] = False
    assert np.array_equal(pixels[outside], before[outside])


def test_a_secret_that_is_not_a_file_is_refused_in_one_line(tmp_path):
    import os
    from types import SimpleNamespace

    from router.deid.export import ExportError, read_secret

    key = tmp_path / "p.key"
    config = SimpleNamespace(deid={"p": profile(secret_file=key)}, data_dir=tmp_path)
    key.mkdir(mode=0o700)
    with pytest.raises(ExportError, match="is not a secret") as found:
        read_secret(config, "p")
    assert found.value.final
    key.rmdir()
    os.mkfifo(key, 0o600)                               # reading it would wait for a writer for ever
    with pytest.raises(ExportError, match="is not a secret"):
        read_secret(config, "p")
    key.unlink()
    key.write_bytes(SECRET)
    key.chmod(0o600)
    assert read_secret(config, "p") == SECRET


def test_a_study_naming_two_patients_is_refused(tmp_path):
    """The archive files a study under one Patient ID; the copy's patient is also the issuer (or the name and birth
    date without an ID): instances that give two pseudonyms fail the export rather than mix patients in one study.
    A real archive holds both; the export is run as the router runs it, to an S3 place it never reaches."""
    from archive import Archive
    from node import owners
    from node.config import from_dict
    from router.deid import export, store

    config = from_dict({"node": {"data_dir": str(tmp_path / "var")}, "deid": {"p": {}}}, tmp_path)
    first, second = image(), image()
    second.SOPInstanceUID = second.file_meta.MediaStorageSOPInstanceUID = ORG + "99"
    second.IssuerOfPatientID = "ANOTHER HOSPITAL"       # the same Patient ID, another patient
    archive = Archive(config.data_dir)
    try:
        owners.migrate(archive.index)
        export.make_secret(config, "p")
        for number, ds in enumerate((first, second)):
            ds.save_as(tmp_path / f"{number}.dcm", enforce_file_format=True)
            archive.ingest_file(tmp_path / f"{number}.dcm")
        made = store.create(archive.index, study_uid=str(first.StudyInstanceUID), profile="p",
                            destination="s3://unreached/x/", max_attempts=3)
        done = export.execute(archive, config, made, "test")
        assert done.state == "failed" and "names another patient" in done.error and not done.sent
    finally:
        archive.close()


def test_what_the_table_does_not_list_does_not_pass_as_it_is():
    """A birth date in another calendar (0010,0033), a reviewer's name, a WADO link, an unlisted date and a
    comment naming the patient: removed, a dummy, shifted or masked; a Pixel Spacing Calibration Description
    that happens to hold a name part is masked (the new user's phantom)."""
    from pydicom.data import get_testdata_file

    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName, ds.PatientID = "Wrzesniewski^Anatol", "PID-44"
    ds.add_new(0x00100033, "LO", "19610823")                  # Patient's Birth Date in Alternative Calendar
    ds.add_new(0x00142006, "PN", "Reviewer^Secret")           # Evaluator Name
    ds.add_new(0x00081190, "UR", "https://pacs/wado?studyUID=1.2.3.4&patient=PID-44")
    ds.add_new(0x00080106, "DT", "20240219101010")            # Context Group Version: an unlisted DT
    ds.add_new(0x00400400, "LT", "call Wrzesniewski about PID-44")
    ds.PixelSpacingCalibrationDescription = "Wrzesniewski spacing"
    for options, dummy in (([], "19000101000000"), (["retain_longitudinal_modified_dates"], None)):
        deid = Deidentifier(profile(*options), SECRET)
        out = deid.apply(ds).dataset
        data = saved(out).decode("latin-1")
        for secret in ("19610823", "Reviewer", "https://pacs", "PID-44", "Wrzesniewski", "20240219"):
            assert secret not in data, (options, secret)
        assert 0x00100033 not in out and 0x00081190 not in out and out[0x00142006].value == "ANONYMOUS"
        assert out.CommentsOnTheScheduledProcedureStep == "call *** about ***"
        assert out.PixelSpacingCalibrationDescription == "*** spacing"
        shifted = deid.patient(ds).shift_days
        expected = dummy or (datetime.date(2024, 2, 19) - datetime.timedelta(days=shifted)).strftime("%Y%m%d") + \
            "101010"
        assert out[0x00080106].value == expected


def test_a_uid_under_the_registry_root_that_the_registry_does_not_hold_is_replaced():
    ds = image()
    ds.SOPInstanceUID = "1.2.840.10008.999.19610823.123456"
    out = Deidentifier(profile(), SECRET).apply(ds).dataset
    assert out.SOPInstanceUID.startswith("2.25.") and out.SOPClassUID == ds.SOPClassUID   # CT Image Storage kept


def test_names_in_sequences_and_short_name_parts_are_masked_as_words():
    ds = image()
    ds.PatientName = "Li^Wu=山田^太郎"
    ds.RequestAttributesSequence = [Dataset()]
    ds.RequestAttributesSequence[0].add_new(0x0040A123, "PN", "Nowakowska^Ewa")
    ds.StudyDescription = "CT for Li Wu, Ewa Nowakowska; 山田 太郎 CT; Clinical Liver"
    out = Deidentifier(profile("clean_descriptors"), SECRET).apply(ds).dataset
    assert out.StudyDescription == "CT for *** ***, *** ***; *** *** CT; Clinical Liver"


def test_an_allow_listed_private_sequence_has_its_items_de_identified():
    ds = image()
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    inner = Dataset()
    inner.PatientName, inner.PatientID = "Hidden^Person", "PID-HIDDEN"
    block.add_new(0x20, "SQ", [inner])
    out = Deidentifier(profile("retain_safe_private", safe_private=["0009,ACME 1.0,20"]), SECRET).apply(ds).dataset
    data = saved(out).decode("latin-1")
    assert "Hidden" not in data and "PID-HIDDEN" not in data and "ACME 1.0" in data


def test_patient_keys_are_unambiguous_and_an_instance_naming_no_one_is_refused():
    from router.deid.engine import DeidError, patient_key

    def key(**values):
        ds = Dataset()
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        return patient_key(ds)
    assert key(PatientName="Doe^John^^^") == key(PatientName="Doe^John ")        # one patient, written two ways
    assert key(PatientName="A|19500101") != key(PatientName="A", PatientBirthDate="19500101")
    assert key(PatientID="P1", IssuerOfPatientID="X\\Y") != key(PatientID="Y\\P1", IssuerOfPatientID="X")
    with pytest.raises(DeidError, match="no Patient ID and no Patient's Name"):
        key(PatientBirthDate="19500101")


def test_a_date_range_moves_both_ends():
    ds = image()
    ds.add_new(0x00400244, "DA", "20200101")                  # Performed Procedure Step Start Date
    ds.StudyDate = "20200101"
    ds.add_new(0x00321032, "PN", "Some^Body")
    ds.add_new(0x0018700C, "DA", "20200101-20200301")         # Date of Last Detector Calibration (unlisted range)
    deid = Deidentifier(profile("retain_longitudinal_modified_dates"), SECRET)
    out = deid.apply(ds).dataset
    days = deid.patient(ds).shift_days
    first = (datetime.date(2020, 1, 1) - datetime.timedelta(days=days)).strftime("%Y%m%d")
    last = (datetime.date(2020, 3, 1) - datetime.timedelta(days=days)).strftime("%Y%m%d")
    assert out[0x0018700C].value in (f"{first}-{last}", "")      # shifted whole, or dropped if the table removes it
    assert out.StudyDate == first


def test_names_in_unspaced_scripts_hyphenated_names_and_deep_sequences_are_masked():
    """CJK and Hangul names are written without spaces ("山田太郎"): their one- or two-character parts are
    masked wherever they appear; a hyphenated part piece by piece; names nested deeper than 8 items too."""
    ds = image()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Yamada^Taro=山田^太郎=やまだ^たろう"
    inner = Dataset()
    inner.PerformingPhysicianName = "Smith-Jones^Zbigniewa=김^철수"
    for _ in range(10):
        outer = Dataset()
        outer.ReferencedStudySequence = [inner]
        inner = outer
    ds.ReferencedImageSequence = [inner]
    ds.StudyDescription = "山田太郎 CT; 김철수님; Mrs Jones; Zbigniewa"
    out = Deidentifier(profile("clean_descriptors"), SECRET).apply(ds).dataset
    assert out.StudyDescription == "****** CT; ******님; Mrs ***; ***"
    data = saved(out)
    for part in ("山田", "太郎", "김", "철수", "Jones", "Zbigniewa"):
        assert part.encode() not in data


def test_a_huge_patient_name_does_not_make_cleaning_slow():
    import random
    import string
    import time

    rng = random.Random(2)
    ds = image()
    ds.PatientName = "^".join("".join(rng.choices(string.ascii_letters, k=5)) for _ in range(2000))
    ds.ImageComments = " ".join("".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(40_000))
    planted = ds.PatientName.components[0].split("^")[1234]
    ds.ImageComments += f" {planted.upper()} {ds.PatientName.components[0].split('^')[7]}"
    started = time.monotonic()
    out = Deidentifier(profile("clean_descriptors"), SECRET).apply(ds).dataset
    assert time.monotonic() - started < 4          # a flat alternation of 2,000 parts: about 8 s here
    assert out.ImageComments.endswith(" *** ***")


def test_a_date_time_with_more_than_a_time_after_its_date_is_emptied_not_half_shifted():
    ds = image()
    ds.AcquisitionDateTime = "20230314-20230315"                       # a range (query syntax), or garbage
    ds.add_new(0x00189074, "DT", "20230314233000.5 20230316")          # Frame Acquisition DateTime
    ds.add_new(0x0018A002, "DT", "20230314233000.123456+1400")         # Contribution DateTime: a DT as it should be
    deid = Deidentifier(profile("retain_longitudinal_modified_dates"), SECRET)
    out = deid.apply(ds).dataset
    assert out.AcquisitionDateTime == "" and out[0x00189074].value == ""
    moved = (datetime.date(2023, 3, 14) - datetime.timedelta(days=deid.patient(ds).shift_days)).strftime("%Y%m%d")
    assert out[0x0018A002].value == moved + "233000.123456+1400"
    assert b"20230315" not in saved(out) and b"20230316" not in saved(out)


# 10. the code review's findings

def test_no_object_uid_of_the_dictionary_survives():
    """Every UI attribute of pydicom's dictionary set to an original UID of its own: none is in the copy (the
    table lists 55 of them; the others, such as SOP Instance UID of Concatenation Source, are derived too)."""
    from pydicom.datadict import DicomDictionary

    ds = image()
    originals = {}
    for number, (tag, entry) in enumerate(sorted(DicomDictionary.items())):
        vr = entry[0]
        if vr != "UI" or tag >> 16 in (0x0002, 0x0000) or tag in (0x00080016, 0x00020010) or "x" in f"{tag:08x}":
            continue
        uid = f"1.2.826.0.1.3680043.999.{number}"
        originals[f"{tag:08X}"] = uid
        ds.add_new(tag, "UI", uid)
    out = Deidentifier(profile(), SECRET).apply(ds).dataset
    data = saved(out).decode("latin-1")
    kept = {tag: uid for tag, uid in originals.items() if uid + "\x00" in data or uid + " " in data
            or data.endswith(uid) or f"{uid}\\" in data}
    assert len(originals) > 90 and not kept, kept


def test_allow_listed_private_values_are_de_identified_and_unreadable_ones_dropped():
    ds = image()
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x30, "DA", STUDY_DATE)
    block.add_new(0x31, "UI", "1.2.826.0.1.3680043.999.7")
    block.add_new(0x32, "UN", b"\xfe\xff\x00\xe0\x08\x00\x00\x00\x10\x00\x10\x00SECRET!!")   # an item, unread
    block.add_new(0x33, "PN", "Hidden^Person")
    deid = Deidentifier(profile("retain_safe_private", "retain_longitudinal_modified_dates",
                                safe_private=[f"0009,ACME 1.0,{e}" for e in ("30", "31", "32", "33")]), SECRET)
    out = deid.apply(ds).dataset
    data = saved(out).decode("latin-1")
    assert "SECRET!!" not in data and "1.2.826.0.1.3680043.999.7" not in data and "Hidden" not in data
    assert STUDY_DATE not in data and out[0x00091030].value != STUDY_DATE and out[0x00091031].value.startswith("2.25.")
    assert 0x00091032 not in out


def test_an_image_that_cannot_be_blacked_out_is_left_out_alone():
    ds = image()
    ds.BurnedInAnnotation = "YES"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"     # MPEG-2: no codec here decodes it
    copy = Deidentifier(profile(burned_in="blackout", blackout=[[0, 0, 4, 4]]), SECRET).apply(ds)
    assert copy.dataset is None and "cannot black it out" in copy.dropped


def test_a_result_made_from_an_image_left_out_is_left_out_and_a_lost_lease_stops_the_export(tmp_path):
    """The CAD's Secondary Capture shows its source's pixels: trusted only when its source was sent. A real
    archive: a burned-in image and a result (an instance with a job) made from it; and an export whose lease
    another router took stops before it sends anything."""
    import threading

    from archive import Archive
    from node import owners
    from node.config import from_dict
    from router import queue
    from router.deid import export, store

    config = from_dict({"node": {"data_dir": str(tmp_path / "var")}, "deid": {"p": {}}}, tmp_path)
    source, result = image(), image()
    source.BurnedInAnnotation = "YES"
    result.SOPClassUID = result.file_meta.MediaStorageSOPClassUID = SC_CLASS
    result.SOPInstanceUID = result.file_meta.MediaStorageSOPInstanceUID = ORG + "77"
    result.SeriesInstanceUID, result.BurnedInAnnotation = ORG + "78", "NO"
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    result.SourceImageSequence = [ref]
    archive = Archive(config.data_dir)
    try:
        owners.migrate(archive.index)
        export.make_secret(config, "p")
        source.save_as(tmp_path / "source.dcm", enforce_file_format=True)
        result.save_as(tmp_path / "result.dcm", enforce_file_format=True)
        archive.ingest_file(tmp_path / "source.dcm")
        job = queue.create(archive.index, study_uid=str(source.StudyInstanceUID), plugin="cad", params={}, inputs=[])
        archive.ingest_file(tmp_path / "result.dcm", job_id=job)
        made = store.create(archive.index, study_uid=str(source.StudyInstanceUID), profile="p",
                            destination="s3://unreached/x/", max_attempts=1)
        done = export.execute(archive, config, made, "test")
        assert done.state == "failed" and "every instance was left out" in done.error
        assert "made from an image that was left out" in done.error and done.dropped == 2

        lost = threading.Event()
        lost.set()
        again = store.get(archive.index, store.create(archive.index, study_uid=str(source.StudyInstanceUID),
                                                       profile="p", destination="s3://unreached/y/", max_attempts=1))
        with pytest.raises(export.ExportError, match="another router holds this export now"):
            export.run(archive, config, again, "test", lost=lost)
    finally:
        archive.close()
