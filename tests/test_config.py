"""Configuration: defaults, refusals naming the key, and every setting documented."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import ROOT
from node.config import ConfigError, documented_settings, from_dict, load


def test_defaults_match_the_documented_form():
    config = from_dict({}, Path("/srv/m3"))
    assert config.node.ae_title == "M3DICOM"
    assert config.node.data_dir == Path("/srv/m3/var")
    assert (config.dicom.host, config.dicom.port, config.dicom.plain_port) == ("127.0.0.1", 2762, 0)
    assert config.dicom.certificate == Path("/srv/m3/certs/server.pem")
    assert config.dicom.require_client_certificate is True
    assert config.dicom.allowed_calling_aets == [] and config.dicom.max_associations == 16


def test_issue_example_loads(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('''
[node]
ae_title = "M3DICOM"
data_dir = "var"
[dicom]
host = "127.0.0.1"
port = 2762
plain_port = 0
certificate = "certs/server.pem"
private_key = "certs/server.key"
ca_certificates = "certs/ca.pem"
require_client_certificate = true
allowed_calling_aets = []
max_associations = 16
''')
    config = load(path)
    assert config.node.data_dir == tmp_path / "var"


@pytest.mark.parametrize("data,key", [
    ({"node": {"colour": "red"}}, "node.colour"),
    ({"nodes": {}}, "nodes"),
    ({"dicom": {"port": "2762"}}, "dicom.port"),
    ({"dicom": {"port": 70000}}, "dicom.port"),
    ({"dicom": {"require_client_certificate": 1}}, "dicom.require_client_certificate"),
    ({"node": {"ae_title": "A" * 17}}, "node.ae_title"),
    ({"node": {"ae_title": "BACK\\SLASH"}}, "node.ae_title"),
    ({"dicom": {"allowed_calling_aets": ["OK", 3]}}, "dicom.allowed_calling_aets[1]"),
    ({"dicom": {"max_associations": 0}}, "dicom.max_associations"),
    ({"storage": {"duplicates": "overwrite"}}, "storage.duplicates"),
    ({"log": {"level": "LOUD"}}, "log.level"),
    ({"dicom": {"plain_port": 2762}}, "dicom.plain_port"),
])
def test_bad_settings_name_the_key(data, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        from_dict(data, Path("."))


def test_bad_toml_and_missing_file(tmp_path):
    (tmp_path / "bad.toml").write_text("[node\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml")


def test_every_setting_is_documented():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    missing = [name for name, _, _ in documented_settings() if f"`{name}`" not in doc]
    assert not missing, f"settings missing from docs/configuration.md: {missing}"
    assert all(help_text for _, _, help_text in documented_settings())


def test_the_complete_file_in_the_docs_starts_and_names_every_setting(tmp_path):
    """New-user pass: the documented "complete file with the defaults" did not load
    (viewer.certificate = "" refused) and lacked three settings."""
    doc = (ROOT / "docs" / "configuration.md").read_text()
    block = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "node.toml"
    path.write_text(block)
    config = load(path)
    assert config.viewer.certificate is None and config.query.timeout == 20.0
    written = {line.split("=")[0].strip() for line in block.splitlines() if "=" in line and not line.startswith("#")}
    missing = [name for name, _, _ in documented_settings()
               if name.rsplit(".", 1)[-1] not in written
               and not name.startswith(("remote.", "router.rules", "deid.", "dicomweb."))]
    assert not missing, f"settings missing from the complete file: {missing}"


def test_the_send_hint_names_dcmtks_storescu_even_behind_an_activated_virtual_environment(tmp_path, monkeypatch):
    """pynetdicom installs apps named storescu, findscu, ... into the virtual environment: activated, its
    `storescu` comes first on PATH and refuses dcmtk's options. The hint `make run` prints calls dcmtk's."""
    import sys

    from node.service import dcmtk

    venv, system = tmp_path / "venv" / "bin", tmp_path / "usr" / "bin"
    for folder in (venv, system):
        folder.mkdir(parents=True)
        (folder / "storescu").write_text("#!/bin/sh\n")
        (folder / "storescu").chmod(0o755)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setenv("PATH", f"{venv}:{system}")
    assert dcmtk("storescu") == str(system / "storescu")
    monkeypatch.setenv("PATH", f"{system}:{venv}")          # not activated: the plain name finds dcmtk's
    assert dcmtk("storescu") == "storescu"
