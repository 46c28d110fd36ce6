"""One data set de-identified: pure (no I/O), every replacement derived from the project's secret.

PS3.15 Annex E, Table E.1-1 (`table.py`), applied to every element at every depth of the data set:
- K keep, X remove, Z empty, D a dummy of the element's VR, U a UID derived from the original
  (`Keys.uid`: the same original gives the same UID in every copy and every run, so references
  between objects still resolve); C clean (text: the instance's own identifying values are masked;
  dates: shifted by the patient's amount). Where the table leaves a choice (X/Z, X/D, Z/D, X/Z/D),
  the element is emptied or given a dummy rather than removed, so the copy keeps its IOD's Type 1
  and 2 attributes; X/Z/U* sequences are kept and their items de-identified like the top level.
- A sequence that is kept (K, D, C, U*) is de-identified item by item with the same table.
  In an SR's content items, a TEXT value (X in the table) becomes a dummy, unless
  clean_structured_content cleans it, so that the content tree stays valid.
- Patient ID and Patient's Name are the pseudonym (`Keys.pseudonym`, a keyed HMAC of the original
  patient's issuer and ID). With retain_longitudinal_modified_dates every date (DA, and the date
  of a DT) moves back by the patient's amount (`Keys.shift_days`): the same amount in every study of
  the patient, so the intervals between studies hold.
- Private elements are removed unless retain_safe_private keeps an allow-listed one (with its
  private creator); group lengths and the file meta go; the file meta is written anew.
- Images that may show burned-in text (BurnedInAnnotation YES, Secondary Capture, ultrasound) are
  dropped, or have the profile's regions blacked out; the node's own analysis results are trusted.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from pydicom.datadict import get_entry
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
from pydicom.valuerep import PersonName

from ..settings import DeidProfile, safe_private_tags
from .table import BASIC_CODE, OPTION_CODES, Table, load

PATIENT_ID, PATIENT_NAME, ISSUER = 0x00100020, 0x00100010, 0x00100021
# written by the de-identification itself (PS3.15 E.1.1 and E.3.6), never copied from the original
OURS = {0x00120062, 0x00120063, 0x00120064, 0x00280303}
TEXT_VALUE = 0x0040A160
CONTENT_SEQUENCE = 0x0040A730
STANDARD_UID = "1.2.840.10008."
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ULTRASOUND = ("1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.6.2", "1.2.840.10008.5.1.4.1.1.3.1")
DUMMY = {"PN": "ANONYMOUS", "DA": "19000101", "DT": "19000101000000", "TM": "000000", "AS": "000Y",
         "DS": "0", "IS": "0", "UR": "http://deidentified.invalid", "CS": "REMOVED"}
TEXT_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"}
NUMBER_VRS = {"FD", "FL", "SL", "SS", "UL", "US", "SV", "UV"}
BYTES_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
MASK = "***"
_DT_TAIL = re.compile(r"(\d{2}){0,3}(\.\d{1,6})?([+-]\d{4})?")      # a DT's time and offset (PS3.5 6.2)
_GROUPABLE = re.compile("[\x20-\x7e]")      # but i, s and k (see _alternation)
# letters of the scripts that do not separate words by spaces (CJK ideographs, kana, Hangul, Thai, ...)
_UNSPACED = re.compile("[\u0e00-\u0eff\u1100-\u11ff\u2e80-\u2fdf\u3040-\u30ff\u3100-\u31ff\u3400-\u4dbf"
                       "\u4e00-\u9fff\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff\uff66-\uffdc\U00020000-\U0003ffff]")


class DeidError(ValueError):
    """The data set cannot be de-identified (the export fails with this reason)."""


@dataclass(frozen=True)
class Keys:
    """What the project's secret derives: pseudonyms, UIDs and date shifts (HMAC-SHA-256)."""
    secret: bytes

    def _mac(self, purpose: str, value: str) -> bytes:
        return hmac.new(self.secret, f"{purpose}\x00{value}".encode("utf-8", "surrogateescape"),
                        hashlib.sha256).digest()

    def check(self, patient_key: str) -> str:
        """What tells two original patients apart in the index (`deid_patients.key_mac`) without naming them."""
        return self._mac("patient-check", patient_key).hex()

    def uid(self, original: str) -> str:
        """2.25 and a 128-bit number: at most 44 characters, the same for the same original."""
        return f"2.25.{int.from_bytes(self._mac('uid', original)[:16], 'big')}"

    def pseudonym(self, patient_key: str, prefix: str) -> str:
        return prefix + base64.b32encode(self._mac("patient", patient_key)[:10]).decode()

    def shift_days(self, patient_key: str, most: int) -> int:
        return 1 + int.from_bytes(self._mac("shift", patient_key)[:8], "big") % most


