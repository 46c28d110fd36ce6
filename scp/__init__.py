"""DICOM services: AE and TLS set-up, thin event handlers, SCU for sending."""
