"""Values as the index matches them (C-FIND): person names without regard to case, times as strings
that compare as times. Stored in key columns next to the values received."""
from __future__ import annotations


def name_key(name: str | None) -> str | None:
    """A person name as matched case-insensitively."""
    return name.upper() if name else None


def time_key(value: str | None, upper: bool = False) -> str | None:
    """A DICOM TM as 'HHMMSS.ffffff' so that strings compare as times.

    Missing digits are zeros, or nines for the upper bound of a range (`1200` as an upper
    bound means up to 12:00:59.999999).
    """
    if not value:
        return None
    whole, _, fraction = value.strip().replace(":", "").partition(".")
    fill = "9" if upper else "0"
    return whole[:6].ljust(6, fill) + "." + fraction[:6].ljust(6, fill)


def without_nul(text: str) -> str:
    """A value as the index keeps it and a query matches it: NUL padding dropped, a NUL inside replaced by
    U+FFFD (PostgreSQL's text cannot hold NUL; SQLite keeps the same, so both engines answer alike)."""
    return text.rstrip("\x00").replace("\x00", "\ufffd") if "\x00" in text else text
