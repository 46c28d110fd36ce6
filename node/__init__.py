"""Configuration, command line and process wiring of the m3dicom node."""
__version__ = "0.1.0"