@dataclass(frozen=True)
class Patient:
    """A patient as the project sees it: the key the pseudonym is derived from, and what it gives."""
    key: str
    pseudonym: str
    shift_days: int
    original_id: str
    original_name: str


@dataclass
class Copy:
    """The de-identified data set, or why the instance is not sent (`dropped`)."""
    patient: Patient
    dataset: Dataset | None = None
    dropped: str = ""


def key_of(patient_id: str, issuer: str = "") -> str:
    """The key of a patient known by an ID (and its issuer): what `m3dicom deid lookup --patient-id` derives too."""
    return "id:" + json.dumps([issuer.strip(), patient_id.strip()])


def patient_key(ds: Dataset) -> str:
    """Who the patient is for the project: issuer and Patient ID; without an ID, the name (each component
    trimmed, trailing empty ones dropped) and the birth date. An instance naming no one cannot be given a
    pseudonym that is theirs alone: refused."""
    pid = str(ds.get("PatientID", "") or "").strip()
    if pid:
        return key_of(pid, str(ds.get("IssuerOfPatientID", "") or ""))
    name = "=".join("^".join(part.strip() for part in group.split("^")).rstrip("^")
                    for group in str(ds.get("PatientName", "") or "").split("=")).rstrip("=")
    birth = str(ds.get("PatientBirthDate", "") or "").strip()
    if not name:
        raise DeidError("the instance has no Patient ID and no Patient's Name: it cannot be given a pseudonym")
    return "name:" + json.dumps([name, birth])


def burned_in(ds: Dataset) -> str:
    """Why the image may show burned-in text, or '' (not an image, or nothing says so)."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return ""
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        return "BurnedInAnnotation is YES"
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class.startswith(SECONDARY_CAPTURE):
        return "a Secondary Capture (may carry burned-in text)"
    if sop_class in ULTRASOUND or ds.get("Modality") == "US":
        return "an ultrasound image (may carry burned-in text)"
    return ""


class Deidentifier:
    """The profile's de-identification; `apply` makes one copy. Thread-safe (holds no state per call)."""

    def __init__(self, profile: DeidProfile, secret: bytes, table: Table | None = None):
        if len(secret) < 16:
            raise DeidError("the project's secret is shorter than 16 bytes")
        self.profile = profile
        self.keys = Keys(secret)
        self.table = table or load()
        self.chosen = frozenset(profile.options)
        self.safe = safe_private_tags(profile.safe_private) if "retain_safe_private" in self.chosen else frozenset()
        self.shifting = "retain_longitudinal_modified_dates" in self.chosen
        self.full_dates = "retain_longitudinal_full_dates" in self.chosen and not self.shifting

    def patient(self, ds: Dataset) -> Patient:
        key = patient_key(ds)
        return Patient(key, self.keys.pseudonym(key, self.profile.pseudonym_prefix),
                       self.keys.shift_days(key, self.profile.max_shift_days),
                       str(ds.get("PatientID", "") or ""), str(ds.get("PatientName", "") or ""))

    def apply(self, ds: Dataset, trusted: bool = False) -> Copy:
        """The copy of `ds` (left unchanged); `trusted`: one of the node's own results (no burned-in text)."""
        patient = self.patient(ds)
        suspect = "" if trusted else burned_in(ds)
        if suspect and self.profile.burned_in == "drop":
            return Copy(patient, dropped=suspect)
        if suspect:
            outside = _outside(ds, self.profile.blackout)
            if outside:                         # painting nothing there would send the text marked as gone
                return Copy(patient, dropped=f"{suspect}; {outside}")
        walk = _Walk(self, patient, _identifiers(ds))
        out = walk.dataset(ds, top=True)
        out.PatientID = patient.pseudonym
        out.PatientName = patient.pseudonym
        self._mark(out)
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) or ExplicitVRLittleEndian
        if suspect:
            try:
                syntax = _black_out(out, syntax, self.profile.blackout)
            except Exception as exc:        # float pixels, a codec missing: this image is left out, not the study
                return Copy(patient, dropped=f"{suspect}; cannot black it out ({type(exc).__name__}: {exc})"[:300])
        if "SOPInstanceUID" not in out or "SOPClassUID" not in out:
            raise DeidError("the data set has no SOP Class UID or SOP Instance UID")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = out.SOPClassUID
        meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
        meta.TransferSyntaxUID = syntax
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        out.file_meta = meta
        return Copy(patient, out)

    def _mark(self, out: Dataset) -> None:
        """What PS3.15 E.1.1 asks a de-identified data set to say about itself."""
        out.PatientIdentityRemoved = "YES"
        chosen = [o for o in OPTION_CODES if o in self.chosen]
        out.DeidentificationMethod = (f"m3dicom: PS3.15 E.1-1 {self.table.edition} Basic Profile"
                                      + (f" and {len(chosen)} option{'s' if len(chosen) > 1 else ''}" if chosen
                                         else ""))      # which: the code sequence (LO holds 64 characters)
        codes = []
        for value, meaning in [BASIC_CODE] + [OPTION_CODES[o] for o in chosen]:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            codes.append(item)
        out.DeidentificationMethodCodeSequence = codes
        out.LongitudinalTemporalInformationModified = ("MODIFIED" if self.shifting else
                                                       "UNMODIFIED" if self.full_dates else "REMOVED")


