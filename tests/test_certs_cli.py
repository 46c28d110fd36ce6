"""`m3dicom certs ...`, `m3dicom echo`, `m3dicom send`, and `m3dicom serve` refusals."""
from __future__ import annotations

import subprocess
import ssl

import pydicom
from cryptography import x509

from helpers import M3DICOM, ROOT, data_file, dataset_sha256


def run(*args, **kwargs):
    return subprocess.run(M3DICOM + list(map(str, args)), cwd=ROOT, capture_output=True, text=True,
                          timeout=120, **kwargs)


def test_certs_init_writes_private_keys_0600_and_refuses_to_overwrite(tmp_path):
    d = tmp_path / "certs"
    assert run("certs", "init", "--dir", d, "--host", "pacs.example").returncode == 0
    for name in ("ca.key", "server.key", "client.key"):
        assert (d / name).stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate((d / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(san.get_values_for_type(x509.DNSName)) | {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    assert {"localhost", "127.0.0.1", "::1", "pacs.example"} <= names
    before = (d / "ca.pem").read_bytes()
    again = run("certs", "init", "--dir", d)
    assert again.returncode != 0 and "--force" in again.stderr
    assert (d / "ca.pem").read_bytes() == before
    assert run("certs", "init", "--dir", d, "--force").returncode == 0
    assert (d / "ca.pem").read_bytes() != before


def test_issue_client_chains_to_the_ca(tmp_path):
    d = tmp_path / "certs"
    run("certs", "init", "--dir", d)
    assert run("certs", "issue-client", "ct-scanner-1", "--dir", d).returncode == 0
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(d / "ct-scanner-1.pem", d / "ct-scanner-1.key")  # key matches cert
    store = ssl.create_default_context(cafile=str(d / "ca.pem"))
    assert store.get_ca_certs()[0]["subject"]
    bad = run("certs", "issue-client", "../evil", "--dir", d)
    assert bad.returncode != 0 and not (tmp_path / "evil.pem").exists()


def test_echo_and_send(node, tmp_path):
    echo = run("echo", "--config", node.config_path, "--host", "localhost")
    assert echo.returncode == 0 and "0x0000" in echo.stdout
    (tmp_path / "study").mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        (tmp_path / "study" / name).write_bytes(data_file(name).read_bytes())
    (tmp_path / "study" / "notes.txt").write_text("not dicom")
    sent = run("send", "--config", node.config_path, "--host", "localhost", "--quiet", tmp_path / "study")
    assert sent.returncode == 0, sent.stderr
    assert "sent 2, failed 0, skipped 1" in sent.stdout
    uid = pydicom.dcmread(data_file("CT_small.dcm")).SOPInstanceUID
    assert dataset_sha256(node.stored_bytes(uid)) == dataset_sha256(data_file("CT_small.dcm"))


def test_send_refuses_a_path_that_does_not_exist(node, tmp_path):
    result = run("send", "--config", node.config_path, tmp_path / "nonexist", data_file("CT_small.dcm"))
    assert result.returncode == 2 and f"no such file or directory: {tmp_path / 'nonexist'}" in result.stderr
    assert node.rows("SELECT COUNT(*) FROM instances") == [(0,)]     # nothing sent before the refusal


def test_jobs_list_says_when_there_is_none_and_survives_a_closed_pipe(node):
    listed = run("jobs", "list", "--config", node.config_path)
    assert listed.returncode == 0 and listed.stdout.strip() == "no jobs"
    piped = subprocess.run(" ".join(map(str, [*M3DICOM, "jobs", "list", "--config", node.config_path]))
                           + " | head -c 1", shell=True, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr


def test_send_reports_an_unreachable_node(node):
    result = run("send", "--config", node.config_path, "--port", "1", data_file("CT_small.dcm"))
    assert result.returncode == 1 and "cannot connect" in result.stderr
    assert "nothing listens on that port (connection refused)" in result.stderr


def test_a_rejected_association_is_logged_with_the_reason(node):
    result = node.storescu(data_file("CT_small.dcm"), aec="WRONG", check=False)
    assert result.returncode != 0
    assert "association from STORESCU (127.0.0.1) rejected: called AE title 'WRONG' is not 'M3DICOM'" in node.log()


def test_serve_refuses_a_bad_config(tmp_path):
    (tmp_path / "c.toml").write_text("[dicom]\nport = 0\n")
    result = run("serve", "--config", tmp_path / "c.toml")
    assert result.returncode == 2 and "dicom.port" in result.stderr


def test_serve_explains_missing_certificates(tmp_path):
    (tmp_path / "c.toml").write_text(f'[node]\ndata_dir = "{tmp_path}/var"\n[dicom]\nport = 11999\n'
                                     f'certificate = "{tmp_path}/none.pem"\n')
    result = run("serve", "--config", tmp_path / "c.toml")
    assert result.returncode == 2 and "certs init" in result.stderr
