"""The attribute table of PS3.15 Annex E (Table E.1-1), read from two libraries, never typed by hand.

- The Basic Profile's action for each attribute comes from dicom-anonymizer (KitwareMedical, BSD),
  whose `dicomfields_2026c` module is generated from the 2026c edition of the standard: the newest
  edition any library ships (652 attributes and the repeating groups 50xx / 60xx).
- The option columns (Retain Patient Characteristics, Retain Device Identity, Retain Longitudinal
  Temporal Information, Clean Descriptors, Clean Structured Content, ...) come from dicom-standard
  (Innolitics, MIT), a parse of the standard's own tables. It is the only library that carries them;
  its edition is 2020. An attribute added to the table since then has no option entry here, so it
  gets its Basic Profile action (removed or emptied, never kept): the safe direction.
Why not one library: dicom-anonymizer has no option columns; dicom-standard's Basic column is six years
old. `tests/test_deid.py` checks a sample of rows against the standard's text.
"""
from __future__ import annotations

import functools
import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

# the options a [deid.NAME] profile may choose, and their column in dicom-standard's table
OPTIONS = {
    "retain_longitudinal_modified_dates": "rtnLongModifDatesOpt",
    "retain_longitudinal_full_dates": "rtnLongFullDatesOpt",
    "retain_patient_characteristics": "rtnPatCharsOpt",
    "retain_device_identity": "rtnDevIdOpt",
    "retain_institution_identity": "rtnInstIdOpt",
    "retain_safe_private": "rtnSafePrivOpt",
    "clean_descriptors": "cleanDescOpt",
    "clean_structured_content": "cleanStructContOpt",
}
# the Deidentification Method Code Sequence (CID 7050) code of each option
OPTION_CODES = {
    "retain_longitudinal_modified_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_longitudinal_full_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "clean_structured_content": ("113104", "Clean Structured Content Option"),
}
BASIC_CODE = ("113100", "Basic Application Confidentiality Profile")
_GROUPS = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D", "X_Z_TAGS": "X/Z",
           "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*"}


@dataclass(frozen=True)
class Row:
    """One attribute's actions: the Basic Profile's and, per option, the option's (K keep, C clean)."""
    basic: str
    options: dict = field(default_factory=dict)

    def action(self, chosen: frozenset[str]) -> str:
        """K when a chosen option keeps it, C when one cleans it, else the Basic Profile's action."""
        codes = {self.options[o] for o in chosen if o in self.options}
        return "K" if "K" in codes else "C" if "C" in codes else self.basic


@dataclass(frozen=True)
class Table:
    exact: dict                                 # tag (int) -> Row
    masked: tuple                               # ((value, mask, Row), ...): 50xx,xxxx and 60xx,3000 / 4000
    edition: str

    def row(self, tag: int) -> Row | None:
        found = self.exact.get(tag)
        if found is None:
            for value, mask, row in self.masked:
                if tag & mask == value:
                    return row
        return found


def _options() -> dict[int, dict]:
    path = Path(sysconfig.get_path("data")) / "standard" / "confidentiality_profile_attributes.json"
    if not path.exists():                       # a wheel's data files go under the environment's prefix
        raise RuntimeError(f"dicom-standard's table is not at {path}: reinstall the package (make install)")
    found: dict[int, dict] = {}
    for row in json.loads(path.read_text(encoding="utf-8")):
        try:
            tag = int(row["id"], 16)
        except ValueError:                      # "ggggeeee-where-gggg-is-odd", "50xxxxxx": handled by rule
            continue
        found[tag] = {name: row[column] for name, column in OPTIONS.items() if row.get(column)}
    return found


@functools.cache
def load() -> Table:
    from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as basic

    options = _options()
    exact, masked = {}, []
    for group, action in _GROUPS.items():
        for entry in getattr(basic, group):
            if len(entry) == 2:
                tag = entry[0] << 16 | entry[1]
                exact[tag] = Row(action, options.get(tag, {}))
            else:                               # (group, element, group mask, element mask)
                g, e, gm, em = entry
                masked.append(((g << 16 | e), (gm << 16 | em), Row(action, {})))
    return Table(exact, tuple(masked), "2026c")