class _Walk:
    """One data set's de-identification (the patient, the values to mask in text)."""

    def __init__(self, deid: Deidentifier, patient: Patient, mask: re.Pattern | None):
        self.deid, self.patient, self.mask = deid, patient, mask

    def dataset(self, ds: Dataset, top: bool = False, in_content: bool = False) -> Dataset:
        out = Dataset()
        creators: dict[tuple[int, int], str] = {}
        for elem in ds:
            tag = elem.tag
            if tag.element == 0 or tag.group == 0x0002 or tag in OURS or tag.group == 0xFFFE:
                continue
            if tag.is_private:
                self._private(ds, elem, out, creators)
                continue
            if top and tag in (PATIENT_ID, PATIENT_NAME):
                continue                                    # the pseudonym, set by apply
            row = self.deid.table.row(tag)
            action = row.action(self.deid.chosen) if row is not None else _unlisted(elem)
            if tag == ISSUER:
                action = "X"
            elif tag == TEXT_VALUE and row is None:
                # Table E.1-1 has no row of its own for Text Value (it is under the Content Sequence's, D, or C with
                # clean_structured_content): removed (a dummy in content items), or cleaned with that option
                action = "C" if "clean_structured_content" in self.deid.chosen else "X"
            kept = self._element(elem, action, in_content or tag == CONTENT_SEQUENCE)
            if kept is not None:
                out.add(kept)
        return out

    def _element(self, elem: DataElement, action: str, in_content: bool) -> DataElement | None:
        vr = elem.VR
        if vr in ("DA", "DT", "TM") and (self.deid.shifting or self.deid.full_dates) and elem.tag.group != 0x0010:
            # E.3.6: the option covers every date and time (the table's option column is of 2020; the patient's
            # own dates, birth date first, are not longitudinal information)
            action = "C" if self.deid.shifting else "K"
        if elem.tag == TEXT_VALUE and in_content and action == "X":
            action = "D"                                    # a TEXT content item needs its value
        if action in ("X/Z", "Z/D"):
            action = "Z"
        elif action in ("X/D", "X/Z/D"):
            action = "D"
        elif action == "X/Z/U*":
            action = "U" if vr == "UI" else "K" if vr == "SQ" else "Z"
        if action == "X":
            return None
        if vr == "SQ":
            if action == "Z":
                return DataElement(elem.tag, "SQ", Sequence())
            return DataElement(elem.tag, "SQ", Sequence(
                self.dataset(item, in_content=in_content) for item in (elem.value or [])))
        if action == "K":
            return elem
        if action == "Z":
            return DataElement(elem.tag, vr, b"" if vr in BYTES_VRS else None)
        if action == "U":
            return DataElement(elem.tag, vr, self._uids(elem.value)) if vr == "UI" else _dummy(elem)
        if action == "C":
            return self._clean(elem)
        return _dummy(elem, self._uids if vr == "UI" else None)

    def _uids(self, value):
        if value is None or value == "":
            return value
        values = value if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(
            value, str) else [value]
        mapped = [v if _registry(str(v)) else self.deid.keys.uid(str(v)) for v in values]
        return mapped if len(mapped) != 1 else mapped[0]

    def _clean(self, elem: DataElement) -> DataElement | None:
        vr = elem.VR
        if vr in ("DA", "DT"):
            return DataElement(elem.tag, vr, _shifted(elem.value, vr, self.patient.shift_days)) \
                if self.deid.shifting else elem if self.deid.full_dates else _dummy(elem)
        if vr == "TM" or vr in NUMBER_VRS or vr in ("DS", "IS", "AS", "UI"):
            return elem if vr != "UI" else DataElement(elem.tag, vr, self._uids(elem.value))
        if vr in TEXT_VRS and self.mask is not None:
            def masked(v):
                return self.mask.sub(MASK, str(v)) if v is not None else v
            value = elem.value
            is_many = not isinstance(value, str) and hasattr(value, "__iter__")
            return DataElement(elem.tag, vr, [masked(v) for v in value] if is_many else masked(value))
        return elem if vr in TEXT_VRS else None

    def _private(self, ds: Dataset, elem: DataElement, out: Dataset, creators: dict) -> None:
        """A private element is kept only when the allow-list names it, with its creator."""
        if not self.deid.safe:
            return
        group, number = elem.tag.group, elem.tag.element
        if 0x0010 <= number <= 0x00FF:                 # a private creator: written with its first kept element
            return
        block = number >> 8
        creator_elem = ds.get((group << 16) | block)
        creator = str(creator_elem.value).strip() if creator_elem is not None else ""
        if (group, creator, number & 0xFF) not in self.deid.safe:
            return
        if (group, block) not in creators:
            creators[(group, block)] = creator
            out.add(DataElement((group << 16) | block, "LO", creator))
        if elem.VR == "UN":                 # read without its VR (implicit VR, no private dictionary entry): a
            return                          # sequence or a date in there could not be de-identified
        if elem.VR == "SQ":                 # an allow-listed sequence: its items are de-identified like any
            elem = DataElement(elem.tag, "SQ", Sequence(self.dataset(item) for item in (elem.value or [])))
        else:                               # a date shifted (or kept) as the options say, a UID derived, a name
            elem = self._element(elem, "U" if elem.VR == "UI" else "D" if elem.VR == "PN" else "K", False)
            if elem is None:
                return
        out.add(elem)


