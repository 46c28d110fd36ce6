"""dcmtk's echoscu / storescu over DICOM TLS against `m3dicom serve`, as a modality would."""
from __future__ import annotations

import os
import shutil
import subprocess
import zlib

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from helpers import STOCK_PATH_ENV, data_file, dataset_offset, dataset_sha256, shows_part10_header

pytestmark = pytest.mark.interop

# One file per transfer syntax pydicom ships (with the storescu option that proposes it),
# plus multi-frame images.
FILES = {
    "CT_small.dcm": [],                              # Explicit VR Little Endian
    "MR_small_implicit.dcm": ["-xi"],                # Implicit VR Little Endian
    "MR_small_bigendian.dcm": ["-xb"],               # Explicit VR Big Endian
    "image_dfl.dcm": ["-xd"],                        # Deflated Explicit VR Little Endian
    "SC_rgb_jpeg_dcmtk.dcm": ["-xy"],                # JPEG Baseline
    "JPEG-lossy.dcm": ["-xx"],                       # JPEG Extended
    "JPEG-LL.dcm": ["-xs"],                          # JPEG Lossless SV1
    "MR_small_jpeg_ls_lossless.dcm": ["-xt"],        # JPEG-LS Lossless
    "JPEGLSNearLossless_16.dcm": ["-xu"],            # JPEG-LS Near-Lossless
    "MR_small_jp2klossless.dcm": ["-xv"],            # JPEG 2000 Lossless
    "JPEG2000.dcm": ["-xw"],                         # JPEG 2000
    "MR_small_RLE.dcm": ["-xr"],                     # RLE Lossless
    "emri_small_jpeg_ls_lossless.dcm": ["-xt"],      # multi-frame (10 frames)
    "SC_rgb_rle_2frame.dcm": ["-xr"],                # multi-frame RLE
}


def test_echoscu_tls(node):
    result = subprocess.run(["echoscu", *node.tls_args(), "-aec", "M3DICOM", "127.0.0.1", str(node.port)],
                            capture_output=True, text=True, timeout=30, env={**os.environ, "TCP_NODELAY": "1"})
    assert result.returncode == 0, result.stderr
    # `make test-stock-path` runs these tests on pynetdicom's generic path: the node must really take it
    stock = bool(os.environ.get(STOCK_PATH_ENV))
    assert ("dicom.fast_path = false" in node.log()) == stock, "the node did not take the path the run asked for"


def unique_copies(names, directory):
    """Copies with fresh UIDs (several pydicom files share one), in their own syntax.

    dcmodify writes them, so each file is encoded exactly as dcmtk's storescu sends it.
    """
    copies = []
    for name in names:
        path = directory / name
        shutil.copy(data_file(name), path)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        changes = ["-i", f"(0008,0018)={generate_uid()}"]
        for tag, keyword in (("(0020,000D)", "StudyInstanceUID"), ("(0020,000E)", "SeriesInstanceUID")):
            if keyword not in ds:  # some test files lack them
                changes += ["-i", f"{tag}={generate_uid()}"]
        subprocess.run(["dcmodify", "-nb", *changes, str(path)], check=True, capture_output=True)
        copies.append(path)
    return copies


def test_storescu_tls_stores_every_syntax_byte_exact(node, tmp_path):
    files = unique_copies(FILES, tmp_path)
    for path in files:
        node.storescu(path, extra=["-R", *FILES[path.name]])
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uid = str(ds.SOPInstanceUID)
        rows = node.rows("SELECT sha256, transfer_syntax, sop_class_uid FROM instances WHERE sop_instance_uid=?", (uid,))
        assert rows, f"{path.name} was not indexed"
        sha, syntax, sop_class = rows[0]
        assert syntax == str(ds.file_meta.TransferSyntaxUID), path.name
        assert sop_class == str(ds.SOPClassUID)
        stored = node.stored_bytes(uid)
        assert dataset_sha256(stored) == sha, f"{path.name}: blob content differs from index"
        if syntax == DeflatedExplicitVRLittleEndian:
            # storescu pads an odd-length deflate stream to even length: compare what it encodes
            assert inflated(stored) == inflated(path.read_bytes()), path.name
        else:
            assert sha == dataset_sha256(path), f"{path.name}: stored data set differs from the sent one"
    changes = node.rows("SELECT kind, COUNT(*) FROM changes GROUP BY kind")
    assert changes == [("stored", len(FILES))]


def inflated(part10: bytes) -> bytes:
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(part10[dataset_offset(part10):])


def test_resending_is_idempotent(node):
    path = data_file("CT_small.dcm")
    node.storescu(path)
    node.storescu(path)
    assert node.rows("SELECT COUNT(*) FROM instances") == [(1,)]
    assert node.rows("SELECT COUNT(*) FROM changes") == [(1,)]
    assert len(node.blob_files()) == 1


def test_blobs_are_encrypted_at_rest(node):
    node.storescu(data_file("CT_small.dcm"))
    (blob,) = node.blob_files()
    raw = blob.read_bytes()
    assert not shows_part10_header(raw, data_file("CT_small.dcm").read_bytes())
    assert b"CompressedSamples^CT1" not in raw     # the patient name of CT_small (a 3-byte ID would match by chance)
    assert oct(blob.stat().st_mode & 0o777) in ("0o600", "0o644", "0o640")
    assert oct((node.data_dir).stat().st_mode & 0o777) == "0o700"
