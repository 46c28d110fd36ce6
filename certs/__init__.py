"""Development PKI (`m3dicom certs ...`). Generated certificates and keys land here, git-ignored."""