def _unlisted(elem: DataElement) -> str:
    """The action on an attribute Table E.1-1 does not list. The table keeps those (K); here what could still
    identify does not pass as it is: an attribute no edition defines is removed like a private one, and so is
    the rest of the patient's own group (0010: a birth date in another calendar) and a URL (a WADO link names
    the original UIDs); a person's name gets a dummy, a date a dummy (or the patient's shift, or kept, with a
    longitudinal option); free text is cleaned of the instance's identifying values."""
    if not _standard(elem.tag) or elem.tag.group == 0x0010 or elem.VR == "UR":
        return "X"
    if elem.VR == "UI":
        return "U"                      # only registry UIDs pass (`_registry`): an object's UID is derived
    if elem.VR in ("PN", "DA", "DT"):
        return "D"
    if elem.VR in ("LO", "SH", "ST", "LT", "UT", "UC"):
        return "C"
    return "K"


def _standard(tag) -> bool:
    """A standard attribute (the table keeps what it does not list); a public tag that no edition defines, a
    sender's own data outside any private block, is removed like a private one."""
    try:
        get_entry(tag)
    except KeyError:
        return False
    return True


def _registry(uid: str) -> bool:
    """A UID of the DICOM registry (a SOP class, a transfer syntax, a coding scheme): the same in every copy.
    Being under 1.2.840.10008 is not enough: a sender can put an identifier there."""
    return uid.startswith(STANDARD_UID) and UID(uid).name != uid


