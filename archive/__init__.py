"""The store: SQLite index, encrypted blob storage, ingest. No DICOM networking here."""
from .crypto import IntegrityError
from .dicomfile import InvalidInstance, Limits, PixelsTooLarge
from .ingest import Archive, IngestResult, Outcome

__all__ = ["Archive", "IngestResult", "IntegrityError", "InvalidInstance", "Limits", "Outcome", "PixelsTooLarge"]