def _dummy(elem: DataElement, uids=None) -> DataElement:
    vr = elem.VR
    if vr == "UI":
        return DataElement(elem.tag, vr, uids(elem.value) if uids else "2.25.0")
    if vr in DUMMY:
        return DataElement(elem.tag, vr, DUMMY[vr])
    if vr in TEXT_VRS:
        return DataElement(elem.tag, vr, "REMOVED")
    if vr in NUMBER_VRS:
        return DataElement(elem.tag, vr, 0)
    if vr in BYTES_VRS:                 # zeros of the VR's width (OF, OL: 4 bytes; OD, OV: 8)
        return DataElement(elem.tag, vr, b"\x00" * {"OF": 4, "OL": 4, "OD": 8, "OV": 8}.get(vr, 2))
    if vr == "AT":
        return DataElement(elem.tag, vr, 0)
    return DataElement(elem.tag, vr, None)


def _shift_date(value: str, days: int) -> str | None:
    try:
        return (date(int(value[:4]), int(value[4:6]), int(value[6:8])) - timedelta(days=days)).strftime("%Y%m%d")
    except (ValueError, OverflowError):
        return None


def _shifted(value, vr: str, days: int):
    """Dates moved back by `days` (both ends of a range); a date that cannot be read whole (a year alone) is
    emptied."""
    def one(text) -> str:
        if isinstance(text, date):              # pydicom's DA / DT objects (highdicom writes them), not only text
            text = getattr(text, "original_string", None) or text.strftime(
                "%Y%m%d%H%M%S.%f%z" if isinstance(text, datetime) else "%Y%m%d")
        text = str(text or "").strip()
        if vr == "DA" and "-" in text:
            ends = [one(end) if end else "" for end in text.split("-", 1)]
            return "-".join(ends) if all(e or not t for e, t in zip(ends, text.split("-", 1))) else ""
        if len(text) < 8 or not text[:8].isdigit():
            return ""
        if vr == "DT" and not _DT_TAIL.fullmatch(text[8:]):
            return ""                           # what follows the date is no time (a second date kept as written)
        moved = _shift_date(text[:8], days)
        return "" if moved is None else moved + (text[8:] if vr == "DT" else "")
    if value is None or value == "":
        return value
    if isinstance(value, (str, date)):
        return one(value)
    return [one(v) for v in value]


def _dates_as_written(value: str) -> list[str]:
    if len(value) < 8 or not value[:8].isdigit():
        return []
    y, m, d = value[:4], value[4:6], value[6:8]
    return [y + m + d, f"{y}-{m}-{d}", f"{d}.{m}.{y}", f"{d}/{m}/{y}", f"{m}/{d}/{y}", f"{y}/{m}/{d}"]


def _identifiers(ds: Dataset) -> re.Pattern | None:
    """The instance's identifying values as they may appear in free text (masked when text is cleaned):
    names' parts, IDs, accession number, institution, station, serial number, and every top-level date."""
    found: set[str] = set()
    short: set[str] = set()              # name parts of one or two letters: masked as whole words only
    for name in _names(ds):
        for part in re.split(r"[\^ =,]+", name):
            # a hyphenated or apostrophed part is masked whole and each piece alone ("Smith-Jones": "Jones")
            for piece in {part, *re.split(r"[-'\u2019]+", part)}:
                if not piece.strip(".-'\u2019"):
                    continue
                # scripts written without spaces between words (CJK, kana, Hangul, Thai): "山田太郎" has no word
                # boundary around "山田", so a part of one or two characters there is masked wherever it appears
                (found if len(piece) >= 3 or _UNSPACED.search(piece) else short).add(piece)
    for keyword in ("PatientID", "OtherPatientIDs", "AccessionNumber", "InstitutionName", "InstitutionAddress",
                    "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber", "PatientAddress",
                    "PatientTelephoneNumbers", "MedicalRecordLocator", "StudyID"):
        found.update(str(v).strip() for v in _values(ds.get(keyword)) if len(str(v).strip()) >= 3)
    for elem in ds:
        if elem.VR in ("DA", "DT") and not elem.tag.is_private:
            for value in _values(elem):
                found.update(_dates_as_written(str(value)))
    if not found and not short:
        return None
    parts = ([f"(?:{_alternation({_folded(v) for v in found})})"] if found else []) + (
        [rf"(?<!\w)(?:{_alternation({_folded(v) for v in short})})(?!\w)"] if short else [])
    return re.compile("|".join(parts), re.IGNORECASE)


def _folded(value: str) -> str:
    """`value` in lower case where the case-insensitive match still finds it as written (not "İ", "ß")."""
    low = value.lower()
    return low if len(low) == len(value) and re.fullmatch(re.escape(low), value, re.IGNORECASE) else value


def _alternation(words: set[str], level: int = 0) -> str:
    """A pattern matching any of `words`, the longest first, factored by leading letters (a shallow trie):
    Python's regex tries each alternative at each position, so thousands of name parts (a hostile Patient's
    Name) against a long text took minutes; grouped by prefix, a position tries a few. Only words starting
    with an ASCII character no other character matches case-insensitively are grouped (not i, s, k: "İ",
    "ſ", "K" match them); the others stay one alternation, longest first, so that the longest word at a
    position is the one masked, as before."""
    prefix = os.path.commonprefix(list(words)) if len(words) > 1 else ""
    if prefix:
        return re.escape(prefix) + f"(?:{_alternation({w[len(prefix):] for w in words}, level)})"
    if level >= 12 or len(words) <= 8:
        return _flat(words)
    groups: dict[str, set[str]] = {}
    rest = set()
    for word in words:
        if word and _GROUPABLE.match(word[0]) and word[0] not in "iskISK":
            groups.setdefault(word[0].lower(), set()).add(word[1:])
        elif word:
            rest.add(word)
    body = "|".join([re.escape(first) + (f"(?:{_alternation(more, level + 1)})" if more != {""} else "")
                     for first, more in sorted(groups.items())] + ([_flat(rest)] if rest else []))
    return f"(?:{body})?" if "" in words else body


def _flat(words: set[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=lambda w: (-len(w), w)))


def _names(ds: Dataset):
    """Every person's name in the data set, in sequences at any depth: a name missed here would pass in the
    free text the walk cleans. Looking costs no more than the walk itself (which visits every element), and
    the depth is the archive's reading limit (ingest.max_sequence_depth)."""
    pending = [ds]
    while pending:
        for elem in pending.pop():
            if elem.VR == "PN":
                yield from (str(v) for v in _values(elem))
            elif elem.VR == "SQ":
                pending.extend(elem.value or [])


def _values(elem) -> list:
    value = getattr(elem, "value", elem)
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes, PersonName)) or not hasattr(value, "__iter__"):   # a name iterates its letters
        return [value]
    return list(value)


def _outside(ds: Dataset, regions: list) -> str:
    """Why a black-out region does not lie within the image (made for another size of image), or ''."""
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    for x, y, width, height in regions:
        if x + width > columns or y + height > rows:
            return f"black-out region {[x, y, width, height]} lies outside the {columns}x{rows} image"
    return ""


def _black_out(out: Dataset, syntax: str, regions: list) -> str:
    """Paint the regions black in every frame, decoded; the copy's transfer syntax (uncompressed)."""
    import numpy as np
    from pydicom.uid import UID

    for keyword in ("PixelData", "BurnedInAnnotation", "PhotometricInterpretation", "PlanarConfiguration"):
        if keyword in out:                      # a kept element is the original's own: changed here, never in place
            out[keyword] = copy.copy(out[keyword])
    out.file_meta = FileMetaDataset()
    out.file_meta.TransferSyntaxUID = syntax
    pixels = out.pixel_array
    if pixels.dtype.kind not in "iu":
        raise DeidError("black-out needs integer pixels")
    stored = int(out.get("BitsStored", 0) or 0) or pixels.dtype.itemsize * 8
    black = pixels.max() if out.get("PhotometricInterpretation") == "MONOCHROME1" else -(1 << (stored - 1)) \
        if pixels.dtype.kind == "i" and out.get("PixelRepresentation") == 1 else 0
    pixels = np.array(pixels, copy=True)
    frames = pixels if int(out.get("NumberOfFrames", 1) or 1) > 1 else pixels[np.newaxis]
    for x, y, width, height in regions:
        frames[:, y:y + height, x:x + width, ...] = black
    out.PixelData = pixels.tobytes()
    # pixel_array gives colour as RGB (YBR converted) with the samples of each pixel together, compressed or not
    if out.get("PhotometricInterpretation", "").startswith("YBR"):
        out.PhotometricInterpretation = "RGB"
    if "PlanarConfiguration" in out:
        out.PlanarConfiguration = 0
    if UID(syntax).is_compressed:
        out["PixelData"].VR = "OW" if out.BitsAllocated > 8 else "OB"
    out.BurnedInAnnotation = "NO"
    return ExplicitVRLittleEndian if UID(syntax).is_compressed else syntax
